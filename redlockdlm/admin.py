"""Operator views over every instance: health, resources merged across instances with
their divergences, break, sweep (what `dlm` shows and does).

No printing here (the CLI's `output` module does that): each function returns plain
dataclasses. Every instance is asked in parallel (`redlockdlm.fanout`, re-exported here),
and an instance that does not answer is reported as such (`InstanceResult.error`) instead
of failing the whole call, so an operator still sees the instances that do answer.

    targets = connect(["redis://127.0.0.1:7001", ...], "shop", timeout_s=2.0)
    health(targets)                    # per instance: reachable, latency, epoch, counts
    resources(targets, prefix)         # every resource (SCAN + inspect), merged by key
    resource(targets, path)            # one resource, merged, with its divergences
    top(targets, namespace).busiest()  # one read of every instance, busiest resources first
    break_locks(targets, path, lock_id=..., owner=...)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .engine.codec import BreakReply, BrokenLock, InstanceStatus, LockView, ResourceView
from .engine.instance import Engine, Shard
from .engine.keys import check_id, check_name
from .engine.keys import parent_key as parent_key  # (re-exported: the detector uses it)
from .engine.keys import show_name as show_name  # (re-exported: the CLI uses it)
from .engine.modes import Mode
from .errors import InvalidArgument
from .fanout import InstanceResult as InstanceResult
from .fanout import Target as Target
from .fanout import connect as connect
from .fanout import fan_out as fan_out
from .fanout import label_of as label_of
from .protocol import quorum as quorum  # (re-exported: the CLI uses it)

T = TypeVar("T")

#: Keys per inspect call when listing every resource (one script call per batch).
INSPECT_BATCH = 500


# ----------------------------------------------------------------- names and keys


def path_list(path: Sequence[bytes]) -> list[str]:
    return [p.decode("utf-8", "backslashreplace") for p in path]


# ----------------------------------------------------------------- health


@dataclass(frozen=True)
class Health:
    """One instance's health (`dlm status`)."""

    latency_ms: float
    redis_version: str
    epoch: str | None
    now_ms: int
    recovering_ms: int
    resources: int  #: resources with at least one live lock
    locks: int  #: live locks (lease not run out), every queue
    waiters: int  #: entries of the waiter index (ZCARD)
    run_id: str | None = None  #: the server's run_id: two URLs with one are one server
    maxmemory_policy: str | None = None  #: anything but noeviction may drop keys
    rejoin_ms: int | None = None  #: the rejoin wait the instance stores (E1); None: none
    #: what a restart keeps (`persistence`): "aof" or "no aof"
    persistence: str = "?"
    #: a Redis Cluster member's primaries (H2c; the epoch fields above are slot 0's);
    #: () for a standalone server
    shards: tuple[Shard, ...] = ()


def _scan_resources(engine: Engine) -> tuple[InstanceStatus, list[ResourceView]]:
    keys = engine.resource_keys()
    views: list[ResourceView] = []
    st = None
    for i in range(0, len(keys), INSPECT_BATCH):
        st, batch = engine.inspect(keys[i:i + INSPECT_BATCH])
        views.extend(v for v in batch if v is not None)
    if st is None:
        st = engine.status(0 if engine.cluster else None)
    return st, views


def _live(view: ResourceView) -> list[LockView]:
    return [lk for lk in view.locks if lk.lease_left_ms > 0]


def persistence(info: dict) -> str:
    """What a restart of the instance keeps, from INFO persistence (CONFIG, which would
    tell the fsync policy and the RDB schedule, is not in the least-privilege ACL, K3):
    "aof" (a restart keeps the locks up to the last fsync: E2's rejoin wait) or "no aof"
    (a restart keeps nothing unless RDB snapshots are configured: E1's, or E2's after a
    snapshot)."""
    return "aof" if str(info.get("aof_enabled", "")) == "1" else "no aof"


