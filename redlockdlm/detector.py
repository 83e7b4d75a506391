"""The deadlock detector (DESIGN section 6; rules D1-D9 in docs/detector.md).

A pipeline of pure steps, then one job that runs them on a schedule::

    snap = scan(engines)               # read-only: waiter index + scan.lua, instances in parallel
    graph = wait_for_graph(snap)       # owners, and who waits for whom (D2-D5)
    cycles = find_cycles(graph)        # Tarjan's strongly connected components (D6)
    victim = choose_victim(cycle, snap)  # lowest priority, youngest ticket; not NODLCKWT (D8)

    Detector(urls, "shop", interval_s=0.5).run_forever(stop_event)

`Detector.run_once` confirms a cycle only when the same locks deadlock on two consecutive
scans (D7; `run_forever` makes the second one a `confirm_pending` round that re-reads only
the cycle's resources; between full rounds, `watch` rounds read only the waiter indexes and
the resources of new entries, so a new cycle is seen without waiting for a full scan), so a
state that only looks like a cycle for a moment (a split vote being yielded, a grant in
flight) is never punished; it then cancels the victim's waiting request on every instance
with reason ``deadlock``, which publishes ``C|<id>|deadlock`` to the victim's owner; its
client raises `Deadlock`. `reap` clears waiter-index entries whose
lease ran out (D9).

Only one detector should act at a time: pass `leader`, a callable that says whether this
process leads (e.g. holds a lock of this DLM); without it the detector always acts.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, cached_property, partial
from itertools import compress, groupby, islice, repeat
from operator import itemgetter, sub
from typing import NamedTuple

import redis

from .admin import (
    Outcome,
    Target,
    connect,
    describe_error,
    fan_out,
    label_of,
    parent_key,
    show_name,
)
from .admin import quorum as quorum_of
from .engine.codec import LockView, ResourceView
from .engine.instance import Engine, call_script
from .engine.keys import EPOCH_KEY
from .engine.modes import COMPAT, Flag, Mode, Status
from .engine.scripts import command
from .errors import ProtocolError

log = logging.getLogger("redlockdlm.detector")

__all__ = [
    "Cycle",
    "Detector",
    "Edge",
    "InstanceScan",
    "Lock",
    "ReapResult",
    "Request",
    "Resource",
    "Round",
    "ScanMemo",
    "Snapshot",
    "Victim",
    "WaitForGraph",
    "choose_victim",
    "find_cycles",
    "reap",
    "scan",
    "wait_for_graph",
]


# ----------------------------------------------------------------- D1: the scan


class Lock(NamedTuple):
    """One lock as the detector reads it: the fields of `codec.LockView` the graph needs
    (a LockView may stand in for it). A plain tuple: a scan builds tens of thousands."""

    queue: str  #: 'G' granted, 'C' converting, 'W' waiting
    lock_id: str
    owner: str
    mode: Mode | None  #: granted mode
    requested: Mode | None
    flags: int
    ticket: int
    cticket: int
    #: on the instance's clock, when the scan script last decoded the resource (a later
    #: scan may hand back the same tuple, D1); a scan returns live locks only (> 0).
    #: (`inspect`: <= 0 for a lock expired, not yet purged)
    lease_left_ms: int
    parent: str
    priority: int = 0  #: of the lock's latest request or conversion (D8)


class Resource(NamedTuple):
    """One resource as the detector reads it (a `codec.ResourceView` may stand in)."""

    key: bytes
    name: bytes
    locks: tuple[Lock, ...]

    @property
    def path(self) -> tuple[bytes, ...]:
        return tuple(self.name.split(b"\x00")) if self.name else ()


@dataclass(frozen=True)
class InstanceScan:
    """What one instance showed: its live waiter-index entries and their resources."""

    label: str
    now_ms: int = 0  #: the instance's clock (ms) when its index was read
    waiters: tuple[tuple[str, bytes], ...] = ()  #: (lock id, resource key)
    resources: Mapping[bytes, Resource | ResourceView] = field(default_factory=dict)
    error: str | None = None  #: set if the instance did not answer

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Snapshot:
    """One scan of every configured instance (including those that did not answer)."""

    instances: tuple[InstanceScan, ...]

    @property
    def quorum(self) -> int:
        return quorum_of(len(self.instances))

    @property
    def reachable(self) -> int:
        return sum(1 for i in self.instances if i.ok)

    @property
    def waiter_count(self) -> int:
        return sum(len(i.waiters) for i in self.instances)

    def views_of(self, key: bytes, lock_id: str) -> list[tuple[int, Lock | LockView]]:
        """Every instance's view of one lock: (instance index, view)."""
        out = []
        for i, inst in enumerate(self.instances):
            res = inst.resources.get(key)
            if res is not None:
                out.extend((i, lk) for lk in res.locks if lk.lock_id == lock_id)
        return out


#: Resource keys per `scan` call. A scan sends all its calls in one pipeline (one round
#: trip), but each call runs alone on the instance (~4 ms per 500 one-waiter resources), so
#: clients' lock calls are served between them instead of waiting for one long script.
#: The size barely matters to the scan's own cost from ~100 keys up (benchmarks/detector.py
#: --chunks; below that the per-call overhead shows), so it is chosen for those clients.
SCAN_CHUNK = 500

_QUEUE = {b"G": "G", b"C": "C", b"W": "W"}
_MODE: dict[int, Mode | None] = {-1: None, **{int(m): m for m in Mode}}  # -1: none
_FIELDS = len(Lock._fields)  # values per lock in a scan reply, in Lock's order
_new_lock = partial(tuple.__new__, Lock)  # (a NamedTuple without its Python-level __new__)
_new_resource = partial(tuple.__new__, Resource)
_ITEM0, _ITEM1, _ITEM2 = itemgetter(0), itemgetter(1), itemgetter(2)
_RESOURCE_OF = _ITEM1  # of a memo entry (stamp, Resource)


