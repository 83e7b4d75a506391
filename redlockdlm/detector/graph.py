"""D2-D8, the pure steps of the detector over a `Snapshot` (rules in docs/detector.md): the
wait-for graph between owners, its cycles, and the victim of one.

    graph = wait_for_graph(snap)         # owners, and who waits for whom (D2-D5)
    cycles = find_cycles(graph)          # Tarjan's strongly connected components (D6)
    victim = choose_victim(cycle, snap)  # lowest priority, youngest ticket; not NODLCKWT (D8)
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from operator import itemgetter
from typing import NamedTuple

from ..engine.codec import LockView, ResourceView
from ..engine.keys import parent_key
from ..engine.modes import COMPAT, Flag, Mode
from .scanning import ScannedLock, ScannedResource, Snapshot

_ITEM0, _ITEM1 = itemgetter(0), itemgetter(1)


# ----------------------------------------------------------------- D2-D5: the graph


class WaitingRequest(NamedTuple):
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
    def of(cls, view: ScannedResource | ResourceView, lk: ScannedLock | LockView) -> WaitingRequest:
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
    requests: Mapping[tuple[bytes, str], WaitingRequest]  #: (key, lock id) -> the waiting request

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


def _blockers(locks: Sequence[ScannedLock | LockView]
              ) -> list[tuple[ScannedLock | LockView, set[str]]]:
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
    out: list[tuple[ScannedLock | LockView, set[str]]] = []
    by_id: dict[str, set[str]] = {}

    def behind(lk: ScannedLock | LockView, ahead: Sequence[ScannedLock | LockView],
               b: set[str]) -> None:
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


def _layouts(per: list[tuple[int, ScannedResource | ResourceView]]
             ) -> list[tuple[int, tuple, ScannedResource | ResourceView]]:
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


def _resource_edges(key: bytes, per: list[tuple[int, ScannedResource | ResourceView]], q: int
                    ) -> tuple[tuple[Edge, ...], dict[tuple[bytes, str], WaitingRequest]]:
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
    requests: dict[tuple[bytes, str], WaitingRequest] = {}
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
                        requests[(key, lid)] = WaitingRequest.of(view, lk)
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
    by_key: dict[bytes, list[tuple[int, ScannedResource | ResourceView]]] = {}
    for i, inst in enumerate(snapshot.instances):
        for key, view in inst.resources.items():
            per = by_key.get(key)
            if per is None:
                by_key[key] = [(i, view)]
            else:
                per.append((i, view))
    edges: list[Edge] = []
    requests: dict[tuple[bytes, str], WaitingRequest] = {}
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
    requests: tuple[WaitingRequest, ...]

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
                  eligible: Container[tuple[bytes, str]] | None = None) -> WaitingRequest | None:
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