def _health(engine: Engine) -> Health:
    t0 = time.perf_counter()
    engine.client.ping()
    latency = (time.perf_counter() - t0) * 1000
    version = str(engine.client.info("server").get("redis_version", "?"))
    slot = 0 if engine.cluster else None  # (a cluster member: slot 0's epoch, and shards)
    hello = engine.hello(slot)
    st, views = _scan_resources(engine)
    if engine.cluster:
        st = engine.status(slot)
    live = [_live(v) for v in views]
    shards = tuple(engine.shards())
    waiters = (sum(s.waiters for s in shards) if engine.cluster
               else int(engine.client.zcard(engine.wkey)))
    return Health(latency, version, st.epoch, st.now_ms, st.recovering_ms,
                  sum(1 for lks in live if lks), sum(len(lks) for lks in live),
                  waiters, hello.run_id, hello.maxmemory_policy, hello.rejoin_ms,
                  persistence(engine.client.info("persistence")), shards)


def health(targets: Sequence[Target]) -> list[InstanceResult[Health]]:
    return fan_out(targets, _health)


def _sweep(engine: Engine) -> int:
    _, views = _scan_resources(engine)
    # By epoch (one on a standalone server; one per hash slot on a Redis Cluster member,
    # H2c): where none exists there is nothing to sweep, and no epoch to create by a purge
    # (it would open a rejoin window, E1).
    by_slot: dict[int | None, list[ResourceView]] = {}
    for v in views:
        if v.locks and not _live(v):
            by_slot.setdefault(engine.slot_of(v.key), []).append(v)
    if not engine.cluster:
        by_slot.setdefault(None, [])
    done = 0
    for slot, stale in by_slot.items():
        st = engine.status(slot)
        if st.epoch is None or not stale:
            continue
        if st.rejoin_ms is not None:
            engine.rejoin_ms = max(engine.rejoin_ms, st.rejoin_ms)
        for v in stale:
            # any mutating call purges a resource's expired locks (G10) and rewrites it,
            # as a tombstone with a TTL when none is left (G9): a cancel of no lock does
            engine.cancel(v.key, "dlm-sweep", "sweep")
            done += 1
    return done


def sweep(targets: Sequence[Target]) -> list[InstanceResult[int]]:
    """Purge the resources whose locks have all expired and that nobody touched since
    (their holders died): lock-holding keys carry no TTL (so a volatile-* eviction policy
    cannot drop them, docs/operations.md), so such a key stays until a call touches it.
    Per instance: how many resources were purged."""
    return fan_out(targets, _sweep)


def config_problems(outcomes: Sequence[InstanceResult[Health]]) -> list[str]:
    """What makes the instances unsafe to use, one line each (`dlm status` fails on any):
    two URLs reaching one server (same run_id or epoch: one server, two votes), and an
    eviction policy that may drop lock keys (docs/operations.md, Memory)."""
    out = []
    seen: dict[str, str] = {}
    for o in outcomes:
        h = o.value
        if h is None:
            continue
        for key in (f"server {h.run_id}" if h.run_id else None,
                    f"epoch {h.epoch}" if h.epoch else None):
            if key is None:
                continue
            if key in seen:
                out.append(f"{o.label} is the same Redis server as {seen[key]} ({key}): "
                           "one server would cast two votes")
                break
            seen[key] = o.label
        policy = h.maxmemory_policy or "noeviction"
        if policy != "noeviction":
            out.append(f"{o.label} has maxmemory-policy {policy}: Redis may evict keys "
                       "(set noeviction; clients refuse it unless allow_eviction, and "
                       "allkeys-* always)")
    return out


def not_granting(outcomes: Sequence[InstanceResult[Health]]) -> dict[str, str]:
    """The reachable instances that cannot grant now, label -> why: in their rejoin window
    (E1, with the time left), without an epoch (the first call creates one and starts
    that window: a brand-new server is marked fresh with `dlm init --fresh` instead), or
    restarted with their data (the epoch id ends with another server process's run_id:
    the first call replaces it by a new epoch in that window, E2). A Redis Cluster member
    (H2c) is judged by each shard (the first slot of each: slot 0 is one): one shard that
    cannot grant (a primary restarted empty is in its slots' rejoin window) costs the
    member its vote on the resources of that shard's slots, so the member is listed,
    with the shards and why."""
    out = {}
    for o in outcomes:
        h = o.value
        if h is None:
            continue
        if not h.shards:
            why = _why_not(h.epoch, h.recovering_ms, h.run_id)
        else:  # (slot 0 is the first slot of its shard)
            why = "; ".join(f"shard {sh.node} (slot {sh.slots[0][0]}): {w}"
                            for sh in h.shards if sh.status is not None and (w := _why_not(
                                sh.status.epoch, sh.status.recovering_ms, sh.status.run_id)))
        if why:
            out[o.label] = why
    return out