def _split_member(member: bytes) -> tuple[str, bytes]:
    lock_id, _, key = member.partition(b"|")  # ids never contain '|'; names may
    return lock_id.decode(), key


def _split_members(members: list[bytes]) -> tuple[tuple[str, bytes], ...]:
    """`_split_member` of every index member, column by column (C loops, no Python call per
    member)."""
    parts = [m.partition(b"|") for m in members]
    return tuple(zip(map(bytes.decode, map(_ITEM0, parts)), map(_ITEM2, parts)))


#: What a scan of one instance decoded: resource key -> (stamp, Resource) (D1, scan.lua).
Held = dict[bytes, tuple[bytes, Resource]]
_PLUS, _SAME, _GONE = 43, 61, 45  # b"+", b"=", b"-": a resource's status in a scan reply


class ScanMemo:
    """What earlier scans decoded, per instance, so that `scan` asks `lua/scan.lua` only for
    the resources that changed since (D1): for the others the script answers "unchanged"
    after a GET, and the `Resource` tuples of the earlier scan are handed back as they are
    (their `lease_left_ms` is then that of the earlier read). The script says "unchanged"
    only for the very bytes it decoded then and while every lock it returned is still
    live, so a memo never changes what a scan shows, only what it costs.

    One per detector (the `Detector` keeps one); a full scan keeps only the resources it
    read, a partial read (`Detector.confirm_pending`) adds to it. Not for two scans at once."""

    def __init__(self) -> None:
        self._held: dict[Engine, Held] = {}
        #: per instance, the waiter-index members of its last read (`Detector.watch`)
        self.members: dict[Engine, set[bytes]] = {}

    def held(self, engine: Engine) -> Held:
        """The memo of one instance (an Engine is one instance; keyed by the object)."""
        h = self._held.get(engine)
        if h is None:
            h = self._held[engine] = {}
        return h

    def replace(self, engine: Engine, held: Held) -> None:
        self._held[engine] = held

    def __len__(self) -> int:
        return sum(len(h) for h in self._held.values())


def _parse_scan(keys: Sequence[bytes], raw: list, held: Mapping[bytes, tuple[bytes, Resource]]
                | None = None) -> tuple[int, dict[bytes, Resource], Held]:
    """The instance clock, the resources of a `scan` reply (layout: lua/scan.lua; absent
    resources left out, live locks only), and (stamp, Resource) of those decoded anew.
    `held` is what the caller sent stamps from: resources reported unchanged come from it.

    The locks come as one flat run of `_FIELDS` values each, in `Lock`'s field order, so
    they are read column by column (strided slices, `map` of C functions), and grouped into
    resources by runs of equal lock counts (`zip` of one iterator), not with a Python call
    per lock or per resource: at 10,000 resources per instance this is what keeps the
    client's share of a scan small. tests/detector checks that it reads what
    `codec.parse_inspect` reads."""
    n = len(keys)
    try:
        now, status = raw[0], raw[1]
        if not isinstance(status, bytes) or len(status) != n:
            raise ValueError(f"a status of {len(status)} bytes for {n} keys")
        if len(raw) == 2 and held is not None and status.count(_SAME) == n:
            # nothing changed (a detector's usual chunk): the caller's copies, in C loops
            return now, dict(zip(keys, map(_RESOURCE_OF, map(held.__getitem__, keys)))), {}
        plus = status.count(_PLUS)
        if plus + status.count(_SAME) + status.count(_GONE) != n:
            raise ValueError(f"unknown status in {status[:40]!r}")
        head = 2 + 3 * plus
        stamps, counts, names, body = raw[2:head:3], raw[3:head:3], raw[4:head:3], raw[head:]
        if len(names) != plus or len(body) != _FIELDS * sum(counts) or (
                counts and min(counts) < 0):
            raise ValueError(f"{len(raw)} values for {n} keys, {plus} of them read")
        d, f, mode = bytes.decode, _FIELDS, _MODE.__getitem__
        locks = map(_new_lock, zip(
            map(_QUEUE.__getitem__, body[0::f]), map(d, body[1::f]), map(d, body[2::f]),
            map(mode, body[3::f]), map(mode, body[4::f]), body[5::f], body[6::f],
            body[7::f], map(sub, body[8::f], repeat(now)), map(d, body[9::f]),
            body[10::f]))
        pkeys = list(compress(keys, map(_PLUS.__eq__, status)))
        fresh: list[Resource] = []
        at = 0
        for count, run in groupby(counts):  # resources with `count` locks each
            m = len(list(run))
            ks = pkeys[at:at + m]
            groups = islice(zip(*[locks] * count), m) if count else repeat((), m)
            fresh.extend(map(_new_resource, zip(ks, names[at:at + m], groups)))
            at += m
        if plus + status.count(_GONE) == n:
            out = dict(zip(pkeys, fresh))
        else:  # some are unchanged: the caller's copy stands (all in key order)
            if held is None:
                raise ValueError("'unchanged' for a resource the caller did not send")
            out = dict.fromkeys(compress(keys, map(_GONE.__ne__, status)))
            out.update(zip(pkeys, fresh))
            same = list(compress(keys, map(_SAME.__eq__, status)))
            out.update(zip(same, map(_RESOURCE_OF, map(held.__getitem__, same))))
        new: Held = dict(zip(pkeys, zip(stamps, fresh)))
    except (IndexError, KeyError, TypeError, ValueError, UnicodeDecodeError,
            AttributeError) as exc:
        raise ProtocolError(f"unexpected scan reply: {exc!r}") from exc
    return now, out, new


