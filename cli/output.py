"""The only module of `dlm` that writes to the terminal: tables for people, JSON for scripts.

Each command hands its result (library dataclasses) to one function here, with `as_json`.
JSON goes to stdout as one document (the detector: one object per log line); warnings and
the final error line go to stderr, prefixed ``dlm:``. `dlm top` is drawn with rich:
`top` / `top_live` here print the frames that `top.frame` (a pure function) builds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from redlockdlm import admin
from redlockdlm.admin import Health, InstanceResult, MergedLock, MergedResource
from redlockdlm.detector import Cycle, Snapshot, WaitForGraph, WaitingRequest
from redlockdlm.devcluster import DevCluster
from redlockdlm.engine.modes import Flag, Mode

# ----------------------------------------------------------------- primitives


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in cells)


def error(message: str, as_json: bool = False, code: int = 1) -> None:
    """The one line an error is: text, or under --json a JSON object (on stderr both)."""
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code}), err=True)
    else:
        click.echo(f"dlm: error: {message}", err=True)


def help_text(text: str) -> None:
    click.echo(text)


def warn(message: str) -> None:
    click.echo(f"dlm: warning: {message}", err=True)


def confirm(question: str) -> bool:
    """Ask on the terminal (stderr, so stdout stays clean); EOF or no answer means no."""
    try:
        return click.confirm(question, default=False, err=True)
    except click.Abort:  # end of input: nobody said yes
        click.echo("", err=True)
        return False


def _mode(m: Mode | None) -> str:
    return m.name if m is not None else "--"


def _jmode(m: Mode | None) -> str | None:
    """A mode in JSON: its name, or null for none (as at the top of a lock's object)."""
    return m.name if m is not None else None


def _lease(ms: int) -> str:
    if ms <= 0:
        return "expired"
    return f"{ms}ms" if ms < 10_000 else f"{ms / 1000:.1f}s"


def _text(value: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in value)


def _hex(value: bytes, limit: int = 64) -> str:
    return value[:limit].hex() + (f"... ({len(value)} bytes)" if len(value) > limit else "")


def _key(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _flags(flags: int) -> list[str]:
    return [f.name for f in Flag if f and flags & f]


# ----------------------------------------------------------------- dlm status


def status(outcomes: Sequence[InstanceResult[Health]], namespace: str, as_json: bool,
           problems: Sequence[str] = (), waiting: dict[str, str] | None = None) -> None:
    q = admin.quorum(len(outcomes))
    ok = sum(1 for o in outcomes if o.ok)
    waiting = waiting or {}
    if as_json:
        _emit_json({
            "namespace": namespace, "quorum": q, "reachable": ok, "total": len(outcomes),
            "granting": ok - len(waiting), "problems": list(problems),
            "instances": [{
                "url": o.label, "reachable": o.ok, "error": o.error,
                **({"latency_ms": round(o.value.latency_ms, 3),
                    "redis_version": o.value.redis_version, "epoch": o.value.epoch,
                    "recovering_ms": o.value.recovering_ms, "resources": o.value.resources,
                    "locks": o.value.locks, "waiters": o.value.waiters,
                    "run_id": o.value.run_id, "maxmemory_policy": o.value.maxmemory_policy,
                    "rejoin_ms": o.value.rejoin_ms, "persistence": o.value.persistence,
                    "shards": [{"node": sh.node, "slots": [list(r) for r in sh.slots],
                                "keys": sh.keys, "waiters": sh.waiters,
                                **({"run_id": sh.status.run_id, "epoch": sh.status.epoch,
                                    "recovering_ms": sh.status.recovering_ms}
                                   if sh.status is not None else {})}
                               for sh in o.value.shards],
                    "can_grant": o.label not in waiting,
                    "not_granting": waiting.get(o.label)} if o.ok else {}),
            } for o in outcomes]})
        return
    rows = []
    for o in outcomes:
        h = o.value
        if h is None:
            rows.append([o.label, "no", "-", "-", "-", "-", "-", "-", "-", "-", "-"])
        else:
            rows.append([o.label, "yes", f"{h.latency_ms:.2f}", h.redis_version,
                         h.epoch or "(none)", h.recovering_ms,
                         "-" if h.rejoin_ms is None else h.rejoin_ms,
                         h.maxmemory_policy or "?", h.persistence, h.locks, h.waiters])
    click.echo(_table(["INSTANCE", "REACHABLE", "LATENCY_MS", "REDIS", "EPOCH",
                       "RECOVERING_MS", "REJOIN_MS", "EVICTION", "PERSISTENCE", "LOCKS",
                       "WAITERS"], rows))
    for o in outcomes:
        for sh in o.value.shards if o.value else ():
            slots = ",".join(f"{a}-{b}" for a, b in sh.slots)
            st = sh.status
            epoch = "" if st is None else (
                f", epoch {st.epoch or '(none)'}"
                + (f" recovering {st.recovering_ms} ms" if st.recovering_ms > 0 else ""))
            click.echo(f"  {o.label} shard {sh.node}: slots {slots}, {sh.keys} keys, "
                       f"{sh.waiters} waiters{epoch}")
    for o in outcomes:
        if not o.ok:
            click.echo(f"  {o.label}: {o.error}")
    for lab, why in waiting.items():
        click.echo(f"  {lab}: {why}")
    for p in problems:
        click.echo(f"  ERROR: {p}")
    verdict = ("ERROR" if problems else "NO QUORUM" if ok < q
               else "NO GRANT POSSIBLE NOW" if ok - len(waiting) < q else "OK")
    click.echo(f"namespace {namespace}: {ok} of {len(outcomes)} instances reachable, "
               f"{ok - len(waiting)} can grant, quorum {q}: {verdict}")


# ----------------------------------------------------------------- dlm namespaces


def namespaces(found: dict[str, dict[str, int]], labels: Sequence[str], as_json: bool) -> None:
    if as_json:
        _emit_json({"namespaces": [{"namespace": ns, "keys": per}
                                   for ns, per in found.items()]})
        return
    if not found:
        click.echo("no namespace has resource keys")
        return
    rows = [[ns, *[per.get(lab, 0) for lab in labels]] for ns, per in found.items()]
    click.echo(_table(["NAMESPACE", *labels], rows))


# ----------------------------------------------------------------- dlm ls


def _lock_json(m: MergedLock) -> dict[str, Any]:
    v = m.first
    return {
        "lock_id": m.lock_id, "owner": m.owner, "queue": m.queue,
        "granted": m.granted.name if m.granted is not None else None,
        "requested": m.requested.name if m.requested is not None else None,
        "ticket": m.ticket, "lease_left_ms": m.lease_left_ms, "token": m.token,
        "flags": _flags(v.flags), "parent": v.parent or None, "on": len(m.views),
        "instances": {lab: {"queue": lk.queue, "granted": _jmode(lk.mode),
                            "requested": _jmode(lk.requested), "lease_left_ms": lk.lease_left_ms,
                            "token": lk.token}
                      for lab, lk in m.views.items()},
    }


def _queue_cell(locks: list[MergedLock], conv: bool = False) -> str:
    if not locks:
        return "-"
    if conv:
        modes = [f"{_mode(m.granted)}>{_mode(m.requested)}" for m in locks]
    else:
        modes = [_mode(m.requested if m.queue == "W" else m.granted) for m in locks]
    shown = " ".join(modes[:6]) + (" ..." if len(modes) > 6 else "")
    return f"{len(locks)} {shown}"


def resources(found: Sequence[MergedResource], namespace: str, total: int,
              as_json: bool) -> None:
    if as_json:
        _emit_json({"namespace": namespace, "resources": [{
            "name": admin.show_name(r.path), "path": admin.path_list(r.path),
            "key": _key(r.key), "on": r.present_on, "divergent": bool(r.divergences),
            "granted": [_lock_json(m) for m in r.queue("G")],
            "converting": [_lock_json(m) for m in r.queue("C")],
            "waiting": [_lock_json(m) for m in r.queue("W")],
        } for r in found]})
        return
    if not found:
        click.echo(f"no resources with live locks in namespace {namespace}")
        return
    rows = [[admin.show_name(r.path), _queue_cell(r.queue("G")),
             _queue_cell(r.queue("C"), conv=True), _queue_cell(r.queue("W")),
             f"{r.present_on}/{total}", "divergent" if r.divergences else ""]
            for r in found]
    click.echo(_table(["RESOURCE", "GRANTED", "CONVERTING", "WAITING", "ON", "NOTE"], rows))


# ----------------------------------------------------------------- dlm show


def resource(r: MergedResource, outcomes: Sequence[InstanceResult], as_json: bool) -> None:
    if as_json:
        _emit_json({
            "name": admin.show_name(r.path), "path": admin.path_list(r.path),
            "key": _key(r.key),
            "instances": [_instance_json(o.label, r.views.get(o.label), o.error)
                          for o in outcomes],
            "granted": [_lock_json(m) for m in r.queue("G")],
            "converting": [_lock_json(m) for m in r.queue("C")],
            "waiting": [_lock_json(m) for m in r.queue("W")],
            "divergence": list(r.divergences),
        })
        return
    click.echo(f"Resource  {admin.show_name(r.path)}")
    click.echo(f"Key       {_key(r.key)}")
    click.echo("")
    rows = []
    for o in outcomes:
        v = r.views.get(o.label)
        if not o.ok:
            rows.append([o.label, "-", "-", "-", o.error])
        elif v is None:
            rows.append([o.label, "-", "-", "-", "(absent)"])
        else:
            value = "(none)" if v.value is None else f"{_hex(v.value)}  \"{_text(v.value)}\""
            rows.append([o.label, v.seq, v.version, "yes" if v.valid else "NO", value])
    click.echo(_table(["INSTANCE", "FENCING_SEQ", "VERSION", "VALID", "VALUE (hex, text)"],
                      rows))
    locks = []
    for title, q in (("Granted", "G"), ("Conversion", "C"), ("Waiting", "W")):
        locks.append((title, [[f"{_mode(m.granted)}" + (f" ({_mode(m.requested)})"
                                                        if m.queue != "G" else ""),
                               m.lock_id, m.owner, m.ticket, _lease(m.lease_left_ms),
                               m.token or "-", f"{len(m.views)}/{len(outcomes)}",
                               " ".join(_flags(m.first.flags))]
                              for m in r.queue(q)]))
    all_rows = [row for _, rs in locks for row in rs]
    header = ["MODE", "LOCK", "OWNER", "TICKET", "LEASE", "TOKEN", "ON", "FLAGS"]
    widths = [max([len(header[i])] + [len(str(row[i])) for row in all_rows])
              for i in range(len(header))]

    def line(cells: Sequence[Any]) -> str:
        return "    " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    click.echo("")
    click.echo(line(header))
    for title, rs in locks:
        click.echo(f"{title}")
        for row in rs:
            click.echo(line(row))
    if r.divergences:
        click.echo("")
        click.echo("Divergence")
        for d in r.divergences:
            click.echo(f"    {d}")


def _instance_json(label: str, v: Any, err: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"url": label, "reachable": err is None, "error": err,
                           "present": v is not None}
    if v is not None:
        out.update({"fencing_seq": v.seq, "version": v.version, "valid": v.valid,
                    "value_hex": None if v.value is None else v.value.hex(),
                    "value_text": None if v.value is None else _text(v.value)})
    return out


# ----------------------------------------------------------------- dlm break


def _lock_text(lock_id: str, owner: str, gr: Mode | None, rq: Mode | None, queue: str) -> str:
    return (f"{lock_id} of {owner} ({_mode(gr)}" + (f">{_mode(rq)}" if queue != "G" else "")
            + ")")


def break_plan(r: MergedResource, matches: Sequence[MergedLock],
               below: Sequence[tuple[tuple[bytes, ...], MergedLock]] = ()) -> str:
    """The question asked before breaking: the matching locks and every lock below them
    (H4: a break takes the subtree)."""
    what = ", ".join(_lock_text(m.lock_id, m.owner, m.granted, m.requested, m.queue)
                     for m in matches[:5])
    more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
    sub = ""
    if below:
        sub = f", with {len(below)} lock(s) below: " + ", ".join(
            admin.show_name(p) + ": "
            + _lock_text(m.lock_id, m.owner, m.granted, m.requested, m.queue)
            for p, m in below[:5])
        if len(below) > 5:
            sub += f" and {len(below) - 5} more"
    return (f"Break {len(matches)} lock(s) on {admin.show_name(r.path)}: {what}{more}{sub}, "
            "on every instance?")


def broken(result: admin.BreakResult, as_json: bool) -> None:
    """What went: each lock broken (resource path, lock, owner, modes, the instances it was
    broken on), children before their parents, then the count per instance."""
    locks = result.locks
    if as_json:
        _emit_json({"name": admin.show_name(result.path), "path": admin.path_list(result.path),
                    "broken": result.broken,
                    "locks": [{"name": admin.show_name(b.path), "path": admin.path_list(b.path),
                               "lock_id": b.lock_id, "owner": b.owner,
                               "mode": _mode_json(b.mode), "requested": _mode_json(b.requested),
                               "queue": b.queue, "instances": list(b.instances)}
                              for b in locks],
                    "instances": [{"url": o.label, "broken": result.broken_on(o),
                                   "error": o.error} for o in result.outcomes]})
        return
    n = len(result.outcomes)
    if locks:
        click.echo(_table(["resource", "lock", "owner", "mode", "instances"], [
            [admin.show_name(b.path), b.lock_id, b.owner,
             _mode(b.mode) + (f">{_mode(b.requested)}" if b.queue != "G" else ""),
             f"{len(b.instances)}/{n}"] for b in locks]))
    for o in result.outcomes:
        click.echo(f"{o.label}: " + (f"{result.broken_on(o)} broken" if o.ok
                                     else f"FAILED: {o.error}"))
    click.echo(f"broke {result.broken} lock(s) on {admin.show_name(result.path)}"
               + (" and below it" if any(b.key != result.key for b in locks) else ""))


def _mode_json(m: Mode | None) -> str | None:
    return m.name if m is not None else None


# ----------------------------------------------------------------- dlm graph


def _req_json(req: WaitingRequest | None) -> dict[str, Any] | None:
    if req is None:
        return None
    return {"owner": req.owner, "lock_id": req.lock_id, "name": admin.show_name(req.path),
            "path": admin.path_list(req.path), "ticket": req.ticket,
            "priority": req.priority, "queue": req.queue, "requested": req.requested.name,
            "no_deadlock_wait": req.no_deadlock_wait}


def graph(snap: Snapshot, g: WaitForGraph, cycles: Sequence[tuple[Cycle, WaitingRequest | None]],
          as_json: bool) -> None:
    labels = [i.label for i in snap.instances]
    if as_json:
        _emit_json({
            "waiting_requests": snap.waiter_count,
            "instances": [{"url": i.label, "reachable": i.ok, "error": i.error,
                           "waiters": len(i.waiters)} for i in snap.instances],
            "owners": g.owners,
            "edges": [{"waiter": e.waiter, "holder": e.holder,
                       "name": admin.show_name(g.requests[(e.key, e.lock_id)].path),
                       "path": admin.path_list(g.requests[(e.key, e.lock_id)].path),
                       "lock_id": e.lock_id, "blocker_id": e.blocker_id,
                       "instances": [labels[i] for i in e.instances]} for e in g.edges],
            "cycles": [{"owners": list(c.owners), "path": list(c.path),
                        "victim": _req_json(v)} for c, v in cycles],
        })
        return
    n = len(snap.instances)
    click.echo(f"{snap.waiter_count} waiting request(s) ({snap.index_entries} index entries on "
               f"{snap.reachable}/{n} instance(s)); {len(g.owners)} owner(s), "
               f"{len(g.edges)} edge(s)")
    if g.edges:
        rows = [[e.waiter, "->", e.holder,
                 admin.show_name(g.requests[(e.key, e.lock_id)].path),
                 f"{e.lock_id} waits for {e.blocker_id}", f"{len(e.instances)}/{n}"]
                for e in g.edges]
        click.echo(_table(["WAITER", "", "HOLDER", "RESOURCE", "LOCKS", "ON"], rows, "  "))
    if not cycles:
        click.echo("no cycles")
        return
    click.echo(f"{len(cycles)} cycle(s):")
    for c, v in cycles:
        who = ("no victim: every request is NODLCKWT" if v is None else
               f"victim if it persists: {v.owner} (lock {v.lock_id} on "
               f"{admin.show_name(v.path)}, ticket {v.ticket}"
               + (f", priority {v.priority})" if v.priority else ")"))
        click.echo(f"  {' -> '.join(c.path + c.path[:1])}   [{', '.join(c.owners)}]   {who}")


def _dot_str(*lines: str) -> str:
    """A DOT string literal of `lines` (shown one under another): quoted, with
    backslashes, quotes and line ends inside each line escaped (a resource name may hold
    any byte but NUL)."""
    return '"' + "\\n".join(t.replace("\\", "\\\\").replace('"', '\\"')
                            .replace("\r", "\\r").replace("\n", "\\n")
                            for t in lines) + '"'


def graph_dot(g: WaitForGraph, cycles: Sequence[tuple[Cycle, WaitingRequest | None]]) -> str:
    """The wait-for graph in Graphviz DOT: one node per owner, one edge `waiter -> holder`
    per lock pair, labelled by resource and locks. Edges inside a cycle are red and bold;
    the owner of each cycle's victim (the request the detector cancels if the cycle
    persists) is a red double octagon whose label names the victim lock. Pure."""
    in_cycle = {e.ident for c, _ in cycles for e in c.edges}
    cyclic_owners = {o for c, _ in cycles for o in c.owners}
    victims: dict[str, list[WaitingRequest]] = {}
    for _, v in cycles:
        if v is not None:
            victims.setdefault(v.owner, []).append(v)
    victim_reqs = {(v.key, v.lock_id) for vs in victims.values() for v in vs}
    lines = ["digraph waitfor {", "  rankdir=LR;",
             '  node [shape=box, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for owner in g.owners:
        attrs = []
        if owner in victims:
            label = [owner] + [f"victim: lock {v.lock_id} on {admin.show_name(v.path)}"
                               for v in victims[owner]]
            attrs += [f"label={_dot_str(*label)}", "shape=doubleoctagon", "color=red",
                      "style=filled", 'fillcolor="#ffd6d6"', "penwidth=2"]
        elif owner in cyclic_owners:
            attrs += ["color=red", "penwidth=2"]
        lines.append(f"  {_dot_str(owner)}" + (f" [{', '.join(attrs)}]" if attrs else "")
                     + ";")
    for e in g.edges:
        req = g.requests[(e.key, e.lock_id)]
        label = _dot_str(admin.show_name(req.path), f"{e.lock_id} waits for {e.blocker_id}")
        attrs = [f"label={label}"]
        if e.ident in in_cycle:
            attrs += ["color=red", "fontcolor=red", "penwidth=2", "style=bold"]
        if (e.key, e.lock_id) in victim_reqs:
            attrs.append('taillabel="victim"')
        lines.append(f"  {_dot_str(e.waiter)} -> {_dot_str(e.holder)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def text_out(text: str) -> None:
    """Text made elsewhere (DOT, SVG), as it is, on stdout."""
    click.echo(text, nl=not text.endswith("\n"))


# ----------------------------------------------------------------- dlm top


def _console() -> Any:
    from rich.console import Console

    # Not a terminal (a pipe, a script, a test): wide lines rather than rich's 80 columns,
    # unless COLUMNS says otherwise.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(file=sys.stdout, width=160 if wide else None)


def top(snap: admin.TopSnapshot, limit: int, as_json: bool) -> None:
    """One frame of `dlm top` (--once), or its rows as one JSON document."""
    if as_json:
        n = len(snap.instances)
        _emit_json({
            "namespace": snap.namespace, "taken_at": round(snap.taken_at, 3),
            "reachable": snap.reachable, "total": n, "quorum": admin.quorum(n),
            "recovering": snap.recovering,
            "instances": [{"url": o.label, "reachable": o.ok, "error": o.error,
                           "recovering_ms": o.value.recovering_ms if o.value else None}
                          for o in snap.instances],
            "resources": [{
                "name": admin.show_name(b.resource.path),
                "path": admin.path_list(b.resource.path),
                "granted": [_lock_json(m) for m in b.resource.queue("G")],
                "converting": [_lock_json(m) for m in b.resource.queue("C")],
                "waiting": [_lock_json(m) for m in b.resource.queue("W")],
                "not_granted": b.waiting, "oldest_wait_ms": None if b.oldest_wait_us is None
                else b.oldest_wait_us // 1000,
                "lease_left_ms": b.lease_left_ms, "divergent": bool(b.resource.divergences),
            } for b in snap.busiest()[:limit]]})
        return
    from .top import frame

    _console().print(frame(snap, limit))


@contextlib.contextmanager
def top_live(limit: int) -> Iterator[Callable[[admin.TopSnapshot], None]]:
    """Redraw `dlm top` in place (rich.live): yields `show(snapshot)`; the last frame stays
    on the terminal when it ends."""
    from rich.live import Live

    from .top import frame

    with Live(console=_console(), auto_refresh=False, vertical_overflow="ellipsis") as live:
        yield lambda snap: live.update(frame(snap, limit), refresh=True)


# ----------------------------------------------------------------- dlm detector, dlm dev


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


def setup_logging(as_json: bool, verbose: bool) -> None:
    """Log lines of the detector to stderr: text `time level message` or JSON objects."""
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
    root = logging.getLogger("redlockdlm")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def dev_started(dev: DevCluster, as_json: bool, duration_s: float | None) -> None:
    if as_json:
        _emit_json({"urls": dev.urls, "pids": dev.pids, "env": dev.env})
    else:
        click.echo(f"export {dev.env}")  # (a line to paste into a shell as it is)
    until = f"for {duration_s:g} s" if duration_s else "until Ctrl-C or SIGTERM"
    click.echo(f"dlm dev: {len(dev.urls)} redis-server(s) running (pids "
               f"{', '.join(map(str, dev.pids))}) {until}; paste the line above into the "
               "shell that runs your program (or `eval` it)", err=True)


def dev_stopped() -> None:
    click.echo("dlm dev: stopped", err=True)


# ----------------------------------------------------------------- demo


def progress_line(as_json: bool):
    """A reporter for `run_demo`: one line rewritten in place on a terminal, a line a
    second otherwise, nothing with --json."""
    tty = sys.stdout.isatty()
    last = [0.0]

    def report(elapsed: float, ops: int, done: int, workers: int) -> None:
        if as_json:
            return
        line = f"  {elapsed:5.1f} s   {ops:6d} lock operations   {done}/{workers} workers done"
        if tty:
            click.echo("\r" + line, nl=False)
            if done == workers:
                click.echo()
        elif elapsed - last[0] >= 1.0 or done == workers:
            last[0] = elapsed
            click.echo(line)

    return report


def demo_intro(urls: Sequence[str], *, started: bool, as_json: bool) -> None:
    if as_json:
        return
    where = "a local development cluster" if started else "the given instances"
    click.echo(f"redlockdlm demo on {where}: {', '.join(urls)}")
    click.echo("  workers lock tables (CR/CW intent, PR scan, EX schema change) and rows "
               "(PR read, EX update);\n  row versions live in value blocks; workers 0 and 1 "
               "deadlock on purpose and the detector picks a victim.")


def demo_result(res: Any, elapsed: float, as_json: bool) -> None:
    totals = res.totals
    doc = {
        "seconds": round(elapsed, 2),
        "workers": res.workers,
        "operations": dict(totals),
        "per_worker": res.per_worker,
        "deadlock_victims": res.deadlock_victims,
        "row_versions": res.versions,
        "committed_updates": res.committed,
        "consistent": res.consistent,
    }
    if as_json:
        _emit_json(doc)
        return
    click.echo("\nWhat happened:")
    click.echo(_table(["operation", "count"], sorted(totals.items()), indent="  "))
    rows = [[w["worker"], sum(w["ops"].values()), w["victims"]] for w in res.per_worker]
    click.echo("\n" + _table(["worker", "operations", "deadlock victim"], rows, indent="  "))
    rows = [[k, res.committed.get(k, 0), v, "ok" if res.committed.get(k, 0) == v else "LOST"]
            for k, v in sorted(res.versions.items())]
    click.echo("\n" + _table(["row", "updates committed", "version in value block", ""],
                             rows, indent="  "))
    verdict = "yes: no update lost" if res.consistent else "NO"
    click.echo(f"\nDeadlocks resolved by the detector: {res.deadlock_victims}. "
               f"Consistent: {verdict}. ({elapsed:.1f} s)")


# ----------------------------------------------------------------- dlm acl


def acl_rule(line: str, args: Sequence[str], *, user: str, password: str | None,
             namespace: str | None, as_json: bool) -> None:
    """The ACL SETUSER line on stdout; with a generated `password`, how clients connect on
    stderr (so `dlm acl | redis-cli` gets the rule alone)."""
    if as_json:
        _emit_json({"user": user, "namespace": namespace, "rule": line,
                    "acl_setuser_args": list(args),
                    "url": f"redis://{user}:{password}@HOST:PORT" if password else None})
        return
    click.echo(line)
    if password:
        click.echo(f"dlm acl: generated password; clients use redis://{user}:{password}"
                   "@HOST:PORT", err=True)


def initialized(outcomes: Sequence[InstanceResult], as_json: bool, what: str = "init") -> None:
    """One row per instance: `what` ok or FAILED, its epoch, and its stored rejoin wait."""
    doc = [{"instance": o.label, "ok": o.ok, "error": o.error,
            "epoch": o.value.epoch if o.ok and o.value else None,
            "rejoin_ms": getattr(o.value, "rejoin_ms", None) if o.ok and o.value else None}
           for o in outcomes]
    if as_json:
        _emit_json(doc)
        return
    rows = [[d["instance"], "ok" if d["ok"] else f"FAILED: {d['error']}", d["epoch"] or "-",
             "-" if d["rejoin_ms"] is None else str(d["rejoin_ms"])] for d in doc]
    click.echo(_table(["instance", what, "epoch", "rejoin_ms"], rows))


def swept(outcomes: Sequence[InstanceResult[int]], as_json: bool) -> None:
    if as_json:
        _emit_json([{"instance": o.label, "ok": o.ok, "error": o.error, "purged": o.value}
                    for o in outcomes])
        return
    for o in outcomes:
        click.echo(f"{o.label}: " + (f"{o.value} purged" if o.ok else f"FAILED: {o.error}"))