def _why_not(epoch: str | None, recovering_ms: int, run_id: str | None) -> str | None:
    """Why one epoch (an instance's, or a hash slot's of a cluster member) cannot grant
    now, or None."""
    if not epoch:
        return ("no epoch yet: the first call starts its rejoin window (E1); "
                "a brand-new server: dlm init --fresh")
    if recovering_ms > 0:
        return (f"in its rejoin window (E1) for {recovering_ms} ms more: "
                "grants nothing until then")
    if run_id and not epoch.endswith("." + run_id[:8]):
        return ("restarted with its data (its epoch is a previous server "
                "process's): the first call starts a new rejoin window (E2)")
    return None


def namespaces(targets: Sequence[Target]) -> tuple[dict[str, dict[str, int]],
                                                    list[InstanceResult]]:
    """The namespaces that have resource keys (live resources or tombstones) on some
    instance, by SCAN (for operators): namespace -> {instance label: keys}. Returns them
    and the per-instance outcomes."""
    def count(engine: Engine) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in engine.scan_keys(b"dlm:{*"):
            ns = key[5:].split(b":", 1)[0]
            if ns:
                name = ns.decode("utf-8", "replace")
                out[name] = out.get(name, 0) + 1
        return out

    outcomes = fan_out(targets, count)
    found: dict[str, dict[str, int]] = {}
    for o in outcomes:
        for ns, n in (o.value or {}).items():
            found.setdefault(ns, {})[o.label] = n
    return dict(sorted(found.items())), outcomes


# ----------------------------------------------------------------- merged resource views


@dataclass(frozen=True)
class MergedLock:
    """One lock id as every instance sees it (instances where it is absent are left out)."""

    lock_id: str
    owner: str
    queue: str  #: the queue it is in on most instances ('G', 'C', 'W'); G > C > W on a tie
    views: dict[str, LockView]  #: instance label -> that instance's view

    @property
    def first(self) -> LockView:
        return next(iter(self.views.values()))

    @property
    def granted(self) -> Mode | None:
        return _most_common([v.mode for v in self.views.values()])

    @property
    def requested(self) -> Mode | None:
        return _most_common([v.requested for v in self.views.values()])

    @property
    def ticket(self) -> int:
        v = self.first
        return v.cticket if self.queue == "C" else v.ticket

    @property
    def lease_left_ms(self) -> int:
        """The smallest lease left over the instances (the first to run out)."""
        return min(v.lease_left_ms for v in self.views.values())

    @property
    def token(self) -> int:
        """The largest fencing token of its current grant (0 while only waiting)."""
        return max(v.token for v in self.views.values())


def _most_common(values: list) -> object:
    counts: dict[object, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: counts[v]) if counts else None


_QUEUE_RANK = {"G": 2, "C": 1, "W": 0}


@dataclass(frozen=True)
class MergedResource:
    """A resource merged over the instances that answered."""

    key: bytes
    path: tuple[bytes, ...]
    views: dict[str, ResourceView | None]  #: label -> view (None: absent there)
    locks: tuple[MergedLock, ...]  #: live locks, each queue in ticket order
    divergences: tuple[str, ...]  #: where the instances disagree, one line each

    def queue(self, q: str) -> list[MergedLock]:
        return [lk for lk in self.locks if lk.queue == q]

    @property
    def present_on(self) -> int:
        return sum(1 for v in self.views.values() if v is not None)