def _read_resources(engine: Engine, keys: list[bytes], held: Held | None = None,
                    keep: Held | None = None) -> dict[bytes, Resource]:
    """`keys`' resources on one instance, live locks only: `scan` calls of SCAN_CHUNK keys,
    all sent in one pipeline. With `held` (what earlier scans of this instance decoded),
    the script is sent its stamps and decodes only what changed (D1); what it read is
    recorded in `keep` (stamps and resources of every key read, unchanged ones included)."""
    chunks = [keys[i:i + SCAN_CHUNK] for i in range(0, len(keys), SCAN_CHUNK)]
    none = (b"",)
    pipe = engine.client.pipeline(transaction=False)
    calls = []
    for chunk in chunks:
        args = [] if not held else [held.get(k, none)[0] for k in chunk]
        calls.append(args)
        pipe.execute_command(*command("scan", [EPOCH_KEY, *chunk], args))
    replies = pipe.execute(raise_on_error=False)
    out: dict[bytes, Resource] = {}
    for chunk, args, raw in zip(chunks, calls, replies):
        if isinstance(raw, Exception):  # e.g. the library is missing: the careful path
            raw = call_script(engine.client, "scan", [EPOCH_KEY, *chunk], args)
        _, got, new = _parse_scan(chunk, raw, held)
        out.update(got)
        if keep is not None:
            if held:  # the unchanged ones: the entries they were answered from
                same = list(compress(chunk, map(_SAME.__eq__, raw[1])))
                keep.update(zip(same, map(held.__getitem__, same)))
            keep.update(new)
    return out


def _scan_one(engine: Engine, memo: ScanMemo | None = None) -> tuple[int, tuple, dict]:
    # The index is scored by lease expiry on the instance's own clock (test clocks
    # included), so "still alive" is asked of that clock, not ours. (Members only: scores
    # would cost more to convert than the whole read.)
    now = engine.status().now_ms
    members = engine.client.zrangebyscore(engine.wkey, f"({now}", "+inf")
    waiters = _split_members(members)
    keys = list(dict.fromkeys(key for _, key in waiters))  # a resource is read once
    if memo is None:
        return now, waiters, _read_resources(engine, keys) if keys else {}
    keep: Held = {}
    got = _read_resources(engine, keys, memo.held(engine), keep) if keys else {}
    memo.replace(engine, keep)  # a full scan: only what it read is worth keeping
    memo.members[engine] = set(members)
    return now, waiters, got


