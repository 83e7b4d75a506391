"""The deadlock detector (DESIGN section 6; rules D1-D9 in docs/detector.md).

A pipeline of pure steps, then one job that runs them on a schedule::

    snap = scan(engines)               # read-only: waiter index + inspect, instances in parallel
    graph = wait_for_graph(snap)       # owners, and who waits for whom (D2-D5)
    cycles = find_cycles(graph)        # Tarjan's strongly connected components (D6)
    victim = choose_victim(cycle, snap)  # youngest ticket, NODLCKWT never (D8)

    Detector(urls, "shop", interval_s=0.5).run_forever(stop_event)

`Detector.run_once` confirms a cycle only when the same locks deadlock on two consecutive
scans (D7), so a state that only looks like a cycle for a moment (a split vote being
yielded, a grant in flight) is never punished; it then cancels the victim's waiting request
on every instance with reason ``deadlock``, which publishes ``C|<id>|deadlock`` to the
victim's owner; its client raises `Deadlock`. `reap` clears waiter-index entries whose
lease ran out (D9).

Only one detector should act at a time: pass `leader`, a callable that says whether this
process leads (e.g. holds a lock of this DLM); without it the detector always acts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Container, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

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
from .engine.instance import Engine
from .engine.modes import Flag, Mode, Status, compatible

log = logging.getLogger("redlockdlm.detector")

__all__ = [
    "Cycle",
    "Detector",
    "Edge",
    "InstanceScan",
    "ReapResult",
    "Request",
    "Round",
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


@dataclass(frozen=True)
class InstanceScan:
    """What one instance showed: its live waiter-index entries and their resources."""

    label: str
    now_ms: int = 0  #: the instance's clock (ms) when its index was read
    waiters: tuple[tuple[str, bytes, int], ...] = ()  #: (lock id, resource key, lease expiry)
    resources: Mapping[bytes, ResourceView] = field(default_factory=dict)
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

    def views_of(self, key: bytes, lock_id: str) -> list[tuple[int, LockView]]:
        """Every instance's view of one lock: (instance index, view)."""
        out = []
        for i, inst in enumerate(self.instances):
            res = inst.resources.get(key)
            if res is not None:
                out.extend((i, lk) for lk in res.locks if lk.lock_id == lock_id)
        return out


def _split_member(member: bytes) -> tuple[str, bytes]:
    lock_id, _, key = member.partition(b"|")  # ids never contain '|'; names may
    return lock_id.decode(), key


def _scan_one(engine: Engine) -> tuple[int, tuple, dict]:
    # The index is scored by lease expiry on the instance's own clock (test clocks
    # included), so "still alive" is asked of that clock, not ours.
    now = engine.status().now_ms
    raw = engine.client.zrangebyscore(engine.wkey, f"({now}", "+inf", withscores=True)
    waiters = []
    keys: dict[bytes, None] = {}
    for member, score in raw:
        lock_id, key = _split_member(member)
        waiters.append((lock_id, key, int(score)))
        keys[key] = None
    resources: dict[bytes, ResourceView] = {}
    if keys:
        _, views = engine.inspect(list(keys))  # one call for every resource of the index
        resources = {v.key: v for v in views if v is not None}
    return now, tuple(waiters), resources


def scan(engines: Sequence[Engine | Target], *, executor: Executor | None = None) -> Snapshot:
    """D1: read every instance's waiter index (entries whose lease has not run out on that
    instance's clock), then inspect the distinct resources it names in ONE call per
    instance. Never KEYS or SCAN. Instances are read in parallel; one that fails shows as
    an `InstanceScan` with `error`."""
    targets = [t if isinstance(t, Target) else Target(label_of(t), t) for t in engines]
    outcomes = fan_out(targets, _scan_one, executor=executor)
    return Snapshot(tuple(
        InstanceScan(o.label, *o.value) if o.ok else InstanceScan(o.label, error=o.error)
        for o in outcomes))