def merge(key: bytes, views: dict[str, ResourceView | None]) -> MergedResource:
    """Merge one resource's views (label -> view or None) and list the divergences."""
    present = {lab: v for lab, v in views.items() if v is not None}
    path = next((v.path for v in present.values() if v.path), ())
    by_id: dict[str, dict[str, LockView]] = {}
    for lab, v in present.items():
        for lk in _live(v):
            by_id.setdefault(lk.lock_id, {})[lab] = lk
    locks = []
    for lock_id, lviews in by_id.items():
        counts: dict[str, int] = {}
        for lk in lviews.values():
            counts[lk.queue] = counts.get(lk.queue, 0) + 1
        q = max(counts, key=lambda x: (counts[x], _QUEUE_RANK[x]))
        locks.append(MergedLock(lock_id, next(iter(lviews.values())).owner, q, lviews))
    locks.sort(key=lambda m: (-_QUEUE_RANK[m.queue], m.ticket, m.lock_id))
    return MergedResource(key, path, dict(views), tuple(locks),
                          tuple(_divergences(views, locks)))


def _divergences(views: dict[str, ResourceView | None], locks: list[MergedLock]) -> list[str]:
    out = []
    labels = list(views)
    present = [lab for lab in labels if views[lab] is not None]
    if present and len(present) < len(labels):
        missing = [lab for lab in labels if views[lab] is None]
        out.append(f"resource absent on {', '.join(missing)}")
    for m in locks:
        if len(m.views) < len(present):
            where = [lab for lab in present if lab not in m.views]
            out.append(f"lock {m.lock_id} ({m.owner}) absent on {', '.join(where)}")
        states = {lab: _state(lk) for lab, lk in m.views.items()}
        if len(set(states.values())) > 1:
            out.append(f"lock {m.lock_id} ({m.owner}): "
                       + "; ".join(f"{s} on {lab}" for lab, s in states.items()))
    for what, get in (("value version", lambda v: v.version),
                      ("value", lambda v: v.value),
                      ("value validity", lambda v: v.valid)):
        seen = {lab: get(views[lab]) for lab in present}
        if len(set(seen.values())) > 1:
            out.append(f"{what} differs: " + "; ".join(
                f"{_short(val)} on {lab}" for lab, val in seen.items()))
    return out


def _state(lk: LockView) -> str:
    gr = lk.mode.name if lk.mode is not None else "--"
    if lk.queue == "G":
        return f"granted {gr}"
    rq = lk.requested.name if lk.requested is not None else "--"
    return f"{'converting' if lk.queue == 'C' else 'waiting'} {gr} ({rq})"


def _short(val: object) -> str:
    if isinstance(val, bytes):
        return val.hex() if len(val) <= 16 else val[:16].hex() + "..."
    if val is None:
        return "none"
    return str(val)


def resources(targets: Sequence[Target], prefix: Sequence[bytes] = ()
              ) -> tuple[list[MergedResource], list[InstanceResult]]:
    """Every resource with a live lock on some instance (SCAN + inspect: for operators,
    never on a hot path), merged by key, sorted by path. `prefix` selects by path: every
    component but the last must match exactly, the last is a prefix of that component.
    Returns the resources and the per-instance outcomes (for unreachable instances)."""
    outcomes = fan_out(targets, _scan_resources)
    labels = [t.label for t in targets]
    views: dict[bytes, dict[str, ResourceView | None]] = {}
    for o in outcomes:
        if not o.ok:
            continue
        for v in o.value[1]:
            if _live(v) and _matches(v.path, prefix):
                views.setdefault(v.key, {})[o.label] = v
    answered = [lab for lab, o in zip(labels, outcomes) if o.ok]
    merged = [merge(k, {lab: per.get(lab) for lab in answered}) for k, per in views.items()]
    merged.sort(key=lambda m: m.path)
    return merged, outcomes


def _matches(path: tuple[bytes, ...], prefix: Sequence[bytes]) -> bool:
    if not prefix:
        return True
    if len(path) < len(prefix):
        return False
    *exact, last = prefix
    return list(path[:len(exact)]) == list(exact) and path[len(exact)].startswith(last)


