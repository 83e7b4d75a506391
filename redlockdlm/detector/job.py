"""The scheduled detector job (rules D7-D9 in docs/detector.md): `Detector` runs the steps
of `scanning` and `graph` on a schedule, confirms a cycle before acting on it (D7),
cancels its victim (D8), and reaps stale waiter-index entries (`reap`, D9). What D7 and D8
decide from a scan is `judge`, a pure function (tests/sim runs it over simulated instances).

    Detector(urls, "shop", interval_s=0.5).run_forever(stop_event)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import metrics as _metrics
from ..engine.instance import Engine
from ..engine.keys import parent_key, show_name
from ..engine.modes import Status
from ..fanout import InstanceResult, Target, connect, fan_out, label_of
from ..protocol import describe
from .graph import Cycle, GraphMemo, WaitingRequest, choose_victim, find_cycles, wait_for_graph
from .scanning import (
    InstanceScan,
    ScanMemo,
    Snapshot,
    _gc_paused,
    _read_resources,
    _snapshot,
    _split_member,
    scan,
)

log = logging.getLogger("redlockdlm.detector")


# ----------------------------------------------------------------- D9: reaping


@dataclass(frozen=True)
class ReapResult:
    """What `reap` did on one instance."""

    stale: int = 0  #: index entries whose lease ran out more than `grace_ms` ago
    purged: int = 0  #: resources whose expired locks a script call purged (G10)
    removed: int = 0  #: entries removed by ZREM (their lock or resource was already gone)
    live: int = 0  #: entries left alone: the lock's lease is still running


def reap(engine: Engine, *, grace_ms: int = 5_000, limit: int = 1_000) -> ReapResult:
    """D9: clear up to `limit` waiter-index entries whose lease ran out more than
    `grace_ms` ago (instance clock).

    A lock whose lease ran out is dead for good (no script renews it); it only lingers until
    the next script call on its resource purges it (G10). For each stale entry: if its lock
    is still stored with a run-out lease, a `cancel` call on the resource purges it (the
    purge also drops its index entry, and the cancel itself then finds nothing, NOTFOUND);
    if the lock or the whole resource is gone, the entry is removed with ZREM, unless it was
    re-added meanwhile. A lock whose lease is still running is never touched."""
    raw = engine.expired_waiters(grace_ms, limit)
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
        if engine.drop_waiter(member, score):
            removed += 1
    return ReapResult(len(entries), len(purged), removed, live)


# ----------------------------------------------------------------- D7, D8: the decision


@dataclass(frozen=True)
class Judgement:
    """What D7 and D8 decide from one scan's cycles and the cycles kept from the previous
    scan: no I/O (`Detector` acts on it; tests/sim runs it over simulated instances)."""

    confirmed: tuple[Cycle, ...] = ()  #: seen on the previous scan as well (D7)
    #: one (request to cancel, its cycle) per confirmed cycle that has an eligible request
    victims: tuple[tuple[WaitingRequest, Cycle], ...] = ()
    unresolved: tuple[Cycle, ...] = ()  #: confirmed, but every request is NODLCKWT
    first_seen: tuple[Cycle, ...] = ()  #: seen for the first time: punish nothing yet
    #: what the next scan confirms against: the first-seen and the unresolved cycles
    remember: tuple[Cycle, ...] = ()


def judge(cycles: Sequence[Cycle], previous: Sequence[Cycle], snap: Snapshot) -> Judgement:
    """D7: a cycle is confirmed when the previous scan saw a cycle whose lock pairs are
    all still in it; one seen for the first time is only remembered. D8: the victim of a
    confirmed cycle is chosen among the requests seen on both scans (`choose_victim`); a
    confirmed cycle without an eligible request (every one NODLCKWT) stays remembered, so
    a victim may appear if it grows. A victimised cycle is forgotten (its locks change)."""
    confirmed, victims, unresolved, first_seen, remember = [], [], [], [], []
    for cyc in cycles:
        earlier = next((p for p in previous if p.signature <= cyc.signature), None)
        if earlier is None:
            first_seen.append(cyc)
            remember.append(cyc)
            continue
        confirmed.append(cyc)
        seen_twice = {(e.key, e.lock_id) for e in earlier.edges}
        victim = choose_victim(cyc, snap, eligible=seen_twice)
        if victim is None:
            unresolved.append(cyc)
            remember.append(cyc)
            continue
        victims.append((victim, cyc))
    return Judgement(tuple(confirmed), tuple(victims), tuple(unresolved), tuple(first_seen),
                     tuple(remember))


# ----------------------------------------------------------------- the job


@dataclass(frozen=True)
class Victim:
    request: WaitingRequest
    cycle: Cycle
    outcomes: tuple[InstanceResult, ...]  #: per instance: the cancel's Status, or an error

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
    reaped: tuple[InstanceResult, ...] = ()  #: per instance ReapResult, on reaping rounds
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
    Every `reap_every` rounds (0: never) stale index entries are reaped (D9).
    Each round is reported to `metrics` (default: the process-wide sink of
    `redlockdlm.metrics`, which reports nothing until `metrics.enable()`): its kind and
    duration, each instance's read latency or failure, the waiting requests and cycles of a
    full round, the deadlocks acted upon and their victims, whether it leads."""

    def __init__(self, targets: Sequence[str | Engine | Target], namespace: str = "default",
                 interval_s: float = 1.0, *, leader: Callable[[], bool] | None = None,
                 confirm_after_s: float | None = None, timeout_s: float = 2.0,
                 reap_every: int = 20, reap_grace_ms: int = 5_000,
                 watch_every_s: float | None = None,
                 logger: logging.Logger | None = None,
                 metrics: _metrics.Metrics | None = None) -> None:
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
        self._metrics = metrics
        self.rounds = 0
        self._previous: list[Cycle] = []  # cycles of the previous scan not acted upon
        self._reported: set[frozenset] = set()  # victimless cycles already logged
        self._memo = ScanMemo()  # D1: what the last scans decoded, per instance
        self._graph: GraphMemo = {}  # the edges of the last full round, per resource
        self._base: Snapshot | None = None  # the last full snapshot, with what watches read
        self._pool = ThreadPoolExecutor(max_workers=len(self.targets),
                                        thread_name_prefix="dlm-detector")

    @property
    def metrics(self) -> _metrics.Metrics:
        """Where rounds are reported: the sink given, else the process-wide one."""
        return self._metrics if self._metrics is not None else _metrics.sink

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
            members = set(e.live_waiters_now()[1])
            new = members - memo.members.get(e, set())
            memo.members[e] = members
            return [m.partition(b"|")[2] for m in new]

        with _gc_paused():
            found = fan_out(self.targets, fresh, executor=self._pool)
            keys = list(dict.fromkeys(k for o in found if o.ok for k in o.value))
            if not keys:
                self.metrics.detector_round("watch", time.perf_counter() - t0)
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
        self.metrics.detector_round("watch", elapsed / 1000)
        self.log.log(logging.INFO if pending else logging.DEBUG,
                     _kv("watch", round=self.rounds, resources=len(keys),
                         cycles=len(cycles), pending=len(pending), ms=f"{elapsed:.1f}"))
        return Round(self.rounds, True, snap, cycles=tuple(cycles), pending=tuple(pending),
                     elapsed_ms=elapsed, read_at=read_at)

    def _round(self, *, full: bool) -> Round:
        t0 = time.perf_counter()
        self.rounds += 1
        n = self.rounds
        m = self.metrics
        if self.leader is not None and not self.leader():
            if self._previous:
                self.log.info(_kv("standby", round=n, forgotten=len(self._previous)))
            self._previous = []
            self._base = None
            m.detector_leader(False)
            m.detector_round("standby", time.perf_counter() - t0)
            return Round(n, False, elapsed_ms=(time.perf_counter() - t0) * 1000)
        m.detector_leader(True)
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
            m.detector_scan(inst.label, inst.elapsed_s, inst.ok)
            if not inst.ok:
                self.log.warning(_kv("unreachable", round=n, instance=inst.label,
                                     error=inst.error))
        if full:  # (a confirming read has no index: no waiters of its own)
            m.detector_graph(snap.waiter_count, len(cycles), snap.longest_queue)
        j = judge(cycles, self._previous, snap)
        for cyc in j.first_seen:
            self.log.info(_kv("cycle-seen", round=n, owners=",".join(cyc.owners)))
        for cyc in j.unresolved:
            if cyc.signature not in self._reported:
                self._reported.add(cyc.signature)
                m.detector_deadlock(0)  # (counted once, as it is logged once)
                self.log.warning(_kv("no-victim", round=n, owners=",".join(cyc.owners),
                                     reason="every request is NODLCKWT"))
        victims = [self._cancel(n, victim, cyc) for victim, cyc in j.victims]
        for _ in victims:
            m.detector_deadlock(1)
        confirmed, unresolved, first_seen = j.confirmed, j.unresolved, j.first_seen
        self._previous = list(j.remember)
        reaped: tuple[InstanceResult, ...] = ()
        if full and self.reap_every and n % self.reap_every == 0:
            reaped = tuple(self.reap())
        elapsed = (time.perf_counter() - t0) * 1000
        m.detector_round("full" if full else "confirm", elapsed / 1000)
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

    def _cancel(self, n: int, req: WaitingRequest, cyc: Cycle) -> Victim:
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

    def reap(self) -> list[InstanceResult]:
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
                                   error=describe(exc)))
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
                                       error=describe(exc)))
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