# ----------------------------------------------------------------- D2-D5: the graph


@dataclass(frozen=True)
class Request:
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

    @property
    def no_deadlock_wait(self) -> bool:
        return bool(self.flags & Flag.NODLCKWT)

    @property
    def parent_key(self) -> bytes | None:
        return parent_key(self.key) if self.parent else None

    @classmethod
    def of(cls, view: ResourceView, lk: LockView) -> Request:
        return cls(view.key, lk.lock_id, lk.owner, lk.queue, lk.mode, lk.requested,
                   lk.cticket if lk.queue == "C" else lk.ticket, lk.flags, lk.parent,
                   view.path)


@dataclass(frozen=True)
class Edge:
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

    @property
    def adjacency(self) -> dict[str, set[str]]:
        adj: dict[str, set[str]] = {}
        for e in self.edges:
            adj.setdefault(e.waiter, set()).add(e.holder)
            adj.setdefault(e.holder, set())
        return adj

    @property
    def owners(self) -> list[str]:
        return sorted(self.adjacency)


def _blockers(locks: Sequence[LockView]) -> dict[str, set[str]]:
    """D2-D4 on one resource of one instance: lock id -> ids of the locks it waits for.

    `locks` are the live locks in inspect order (granted, then each queue in ticket order).
    Incompatible locks are waited for directly. A compatible lock ahead in a queue (every
    queued conversion for a new request, G8; an earlier waiter, G8 no barging; an earlier
    conversion for a QUECVT one, G5) is waited for only until it is granted: what it waits
    for is inherited instead, so its owner is not accused."""
    holding = [lk for lk in locks if lk.queue in "GC"]
    conv = [lk for lk in locks if lk.queue == "C"]
    wait = [lk for lk in locks if lk.queue == "W"]
    out: dict[str, set[str]] = {}

    def behind(lk: LockView, ahead: Sequence[LockView], b: set[str]) -> None:
        for a in ahead:
            if not compatible(a.requested, lk.requested):
                b.add(a.lock_id)
            else:
                b |= out[a.lock_id]

    for i, c in enumerate(conv):  # D2: held modes block an up-conversion (G5)
        b = {h.lock_id for h in holding if h is not c and not compatible(h.mode, c.requested)}
        if c.flags & Flag.QUECVT:  # D4: a QUECVT conversion waits to be first (G5)
            behind(c, conv[:i], b)
        out[c.lock_id] = b
    for i, w in enumerate(wait):
        b = {h.lock_id for h in holding if not compatible(h.mode, w.requested)}  # D2
        behind(w, conv, b)  # D3: no new request while a conversion is queued (G8)
        behind(w, wait[:i], b)  # D3: no barging past an earlier waiter (G8)
        out[w.lock_id] = b
    return out


def wait_for_graph(snapshot: Snapshot) -> WaitForGraph:
    """D2-D5: the wait-for graph between owners, merged over every instance.

    An edge W -> H exists when some waiting or converting lock of W, on some instance,
    waits for a lock of H (D2-D4). Locks whose lease ran out are ignored (the scripts purge
    them before any decision, G10). A request already granted on a quorum of instances is
    held, so where it still queues (a minority) it waits for nobody (D5); it may still be
    waited for. An owner never waits for itself. Merging instances is what makes a split
    vote that survives show up as a cycle."""
    q = snapshot.quorum
    granted_on: dict[tuple[bytes, str, Mode | None], int] = {}
    for inst in snapshot.instances:
        for view in inst.resources.values():
            for lk in view.locks:
                if lk.queue == "G" and lk.lease_left_ms > 0:
                    k = (view.key, lk.lock_id, lk.mode)
                    granted_on[k] = granted_on.get(k, 0) + 1
    merged: dict[tuple[bytes, str, str], tuple[str, str, set[int]]] = {}
    requests: dict[tuple[bytes, str], Request] = {}
    for i, inst in enumerate(snapshot.instances):
        for view in inst.resources.values():
            live = [lk for lk in view.locks if lk.lease_left_ms > 0]
            by_id = {lk.lock_id: lk for lk in live}
            for lock_id, blockers in _blockers(live).items():
                lk = by_id[lock_id]
                if granted_on.get((view.key, lock_id, lk.requested), 0) >= q:
                    continue  # D5
                for bid in blockers:
                    holder = by_id[bid].owner
                    if holder == lk.owner:
                        continue
                    ident = (view.key, lock_id, bid)
                    if ident not in merged:
                        merged[ident] = (lk.owner, holder, set())
                    merged[ident][2].add(i)
                    requests.setdefault((view.key, lock_id), Request.of(view, lk))
    edges = tuple(Edge(w, h, k, lid, bid, tuple(sorted(inst)))
                  for (k, lid, bid), (w, h, inst) in sorted(merged.items()))
    return WaitForGraph(edges, requests)


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