def check_path(parts: Sequence[str | bytes]) -> list[bytes]:
    """Resource path components (root first), each checked like a library resource name."""
    if not parts:
        raise InvalidArgument("a resource needs at least one name")
    return [check_name(p) for p in parts]


def resource(targets: Sequence[Target], path: Sequence[str | bytes]
             ) -> tuple[MergedResource, list[InstanceResult]]:
    """One resource merged over the instances that answered (inspect reads, purges nothing:
    locks whose lease ran out are left out of `locks`)."""
    key = targets[0].key(*check_path(path))
    outcomes = fan_out(targets, lambda e: e.inspect([key])[1][0])
    views = {o.label: o.value for o in outcomes if o.ok}
    merged = merge(key, views)
    if not merged.path:
        merged = MergedResource(key, tuple(check_path(path)), merged.views, merged.locks,
                                merged.divergences)
    return merged, outcomes


# ----------------------------------------------------------------- the busiest resources


@dataclass(frozen=True)
class Busy:
    """One resource's load, as `dlm top` ranks it (`busiest`)."""

    resource: MergedResource
    waiting: int  #: requests not granted yet: converting plus waiting locks
    oldest_wait_us: int | None  #: age of the oldest of them (ticket to now); None: none
    holders: int  #: granted locks
    lease_left_ms: int | None  #: the smallest lease left of a holder; None: no holder

    @property
    def rank(self) -> tuple[int, int, int]:
        """Busier sorts first: more requests not granted, then the longest wait, then
        more holders."""
        return (-self.waiting, -(self.oldest_wait_us or 0), -self.holders)


def wait_age_us(lock: MergedLock, now_us: int) -> int:
    """How long a converting or waiting lock has waited: its ticket (a conversion's
    conversion ticket) is the requesting client's wall clock in microseconds when it asked
    (G11), so the age is as good as the agreement of that clock with `now_us`; never
    negative."""
    return max(0, now_us - lock.ticket)


def busiest(found: Sequence[MergedResource], now_us: int) -> list[Busy]:
    """The resources ranked busiest first (`Busy.rank`, then by path), with what
    `dlm top` shows of each. Pure: `now_us` is the wall clock the wait ages count to."""
    out = []
    for r in found:
        pending = r.queue("C") + r.queue("W")
        held = r.queue("G")
        out.append(Busy(r, len(pending),
                        max((wait_age_us(m, now_us) for m in pending), default=None),
                        len(held), min((m.lease_left_ms for m in held), default=None)))
    out.sort(key=lambda b: (b.rank, b.resource.path))
    return out


@dataclass(frozen=True)
class TopSnapshot:
    """One read of every instance for `dlm top`: what each instance said about itself and
    every resource with a live lock, merged. `taken_at` is this machine's wall clock (s)."""

    namespace: str
    taken_at: float
    instances: tuple[InstanceResult[InstanceStatus], ...]  #: per target, in order
    resources: tuple[MergedResource, ...]

    @property
    def reachable(self) -> int:
        return sum(1 for o in self.instances if o.ok)

    @property
    def recovering(self) -> list[str]:
        """Labels of the reachable instances in their rejoin window (E1) or without an
        epoch (their first call opens that window): they grant nothing now."""
        return [o.label for o in self.instances
                if o.ok and o.value is not None and (o.value.recovering_ms > 0
                                                     or not o.value.epoch)]

    def busiest(self) -> list[Busy]:
        return busiest(self.resources, int(self.taken_at * 1_000_000))


def top(targets: Sequence[Target], namespace: str) -> TopSnapshot:
    """Read every instance once (SCAN + inspect, as `resources`) for `dlm top`; an
    instance that does not answer is in `instances` with its error."""
    taken_at = time.time()
    found, outcomes = resources(targets)
    states = tuple(InstanceResult(o.label, o.value[0] if o.ok else None, o.error)
                   for o in outcomes)
    return TopSnapshot(namespace, taken_at, states, tuple(found))


# ----------------------------------------------------------------- break