def scan(engines: Sequence[Engine | Target], *, executor: Executor | None = None,
         memo: ScanMemo | None = None) -> Snapshot:
    """D1: read every instance's waiter index (entries whose lease has not run out on that
    instance's clock), then read the distinct resources it names (lua/scan.lua: live locks
    only), in chunks sent in one pipeline per instance. Never KEYS or SCAN. Instances are
    read in parallel; one that fails shows as an `InstanceScan` with `error`. With `memo`
    (kept from scan to scan), only the resources that changed since are decoded and sent:
    the snapshot is the same, cheaper."""
    targets = [t if isinstance(t, Target) else Target(label_of(t), t) for t in engines]
    with _gc_paused():
        return _snapshot(fan_out(targets, partial(_scan_one, memo=memo), executor=executor))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a scan builds its records: ~100,000
    tuples per instance at 10,000 waiters, none of them in a reference cycle. Left on, the
    collector runs every few hundred of them and walks the growing snapshot again and
    again (about a third of the client's CPU in a scan, benchmarks/detector.py); paused,
    it catches up in one pass afterwards. Memory is still freed as usual (reference
    counts). If the collector is already off (another scan, or the application), it is
    left as it is."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _snapshot(outcomes: Sequence[Outcome]) -> Snapshot:
    return Snapshot(tuple(
        InstanceScan(o.label, *o.value) if o.ok else InstanceScan(o.label, error=o.error)
        for o in outcomes))


# ----------------------------------------------------------------- D2-D5: the graph


class Request(NamedTuple):
    """A waiting request or a queued conversion: what a victim is made of."""

    key: bytes
    lock_id: str
    owner: str
    queue: str  #: 'W' waiting, 'C' converting
    granted: Mode | None  #: a conversion's current mode; None for a new request
    requested: Mode
    ticket: int  #: its place in the queue: the ticket, or the conversion ticket
    flags: int
    parent: str  #: parent lock id, '' for a root lock
    path: tuple[bytes, ...]
    priority: int = 0  #: P1: the lowest is the first victim (D8)

    @property
    def no_deadlock_wait(self) -> bool:
        return bool(self.flags & Flag.NODLCKWT)

    @property
    def parent_key(self) -> bytes | None:
        return parent_key(self.key) if self.parent else None

    @classmethod
    def of(cls, view: Resource | ResourceView, lk: Lock | LockView) -> Request:
        return cls._make((view.key, lk.lock_id, lk.owner, lk.queue, lk.mode, lk.requested,
                          lk.cticket if lk.queue == "C" else lk.ticket, lk.flags, lk.parent,
                          view.path, lk.priority))


class Edge(NamedTuple):
    """Owner `waiter` waits for owner `holder`: its lock `lock_id` on `key` cannot be granted
    before `blocker_id` (of `holder`) is released or granted (D2-D4)."""

    waiter: str
    holder: str
    key: bytes
    lock_id: str
    blocker_id: str
    instances: tuple[int, ...]  #: the instances where the edge holds

    @property
    def ident(self) -> tuple[bytes, str, str]:
        return (self.key, self.lock_id, self.blocker_id)


@dataclass(frozen=True)
class WaitForGraph:
    edges: tuple[Edge, ...]
    requests: Mapping[tuple[bytes, str], Request]  #: (key, lock id) -> the waiting request

    @cached_property
    def adjacency(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {}
        for e in self.edges:
            succ = adj.get(e[0])
            if succ is None:
                adj[e[0]] = {e[1]}
            else:
                succ.add(e[1])
        for e in self.edges:
            if e[1] not in adj:
                adj[e[1]] = set()
        return adj

    @property
    def owners(self) -> list[str]:
        return sorted(self.adjacency)


_COMPAT = COMPAT


def _blockers(locks: Sequence[Lock | LockView]) -> list[tuple[Lock | LockView, set[str]]]:
    """D2-D4 on one resource of one instance: each waiting or converting lock, with the ids
    of the locks it waits for.

    `locks` are the live locks in inspect/scan order (granted, then each queue in ticket
    order). Incompatible locks are waited for directly. A compatible lock ahead in a queue (every
    queued conversion for a new request, G8; an earlier waiter, G8 no barging; an earlier
    conversion for a QUECVT one, G5) is waited for only until it is granted: what it waits
    for is inherited instead, so its owner is not accused."""
    holding, conv, wait = [], [], []
    for lk in locks:
        if lk.queue == "W":
            wait.append(lk)
        else:
            holding.append(lk)
            if lk.queue == "C":
                conv.append(lk)
    out: list[tuple[Lock | LockView, set[str]]] = []
    by_id: dict[str, set[str]] = {}

    def behind(lk: Lock | LockView, ahead: Sequence[Lock | LockView], b: set[str]) -> None:
        row = lk.requested
        for a in ahead:
            if not _COMPAT[a.requested][row]:
                b.add(a.lock_id)
            else:
                b |= by_id[a.lock_id]

    for i, c in enumerate(conv):  # D2: held modes block an up-conversion (G5)
        rq = c.requested
        b = {h.lock_id for h in holding if h is not c and not _COMPAT[h.mode][rq]}
        if c.flags & Flag.QUECVT:  # D4: a QUECVT conversion waits to be first (G5)
            behind(c, conv[:i], b)
        by_id[c.lock_id] = b
        out.append((c, b))
    for i, w in enumerate(wait):
        rq = w.requested
        b = {h.lock_id for h in holding if not _COMPAT[h.mode][rq]}  # D2
        if conv:
            behind(w, conv, b)  # D3: no new request while a conversion is queued (G8)
        if i:
            behind(w, wait[:i], b)  # D3: no barging past an earlier waiter (G8)
        by_id[w.lock_id] = b
        out.append((w, b))
    return out


def _layouts(per: list[tuple[int, Resource | ResourceView]]
             ) -> list[tuple[int, tuple, Resource | ResourceView]]:
    """One resource's live locks, grouped by instances that agree on its layout (queue,
    lock, modes, flags in order; leases differ by clock): (instance bitmask, live locks,
    a view). Instances of a quorum usually agree, so D2-D4 run once, not once per
    instance."""
    groups: dict[tuple, list] = {}
    for i, view in per:
        live = tuple(lk for lk in view.locks if lk.lease_left_ms > 0)
        sig = tuple([(lk.queue, lk.lock_id, lk.mode, lk.requested, lk.flags) for lk in live])
        g = groups.get(sig)
        if g is None:
            groups[sig] = [1 << i, live, view]
        else:
            g[0] |= 1 << i
    return [(m, live, view) for m, live, view in groups.values()]


#: Per resource key: (quorum, the instances' views it was computed from, its edges, its
#: waiting requests). See `wait_for_graph`.
GraphMemo = dict


def _resource_edges(key: bytes, per: list[tuple[int, Resource | ResourceView]], q: int
                    ) -> tuple[tuple[Edge, ...], dict[tuple[bytes, str], Request]]:
    """D2-D5 on one resource, merged over the instances that show it (`per`)."""
    layouts = _layouts(per)
    granted: dict[tuple[str, Mode | None], int] | None = None
    if len(layouts) > 1:  # D5 can only apply where the instances disagree
        granted = {}
        for mask, live, _ in layouts:
            on = bin(mask).count("1")
            for lk in live:
                if lk.queue == "G":
                    k = (lk.lock_id, lk.mode)
                    granted[k] = granted.get(k, 0) + on
    merged: dict[tuple[str, str], list] = {}  # (lock id, blocker id) -> [waiter, holder, mask]
    requests: dict[tuple[bytes, str], Request] = {}
    for mask, live, view in layouts:
        if len(live) < 2:
            continue
        owner_of = {lk.lock_id: lk.owner for lk in live}
        holds = {lk.lock_id for lk in live if lk.queue != "W"}
        for lk, blockers in _blockers(live):
            if not blockers:
                continue
            if granted is not None and granted.get((lk.lock_id, lk.requested), 0) >= q:
                continue  # D5
            owner, lid = lk.owner, lk.lock_id
            for bid in blockers:
                holder = owner_of[bid]
                if holder == owner and bid not in holds:
                    continue  # its own earlier request: waited for only until granted
                entry = merged.get((lid, bid))
                if entry is None:
                    merged[(lid, bid)] = [owner, holder, mask]
                    if (key, lid) not in requests:
                        requests[(key, lid)] = Request.of(view, lk)
                else:
                    entry[2] |= mask
    if not merged:
        return (), requests
    make = Edge._make
    return tuple(make((w, h, key, lid, bid, _instances(m)))
                 for (lid, bid), (w, h, m) in merged.items()), requests


@cache
def _instances(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


def wait_for_graph(snapshot: Snapshot, *, memo: GraphMemo | None = None) -> WaitForGraph:
    """D2-D5: the wait-for graph between owners, merged over every instance.

    An edge W -> H exists when some waiting or converting lock of W, on some instance,
    waits for a lock of H (D2-D4). Locks whose lease ran out are ignored (the scripts purge
    them before any decision, G10). A request already granted on a quorum of instances is
    held, so where it still queues (a minority) it waits for nobody (D5); it may still be
    waited for. An owner waiting for a lock it holds itself (granted, or converting with its
    granted mode) is an edge from the owner to itself: a one-owner cycle (D6); its own
    earlier request is waited for only until granted, as any compatible one ahead (D3).
    Merging instances is what makes a split vote that survives show up as a cycle.

    A resource's edges depend on that resource's views only. With `memo` (a dict the
    caller keeps from round to round; the `Detector` does), a resource whose views are the
    very objects of the previous call (a `scan` with a `ScanMemo` hands back unchanged
    resources as they were) keeps the edges computed then; the memo is then replaced by
    this call's resources."""
    q = snapshot.quorum
    by_key: dict[bytes, list[tuple[int, Resource | ResourceView]]] = {}
    for i, inst in enumerate(snapshot.instances):
        for key, view in inst.resources.items():
            per = by_key.get(key)
            if per is None:
                by_key[key] = [(i, view)]
            else:
                per.append((i, view))
    edges: list[Edge] = []
    requests: dict[tuple[bytes, str], Request] = {}
    old = memo if memo is not None else {}
    new: GraphMemo = {}
    for key, per in by_key.items():
        hit = old.get(key)
        if (hit is not None and hit[0] == q and len(hit[1]) == len(per)
                and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(hit[1], per))):
            ek, rk = hit[2], hit[3]
        else:
            ek, rk = _resource_edges(key, per, q)
        if memo is not None:
            new[key] = (q, per, ek, rk)
        if ek:
            edges.extend(ek)
            requests.update(rk)
    if memo is not None:
        memo.clear()
        memo.update(new)
    return WaitForGraph(tuple(edges), requests)


# ----------------------------------------------------------------- D6: cycles


@dataclass(frozen=True)
class Cycle:
    """A set of owners that all wait for each other (a strongly connected component).

    `owners` is sorted; `path` is one shortest cycle through the first owner, for people.
    `signature` names the exact locks involved: two scans show "the same cycle" (D7) when
    every lock pair of the earlier one is still there."""

    owners: tuple[str, ...]
    path: tuple[str, ...]
    edges: tuple[Edge, ...]
    requests: tuple[Request, ...]

    @property
    def signature(self) -> frozenset[tuple[bytes, str, str]]:
        return frozenset(e.ident for e in self.edges)


def _tarjan(adj: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components, iteratively (no recursion limit on big graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(adj):
        if root in index:
            continue
        work = [(root, iter(sorted(adj[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(adj.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def _shortest_cycle(start: str, adj: Mapping[str, set[str]], members: set[str]) -> list[str]:
    prev: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(adj.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def _cyclic_core(adj: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """The graph without every owner that cannot be on a cycle: peel, repeatedly, owners
    nobody waits for and owners who wait for nobody (most of a busy graph: holders that
    wait for nothing and waiters nobody waits for), so Tarjan only walks what is left."""
    sub = {v: {w for w in ws if adj[w]} for v, ws in adj.items() if ws}  # no sinks
    preds: dict[str, set[str]] = {v: set() for v in sub}
    for v, ws in sub.items():
        for w in ws:
            preds[w].add(v)
    out_deg = {v: len(ws) for v, ws in sub.items()}
    in_deg = {v: len(p) for v, p in preds.items()}
    alive = set(sub)
    stack = [v for v in sub if not out_deg[v] or not in_deg[v]]
    while stack:
        v = stack.pop()
        if v not in alive:
            continue
        alive.discard(v)
        for w in sub[v]:
            if w in alive:
                in_deg[w] -= 1
                if not in_deg[w]:
                    stack.append(w)
        for u in preds[v]:
            if u in alive:
                out_deg[u] -= 1
                if not out_deg[u]:
                    stack.append(u)
    return {v: sub[v] & alive for v in alive}


def _may_cycle(edges: Sequence[Edge]) -> dict[str, set[str]]:
    """The adjacency of the owners that may be on a cycle: an owner on a cycle both waits
    and is waited for, so a few rounds of set intersections (loops in C) drop, at once,
    the many owners of a busy graph that only hold or only wait (the whole graph of
    10,000 one-holder one-waiter resources); `_cyclic_core` peels what is left."""
    pairs = set(zip(map(_ITEM0, edges), map(_ITEM1, edges)))
    for _ in range(4):
        both = set(map(_ITEM0, pairs)) & set(map(_ITEM1, pairs))
        kept = {p for p in pairs if p[0] in both and p[1] in both}
        if len(kept) == len(pairs):
            break
        pairs = kept
    adj: dict[str, set[str]] = {}
    for w, h in pairs:
        succ = adj.get(w)
        if succ is None:
            adj[w] = {h}
        else:
            succ.add(h)
    for _, h in pairs:
        if h not in adj:
            adj[h] = set()
    return adj


def find_cycles(graph: WaitForGraph) -> list[Cycle]:
    """D6: every group of two or more owners that wait for each other (Tarjan's SCC), and
    every owner that waits for a lock it holds itself, with the edges and waiting requests
    inside the group. Sorted by owners."""
    core = _cyclic_core(_may_cycle(graph.edges))
    if not core:
        return []
    by_waiter: dict[str, list[Edge]] = {}
    for e in graph.edges:
        if e.waiter in core:
            by_waiter.setdefault(e.waiter, []).append(e)
    out = []
    for comp in _tarjan(core):
        if len(comp) < 2 and comp[0] not in core[comp[0]]:
            continue  # one owner, not waiting for itself
        members = set(comp)
        edges = tuple(e for w in sorted(comp) for e in by_waiter.get(w, ())
                      if e.holder in members)
        reqs = {(e.key, e.lock_id): graph.requests[(e.key, e.lock_id)] for e in edges}
        owners = tuple(sorted(comp))
        out.append(Cycle(owners, tuple(_shortest_cycle(owners[0], core, members)), edges,
                         tuple(sorted(reqs.values(), key=lambda r: (r.ticket, r.lock_id)))))
    out.sort(key=lambda c: c.owners)
    return out


# ----------------------------------------------------------------- D8: the victim


def choose_victim(cycle: Cycle, snapshot: Snapshot, *,
                  eligible: Container[tuple[bytes, str]] | None = None) -> Request | None:
    """D8: among the cycle's waiting requests, the one of lowest priority (P1); among
    equals, the youngest (highest ticket; ties by lock id). Never one that asked not to be
    chosen (NODLCKWT, on any instance's view). `eligible` narrows the choice to (key, lock
    id) pairs (the detector passes those seen on both scans). None when no request may be
    chosen."""
    best = None
    for req in cycle.requests:
        if eligible is not None and (req.key, req.lock_id) not in eligible:
            continue
        views = snapshot.views_of(req.key, req.lock_id)
        if req.no_deadlock_wait or any(lk.flags & Flag.NODLCKWT for _, lk in views):
            continue
        if best is None or ((-req.priority, req.ticket, req.lock_id)
                            > (-best.priority, best.ticket, best.lock_id)):
            best = req
    return best


# ----------------------------------------------------------------- D9: reaping


@dataclass(frozen=True)
class ReapResult:
    """What `reap` did on one instance."""

    stale: int = 0  #: index entries whose lease ran out more than `grace_ms` ago
    purged: int = 0  #: resources whose expired locks a script call purged (G10)
    removed: int = 0  #: entries removed by ZREM (their lock or resource was already gone)
    live: int = 0  #: entries left alone: the lock's lease is still running


def _zrem_if_unchanged(client: redis.Redis, wkey: bytes, member: bytes, score: float) -> bool:
    """Remove an index entry only if nobody re-added it meanwhile (same score)."""
    with client.pipeline(transaction=True) as p:
        try:
            p.watch(wkey)
            if p.zscore(wkey, member) != score:
                return False
            p.multi()
            p.zrem(wkey, member)
            return bool(p.execute()[0])
        except redis.WatchError:
            return False  # the index changed under us: try again next time


def reap(engine: Engine, *, grace_ms: int = 5_000, limit: int = 1_000) -> ReapResult:
    """D9: clear up to `limit` waiter-index entries whose lease ran out more than
    `grace_ms` ago (instance clock).

    A lock whose lease ran out is dead for good (no script renews it); it only lingers until
    the next script call on its resource purges it (G10). For each stale entry: if its lock
    is still stored with a run-out lease, a `cancel` call on the resource purges it (the
    purge also drops its index entry, and the cancel itself then finds nothing, NOTFOUND);
    if the lock or the whole resource is gone, the entry is removed with ZREM, unless it was
    re-added meanwhile. A lock whose lease is still running is never touched."""
    now = engine.status().now_ms
    raw = engine.client.zrangebyscore(engine.wkey, "-inf", now - grace_ms, withscores=True,
                                      start=0, num=limit)
    if not raw:
        return ReapResult()
    entries = [(member, score, *_split_member(member)) for member, score in raw]
    keys = list(dict.fromkeys(key for *_, key in entries))
    _, views = engine.inspect(keys)
    by_key = dict(zip(keys, views))
    purged: set[bytes] = set()
    removed = live = 0
    for member, score, lock_id, key in entries:
        view = by_key[key]
        lk = next((x for x in view.locks if x.lock_id == lock_id), None) if view else None
        if lk is not None and lk.lease_left_ms > 0:
            live += 1
            continue
        if lk is not None and key not in purged:
            engine.cancel(key, lk.owner, lock_id, parent_key=parent_key(key) if lk.parent
                          else None, reason="cancel")
            purged.add(key)
        if _zrem_if_unchanged(engine.client, engine.wkey, member, score):
            removed += 1
    return ReapResult(len(entries), len(purged), removed, live)


# ----------------------------------------------------------------- the job


@dataclass(frozen=True)
class Victim:
    request: Request
    cycle: Cycle
    outcomes: tuple[Outcome, ...]  #: per instance: the cancel's Status, or an error

    @property
    def cancelled_on(self) -> int:
        return sum(1 for o in self.outcomes if o.ok and o.value is Status.CANCELLED)


@dataclass(frozen=True)
class Round:
    """What one `run_once` saw and did."""

    number: int
    leader: bool
    snapshot: Snapshot | None = None
    cycles: tuple[Cycle, ...] = ()  #: every cycle seen on this scan
    confirmed: tuple[Cycle, ...] = ()  #: seen on the previous scan as well (D7)
    victims: tuple[Victim, ...] = ()
    unresolved: tuple[Cycle, ...] = ()  #: confirmed, but every request is NODLCKWT
    pending: tuple[Cycle, ...] = ()  #: seen for the first time: to confirm next round
    reaped: tuple[Outcome, ...] = ()  #: per instance ReapResult, on reaping rounds
    elapsed_ms: float = 0.0
    read_at: float = 0.0  #: time.monotonic() when its reads were done (0: nothing read)


def _kv(event: str, **fields: object) -> str:
    """A structured log line: event=... key=value ..., values quoted when needed."""
    parts = [f"event={event}"]
    for k, v in fields.items():
        s = v if isinstance(v, str) else (v.decode("utf-8", "backslashreplace")
                                          if isinstance(v, bytes) else str(v))
        if not s or any(c in s for c in ' ="\\\x00'):
            s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", "\\0") + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)


class Detector:
    """The scheduled deadlock-detector job over a set of instances.

    `targets`: redis URLs (connected with `admin.connect`), Engines or admin Targets.
    `leader`: called before every round; when it returns False this process stands by
    (nothing is scanned or cancelled, and cycles seen so far are forgotten, so a new
    leader confirms them itself). None: always lead.
    After a round that saw a new cycle, `confirm_after_s` later (default: half the
    interval) a confirming round re-reads only that cycle's resources (D7), so a deadlock
    is resolved about one and a half intervals after it forms whatever the number of
    waiters, and a transient state still has half an interval to clear.
    Every `reap_every` rounds (0: never) stale index entries are reaped (D9)."""

    def __init__(self, targets: Sequence[str | Engine | Target], namespace: str = "default",
                 interval_s: float = 1.0, *, leader: Callable[[], bool] | None = None,
                 confirm_after_s: float | None = None, timeout_s: float = 2.0,
                 reap_every: int = 20, reap_grace_ms: int = 5_000,
                 watch_every_s: float | None = None,
                 logger: logging.Logger | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if watch_every_s is not None and watch_every_s < 0:
            raise ValueError("watch_every_s must be >= 0 (0: no watch rounds)")
        urls = [t for t in targets if isinstance(t, str)]
        if urls and len(urls) != len(targets):
            raise ValueError("give either URLs or Engines, not both")
        if urls:
            self.targets = connect(urls, namespace, timeout_s=timeout_s)
        else:
            self.targets = [t if isinstance(t, Target) else Target(label_of(t), t)
                            for t in targets]
        if not self.targets:
            raise ValueError("a detector needs at least one instance")
        self.interval_s = interval_s
        #: D7: the pause before the confirming scan, after a round that saw a new cycle.
        self.confirm_after_s = interval_s / 2 if confirm_after_s is None else confirm_after_s
        #: D7: between full rounds, how often `run_forever` watches the waiter indexes.
        self.watch_every_s = interval_s / 4 if watch_every_s is None else watch_every_s
        self.leader = leader
        self.reap_every = reap_every
        self.reap_grace_ms = reap_grace_ms
        self.log = logger or log
        self.rounds = 0
        self._previous: list[Cycle] = []  # cycles of the previous scan not acted upon
        self._reported: set[frozenset] = set()  # victimless cycles already logged
        self._memo = ScanMemo()  # D1: what the last scans decoded, per instance
        self._graph: GraphMemo = {}  # the edges of the last full round, per resource
        self._base: Snapshot | None = None  # the last full snapshot, with what watches read
        self._pool = ThreadPoolExecutor(max_workers=len(self.targets),
                                        thread_name_prefix="dlm-detector")

    # ------------------------------------------------------------- one round

    def run_once(self) -> Round:
        """A full round: scan everything, confirm (D7), cancel one victim per confirmed
        cycle (D8); reap when it is time (D9)."""
        return self._round(full=True)

    def confirm_pending(self) -> Round:
        """A confirming round (D7): re-read only the resources of the cycles the previous
        round saw, on every instance. A cycle's edges come from its own resources only
        (D2-D4), so this checks the same lock pairs as a full scan would, at a cost that
        does not grow with the number of waiters. Nothing pending: an empty round."""
        return self._round(full=False)

    def watch(self) -> Round:
        """A watch round (D7), between full rounds: read only the waiter index of every
        instance; if it names waiting requests (or conversions) that the last read did not,
        read their resources, on every instance, and look for cycles in the last full
        snapshot updated with them. A new wait edge nearly always comes with a new index
        entry (a request or conversion queued, a yield), so a cycle that formed since the
        last scan is usually seen now, at the cost of the indexes and a few resources, not
        of a full scan (one closed by an up-conversion granted at once, which blocks a
        waiter without a new entry, waits for the next full round). Cycles found are only
        *pending*: the rest of the snapshot may be stale, so nothing is confirmed or
        cancelled here; a confirming round (fresh reads of the cycle's resources) decides
        (D7). Without a full round as leader before it: an empty round."""
        t0 = time.perf_counter()
        base = self._base
        if base is None:
            return Round(self.rounds, False)
        memo = self._memo

        def fresh(e: Engine) -> list[bytes]:
            now = e.status().now_ms
            members = set(e.client.zrangebyscore(e.wkey, f"({now}", "+inf"))
            new = members - memo.members.get(e, set())
            memo.members[e] = members
            return [m.partition(b"|")[2] for m in new]

        with _gc_paused():
            found = fan_out(self.targets, fresh, executor=self._pool)
            keys = list(dict.fromkeys(k for o in found if o.ok for k in o.value))
            if not keys:
                return Round(self.rounds, True, elapsed_ms=(time.perf_counter() - t0) * 1000)
            got = self._read(keys)
            read_at = time.monotonic()
            insts = []
            for old, new in zip(base.instances, got.instances):
                if not new.ok:
                    insts.append(old)
                elif not old.ok:
                    insts.append(new)
                else:
                    insts.append(InstanceScan(old.label, old.now_ms, old.waiters,
                                              {**old.resources, **new.resources}))
            snap = self._base = Snapshot(tuple(insts))
            cycles = find_cycles(wait_for_graph(snap, memo=self._graph))
        pending = [c for c in cycles
                   if not any(p.signature <= c.signature for p in self._previous)]
        for cyc in pending:
            self.log.info(_kv("cycle-seen", round=self.rounds, owners=",".join(cyc.owners),
                              by="watch"))
        self._previous.extend(pending)
        elapsed = (time.perf_counter() - t0) * 1000
        self.log.log(logging.INFO if pending else logging.DEBUG,
                     _kv("watch", round=self.rounds, resources=len(keys),
                         cycles=len(cycles), pending=len(pending), ms=f"{elapsed:.1f}"))
        return Round(self.rounds, True, snap, cycles=tuple(cycles), pending=tuple(pending),
                     elapsed_ms=elapsed, read_at=read_at)

    def _round(self, *, full: bool) -> Round:
        t0 = time.perf_counter()
        self.rounds += 1
        n = self.rounds
        if self.leader is not None and not self.leader():
            if self._previous:
                self.log.info(_kv("standby", round=n, forgotten=len(self._previous)))
            self._previous = []
            self._base = None
            return Round(n, False, elapsed_ms=(time.perf_counter() - t0) * 1000)
        with _gc_paused():  # (the scan's tuples, then the graph's: see _gc_paused)
            if full:
                snap = self._base = scan(self.targets, executor=self._pool, memo=self._memo)
            else:
                keys = list(dict.fromkeys(e.key for c in self._previous for e in c.edges))
                snap = self._read(keys)
            read_at = time.monotonic()
            # (a partial read would shrink the memo to its few resources: not given it)
            cycles = find_cycles(wait_for_graph(snap, memo=self._graph if full else None))
        for inst in snap.instances:
            if not inst.ok:
                self.log.warning(_kv("unreachable", round=n, instance=inst.label,
                                     error=inst.error))
        confirmed, victims, unresolved, first_seen, remember = [], [], [], [], []
        for cyc in cycles:
            earlier = next((p for p in self._previous if p.signature <= cyc.signature), None)
            if earlier is None:
                first_seen.append(cyc)  # D7: seen once; punish nothing yet
                remember.append(cyc)
                self.log.info(_kv("cycle-seen", round=n, owners=",".join(cyc.owners)))
                continue
            confirmed.append(cyc)
            seen_twice = {(e.key, e.lock_id) for e in earlier.edges}
            victim = choose_victim(cyc, snap, eligible=seen_twice)
            if victim is None:
                unresolved.append(cyc)
                remember.append(cyc)  # stays confirmed: if it grows, a victim may appear
                if cyc.signature not in self._reported:
                    self._reported.add(cyc.signature)
                    self.log.warning(_kv("no-victim", round=n, owners=",".join(cyc.owners),
                                         reason="every request is NODLCKWT"))
                continue
            victims.append(self._cancel(n, victim, cyc))
        self._previous = remember
        reaped: tuple[Outcome, ...] = ()
        if full and self.reap_every and n % self.reap_every == 0:
            reaped = tuple(self.reap())
        elapsed = (time.perf_counter() - t0) * 1000
        rnd = Round(n, True, snap, cycles=tuple(cycles), confirmed=tuple(confirmed),
                    victims=tuple(victims), unresolved=tuple(unresolved),
                    pending=tuple(first_seen), reaped=reaped, elapsed_ms=elapsed,
                    read_at=read_at)
        level = logging.INFO if (cycles or reaped or not full) else logging.DEBUG
        self.log.log(level, _kv("round" if full else "confirm", round=n,
                                reachable=f"{snap.reachable}/{len(snap.instances)}",
                                waiters=snap.waiter_count, cycles=len(cycles),
                                confirmed=len(confirmed), victims=len(victims),
                                ms=f"{elapsed:.1f}"))
        return rnd

    def _read(self, keys: list[bytes]) -> Snapshot:
        """Only `keys`, on every instance (no index read: the waiters are in the views)."""
        def one(e: Engine) -> tuple[int, tuple, dict]:
            held = self._memo.held(e)
            return 0, (), _read_resources(e, keys, held, held) if keys else {}
        return _snapshot(fan_out(self.targets, one, executor=self._pool))

    def _cancel(self, n: int, req: Request, cyc: Cycle) -> Victim:
        """D8: cancel the victim's request on EVERY instance (where it is granted the script
        answers CANCELGRANT and changes nothing; where it is absent, NOTFOUND)."""
        outcomes = tuple(fan_out(self.targets, lambda e: e.cancel(
            req.key, req.owner, req.lock_id, parent_key=req.parent_key, reason="deadlock",
            notify=True).status, executor=self._pool))
        v = Victim(req, cyc, outcomes)
        self.log.warning(_kv("victim", round=n, owner=req.owner, lock=req.lock_id,
                             resource=show_name(req.path), ticket=req.ticket,
                             priority=req.priority,
                             mode=req.requested.name, cycle="->".join(cyc.path + cyc.path[:1]),
                             cancelled=f"{v.cancelled_on}/{len(outcomes)}"))
        for o in outcomes:
            if not o.ok:
                self.log.warning(_kv("cancel-failed", round=n, instance=o.label,
                                     lock=req.lock_id, error=o.error))
        return v

    def reap(self) -> list[Outcome]:
        """D9 on every instance; logs what it cleared."""
        outcomes = fan_out(self.targets, lambda e: reap(e, grace_ms=self.reap_grace_ms),
                           executor=self._pool)
        for o in outcomes:
            if o.ok and o.value.stale:
                r = o.value
                self.log.info(_kv("reaped", instance=o.label, stale=r.stale, purged=r.purged,
                                  removed=r.removed, live=r.live))
            elif not o.ok:
                self.log.warning(_kv("reap-failed", instance=o.label, error=o.error))
        return outcomes

    # ------------------------------------------------------------- the loop

    def run_forever(self, stop: threading.Event, *, max_rounds: int | None = None) -> int:
        """Run a full round every `interval_s` until `stop` is set or `max_rounds` full
        rounds ran; in between, a watch round (`watch`) every `watch_every_s`; and a
        confirming round `confirm_after_s` after the reads of any round that saw a new
        cycle (D7). A round that fails unexpectedly is logged and the loop goes on. Returns
        the number of full rounds run."""
        self.log.info(_kv("start", instances=",".join(t.label for t in self.targets),
                          interval_s=self.interval_s, watch_every_s=self.watch_every_s,
                          leader="hook" if self.leader else "always"))
        done = 0
        while not stop.is_set() and (max_rounds is None or done < max_rounds):
            t0 = time.monotonic()
            try:
                self._confirm_later(stop, self.run_once())
            except Exception as exc:  # keep the job alive; the next round starts afresh
                self.log.error(_kv("round-failed", round=self.rounds,
                                   error=describe_error(exc)))
            done += 1
            if max_rounds is not None and done >= max_rounds:
                break
            while self.watch_every_s and not stop.is_set():
                if time.monotonic() + self.watch_every_s >= t0 + self.interval_s:
                    break
                if stop.wait(self.watch_every_s):
                    break
                try:
                    self._confirm_later(stop, self.watch())
                except Exception as exc:
                    self.log.error(_kv("round-failed", round=self.rounds, watch=1,
                                       error=describe_error(exc)))
            stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))
        self.log.info(_kv("stop", rounds=done))
        return done

    def _confirm_later(self, stop: threading.Event, rnd: Round) -> None:
        """D7: after a round that saw a new cycle, look again at those locks only,
        confirm_after_s after it read them (every resource is then read again at least
        that late)."""
        if rnd.pending and not stop.wait(
                max(0.0, rnd.read_at + self.confirm_after_s - time.monotonic())):
            self.confirm_pending()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