def find_cycles(graph: WaitForGraph) -> list[Cycle]:
    """D6: every group of two or more owners that wait for each other (Tarjan's SCC), with
    the edges and waiting requests inside the group. Sorted by owners."""
    adj = graph.adjacency
    out = []
    for comp in _tarjan(adj):
        if len(comp) < 2:
            continue
        members = set(comp)
        edges = tuple(e for e in graph.edges if e.waiter in members and e.holder in members)
        reqs = {(e.key, e.lock_id): graph.requests[(e.key, e.lock_id)] for e in edges}
        owners = tuple(sorted(comp))
        out.append(Cycle(owners, tuple(_shortest_cycle(owners[0], adj, members)), edges,
                         tuple(sorted(reqs.values(), key=lambda r: (r.ticket, r.lock_id)))))
    out.sort(key=lambda c: c.owners)
    return out


# ----------------------------------------------------------------- D8: the victim


def choose_victim(cycle: Cycle, snapshot: Snapshot, *,
                  eligible: Container[tuple[bytes, str]] | None = None) -> Request | None:
    """D8: the youngest request (highest ticket; ties by lock id) among the cycle's waiting
    requests, never one that asked not to be chosen (NODLCKWT, on any instance's view).
    `eligible` narrows the choice to (key, lock id) pairs (the detector passes those seen on
    both scans). None when no request may be chosen."""
    best = None
    for req in cycle.requests:
        if eligible is not None and (req.key, req.lock_id) not in eligible:
            continue
        views = snapshot.views_of(req.key, req.lock_id)
        if req.no_deadlock_wait or any(lk.flags & Flag.NODLCKWT for _, lk in views):
            continue
        if best is None or (req.ticket, req.lock_id) > (best.ticket, best.lock_id):
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
    reaped: tuple[Outcome, ...] = ()  #: per instance ReapResult, on reaping rounds
    elapsed_ms: float = 0.0


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
    Every `reap_every` rounds (0: never) stale index entries are reaped (D9)."""

    def __init__(self, targets: Sequence[str | Engine | Target], namespace: str = "default",
                 interval_s: float = 1.0, *, leader: Callable[[], bool] | None = None,
                 timeout_s: float = 2.0, reap_every: int = 20, reap_grace_ms: int = 5_000,
                 logger: logging.Logger | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
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
        self.leader = leader
        self.reap_every = reap_every
        self.reap_grace_ms = reap_grace_ms
        self.log = logger or log
        self.rounds = 0
        self._previous: list[Cycle] = []  # cycles of the previous scan not acted upon
        self._reported: set[frozenset] = set()  # victimless cycles already logged
        self._pool = ThreadPoolExecutor(max_workers=len(self.targets),
                                        thread_name_prefix="dlm-detector")

    # ------------------------------------------------------------- one round

    def run_once(self) -> Round:
        """Scan, confirm, cancel one victim per confirmed cycle; reap when it is time."""
        t0 = time.perf_counter()
        self.rounds += 1
        n = self.rounds
        if self.leader is not None and not self.leader():
            if self._previous:
                self.log.info(_kv("standby", round=n, forgotten=len(self._previous)))
            self._previous = []
            return Round(n, False, elapsed_ms=(time.perf_counter() - t0) * 1000)
        snap = scan(self.targets, executor=self._pool)
        for inst in snap.instances:
            if not inst.ok:
                self.log.warning(_kv("unreachable", round=n, instance=inst.label,
                                     error=inst.error))
        cycles = find_cycles(wait_for_graph(snap))
        confirmed, victims, unresolved, pending = [], [], [], []
        for cyc in cycles:
            earlier = next((p for p in self._previous if p.signature <= cyc.signature), None)
            if earlier is None:
                pending.append(cyc)  # D7: seen once; punish nothing yet
                self.log.info(_kv("cycle-seen", round=n, owners=",".join(cyc.owners)))
                continue
            confirmed.append(cyc)
            seen_twice = {(e.key, e.lock_id) for e in earlier.edges}
            victim = choose_victim(cyc, snap, eligible=seen_twice)
            if victim is None:
                unresolved.append(cyc)
                pending.append(cyc)  # stays confirmed: if it grows, a victim may appear
                if cyc.signature not in self._reported:
                    self._reported.add(cyc.signature)
                    self.log.warning(_kv("no-victim", round=n, owners=",".join(cyc.owners),
                                         reason="every request is NODLCKWT"))
                continue
            victims.append(self._cancel(n, victim, cyc))
        self._previous = pending
        reaped: tuple[Outcome, ...] = ()
        if self.reap_every and n % self.reap_every == 0:
            reaped = tuple(self.reap())
        elapsed = (time.perf_counter() - t0) * 1000
        rnd = Round(n, True, snap, tuple(cycles), tuple(confirmed), tuple(victims),
                    tuple(unresolved), reaped, elapsed)
        level = logging.INFO if (cycles or reaped) else logging.DEBUG
        self.log.log(level, _kv("round", round=n, reachable=f"{snap.reachable}/"
                                f"{len(snap.instances)}", waiters=snap.waiter_count,
                                cycles=len(cycles), confirmed=len(confirmed),
                                victims=len(victims), ms=f"{elapsed:.1f}"))
        return rnd

    def _cancel(self, n: int, req: Request, cyc: Cycle) -> Victim:
        """D8: cancel the victim's request on EVERY instance (where it is granted the script
        answers CANCELGRANT and changes nothing; where it is absent, NOTFOUND)."""
        outcomes = tuple(fan_out(self.targets, lambda e: e.cancel(
            req.key, req.owner, req.lock_id, parent_key=req.parent_key, reason="deadlock",
            notify=True).status, executor=self._pool))
        v = Victim(req, cyc, outcomes)
        self.log.warning(_kv("victim", round=n, owner=req.owner, lock=req.lock_id,
                             resource=show_name(req.path), ticket=req.ticket,
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
        """Run a round every `interval_s` until `stop` is set (or `max_rounds` ran).
        A round that fails unexpectedly is logged and the loop goes on. Returns the number
        of rounds run."""
        self.log.info(_kv("start", instances=",".join(t.label for t in self.targets),
                          interval_s=self.interval_s,
                          leader="hook" if self.leader else "always"))
        done = 0
        while not stop.is_set() and (max_rounds is None or done < max_rounds):
            t0 = time.monotonic()
            try:
                self.run_once()
            except Exception as exc:  # keep the job alive; the next round starts afresh
                self.log.error(_kv("round-failed", round=self.rounds,
                                   error=describe_error(exc)))
            done += 1
            if max_rounds is not None and done >= max_rounds:
                break
            stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))
        self.log.info(_kv("stop", rounds=done))
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