def descendants(targets: Sequence[Target], locks: Sequence[MergedLock]
                ) -> list[tuple[tuple[bytes, ...], MergedLock]]:
    """Every lock below `locks` (their children, the children's children, ...: what a break
    of them takes too, H4), each with its resource path, merged over the instances that
    answer, one level of the tree at a time (inspect reads only)."""
    out: list[tuple[tuple[bytes, ...], MergedLock]] = []
    wanted: dict[bytes, set[str]] = {}
    for m in locks:
        for v in m.views.values():
            for ckey, cid in v.kids:
                wanted.setdefault(ckey, set()).add(cid)
    while wanted:
        keys = sorted(wanted)
        outcomes = fan_out(targets, lambda e, keys=keys: e.inspect(keys)[1])
        nxt: dict[bytes, set[str]] = {}
        for i, key in enumerate(keys):
            merged = merge(key, {o.label: o.value[i] for o in outcomes if o.ok})
            for m in merged.locks:
                if m.lock_id in wanted[key]:
                    out.append((merged.path, m))
                    for v in m.views.values():
                        for ckey, cid in v.kids:
                            nxt.setdefault(ckey, set()).add(cid)
        wanted = nxt
    return out


@dataclass(frozen=True)
class BrokenLockView:
    """One lock a break removed, merged over the instances where it went."""

    key: bytes
    path: tuple[bytes, ...]
    lock_id: str
    owner: str
    mode: Mode | None  #: granted mode on most of those instances (None: it was waiting)
    requested: Mode | None
    queue: str  #: 'G', 'C' or 'W' on most of those instances
    instances: tuple[str, ...]  #: labels of the instances it was broken on


@dataclass(frozen=True)
class BreakResult:
    key: bytes
    path: tuple[bytes, ...]
    outcomes: list[InstanceResult[BreakReply]] = field(default_factory=list)

    @property
    def locks(self) -> list[BrokenLockView]:
        """Every lock broken on some instance, subtrees included, in the order they went
        (children first, depth first)."""
        seen: dict[tuple[bytes, str], list[tuple[str, BrokenLock]]] = {}
        for o in self.outcomes:
            if o.ok and o.value is not None:
                for b in o.value.broken:
                    seen.setdefault((b.key, b.lock_id), []).append((o.label, b))
        out = []
        for (key, lock_id), per in seen.items():
            first = per[0][1]
            out.append(BrokenLockView(
                key, first.path, lock_id, first.owner,
                _most_common([b.mode for _, b in per]),
                _most_common([b.requested for _, b in per]),
                _most_common([b.queue for _, b in per]),
                tuple(label for label, _ in per)))
        return out

    @property
    def broken(self) -> int:
        """Distinct locks broken over every instance, subtrees included."""
        return len(self.locks)

    def broken_on(self, o: InstanceResult[BreakReply]) -> int | None:
        """Locks broken on the instance of outcome `o` (None if it failed)."""
        return o.value.extra if o.ok and o.value is not None else None

    @property
    def failed(self) -> list[InstanceResult[BreakReply]]:
        return [o for o in self.outcomes if not o.ok]


def break_locks(targets: Sequence[Target], path: Sequence[str | bytes], *, lock_id: str = "",
                owner: str = "") -> BreakResult:
    """Break one lock, or every lock of an owner, on one resource on EVERY instance, each
    with its whole subtree (H4: children first, depth first; the `break` script: the value
    block of a broken PW/EX holder becomes invalid, each owner gets ``C|id|broken`` for
    every lock of it that went). Afterwards no lock of those subtrees is left on an
    instance that answered; `BreakResult.locks` says what went where."""
    if bool(lock_id) == bool(owner):
        raise InvalidArgument("break needs exactly one of a lock id or an owner")
    if lock_id:
        check_id("lock id", lock_id)
    if owner:
        check_id("owner", owner)
    parts = check_path(path)
    key = targets[0].key(*parts)
    outcomes = fan_out(targets, lambda e: e.break_(key, lock_id=lock_id, owner=owner))
    return BreakResult(key, tuple(parts), outcomes)
