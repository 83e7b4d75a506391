"""`dlm top`: the busiest resources, drawn with rich (the live view's half of `output`).

`frame` is a pure function of a `TopSnapshot` (no I/O, no clock): the command draws it
once (`--once`) or redraws it in place with `rich.live.Live`; a test renders it to a string
with a recording `Console`. Every name and owner is shown as `rich.text.Text`, never as
markup, so a resource called ``[red]x`` is printed as it is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from redlockdlm import admin
from redlockdlm.admin import Busy, MergedLock, TopSnapshot
from redlockdlm.engine.modes import Mode

#: At most this many locks are named in one cell; the rest are counted ("+N").
CELL_LOCKS = 4


def _mode(m: Mode | None) -> str:
    return m.name if m is not None else "--"


def age(us: int | None) -> str:
    """A duration for people: 850ms, 12.3s, 4m05s, 3h12m, 2d04h; '-' for none."""
    if us is None:
        return "-"
    ms = us // 1000
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _lease(ms: int | None) -> str:
    return "-" if ms is None else age(ms * 1000) if ms > 0 else "expired"


def _locks(locks: Sequence[MergedLock], what: str) -> Text:
    """`owner:MODE` per lock (`owner:OLD>NEW` converting, `owner:NEW` waiting)."""
    parts = []
    for m in locks[:CELL_LOCKS]:
        if what == "G":
            parts.append(f"{m.owner}:{_mode(m.granted)}")
        elif what == "C":
            parts.append(f"{m.owner}:{_mode(m.granted)}>{_mode(m.requested)}")
        else:
            parts.append(f"{m.owner}:{_mode(m.requested)}")
    if len(locks) > CELL_LOCKS:
        parts.append(f"+{len(locks) - CELL_LOCKS}")
    return Text(" ".join(parts) or "-")


def _header(snap: TopSnapshot, shown: int, total: int) -> Text:
    n = len(snap.instances)
    q = admin.quorum(n)
    ok = snap.reachable
    recovering = snap.recovering
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.taken_at))
    head = Text()
    head.append("dlm top", style="bold")
    head.append(f"  namespace {snap.namespace}  {when}\n")
    head.append(f"instances: {ok}/{n} reachable",
                style="bold red" if ok < q else None)
    head.append(f" (quorum {q}), {len(recovering)} recovering",
                style="yellow" if recovering else None)
    if ok - len(recovering) < q:
        head.append("  NO GRANT POSSIBLE NOW", style="bold red")
    for o in snap.instances:
        if not o.ok:
            head.append(f"\n  {o.label}: {o.error}", style="red")
    for label in recovering:
        head.append(f"\n  {label}: recovering (rejoin window, grants nothing)",
                    style="yellow")
    head.append(f"\n{total} resource(s) with live locks"
                + (f", the {shown} busiest shown" if shown < total else ""))
    return head


def _row(b: Busy) -> list[Text]:
    r = b.resource
    waiting = r.queue("W")
    cell = Text(str(len(waiting)), style="bold" if waiting else None)
    if waiting:
        cell.append(" ")
        cell.append_text(_locks(waiting, "W"))
    return [Text(admin.show_name(r.path)), _locks(r.queue("G"), "G"),
            _locks(r.queue("C"), "C"), cell,
            Text(age(b.oldest_wait_us), style="bold red" if b.waiting else None),
            Text(_lease(b.lease_left_ms)),
            Text("DIVERGENT", style="bold yellow") if r.divergences else Text("")]


def frame(snap: TopSnapshot, limit: int = 20) -> RenderableType:
    """One frame of `dlm top`: the header (namespace, time, instances reachable and
    recovering, the ones that are not answering) and the `limit` busiest resources
    (`admin.busiest`), one row each: path, granted (owner:mode), converting
    (owner:old>new), waiting (count, then owner:mode), the oldest wait's age (from its
    ticket), the smallest lease left of a holder, and DIVERGENT where instances
    disagree. Pure: the same snapshot always gives the same frame."""
    ranked = snap.busiest()
    shown = ranked[:limit]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, kw in (("RESOURCE", {"overflow": "fold"}), ("GRANTED", {}),
                     ("CONVERTING", {}), ("WAITING", {}),
                     ("OLDEST WAIT", {"justify": "right"}),
                     ("LEASE LEFT", {"justify": "right"}), ("NOTE", {})):
        table.add_column(name, **kw)
    for b in shown:
        table.add_row(*_row(b))
    parts: list[RenderableType] = [_header(snap, len(shown), len(ranked)), Text("")]
    if shown:
        parts.append(table)
    else:
        parts.append(Text("no resources with live locks"))
    return Group(*parts)
