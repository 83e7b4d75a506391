"""The simulated world: a seeded discrete-event scheduler, the network, the faults, the
workload, and the observer that checks the invariants after every event.

Everything random comes from `random.Random` objects seeded from the run's seed (one per
concern: faults, each user's workload, and the network's draws one stream per client, step
of its user and instance), events at the same instant run in the order they were scheduled,
and lock ids come from a counter: a seed replays exactly.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from redlockdlm import protocol
from redlockdlm.engine.modes import COMPAT, Mode, is_down_conversion
from redlockdlm.errors import DLMError
from redlockdlm.protocol import Phase, covers

from .client import TICKET0, SimClient
from .instance import SimInstance


@dataclass
class Config:
    instances: int = 3
    clients: int = 3
    resources: int = 2
    lease_ms: int = 1000
    work_s: float = 6.0  #: the workload starts requests until then; faults stop then too
    drop: float = 0.01  #: per message (requests, replies, events)
    dup: float = 0.01  #: a request run twice back to back by the instance (G12)
    slow: float = 0.03  #: a message delayed 5..200 ms (reorders)
    faults: int = 6  #: instance pauses / empty restarts / client pauses / partitions
    skew: float = 0.002  #: clock rates within 1 +- skew (Redlock allows 1%)
    interrupt: float = 0.15  #: a user call interrupted (KeyboardInterrupt) at a random point
    #: a user idle for 1 to 2.5 leases before its next lock (so resources empty, leases of
    #: locks an instance did not hear released run out there: G9, G13)
    idle: float = 0.05
    #: a lock held 1 to 4 leases (renewed through faults: R1, R2, V5) instead of 0..0.2 s
    hold: float = 0.1
    #: the same after a conversion (an up-conversion missed by one instance, then held
    #: while another instance loses the lock: R1)
    #: (0 by default: the fixed seeds keep their schedules; `PROFILES["r1"]` sets it)
    hold_after_conv: float = 0.0
    #: the faults drawn from (a regression seed found before a kind existed keeps its set)
    #: ("convloss" too: a conversion's request lost on one instance, then the client cut
    #: from another; `PROFILES["r1"]`)
    kinds: tuple[str, ...] = ("ipause", "irestart", "cpause", "partition", "latency")
    #: client 0's socket timeout, long enough to wait for replies through a latency spike
    #: (as the fault suite's slow clients); the others time out after 1 s
    timeout0: float = 6.0
    #: a latency spike: how long (in leases) and how much slower each way (in leases)
    lat_dur: tuple[float, float] = (0.2, 2.0)
    lat_extra: tuple[float, float] = (0.2, 1.0)
    #: R3: a round still waiting at its caller's deadline ends there (`Broadcast.until`), as
    #: the real drivers do (off by default for now: the pinned seeds' schedules predate it;
    #: `PROFILES["cut"]`)
    cut: bool = False
    #: a late duplicate ("latedup"): for how long (in leases) one client's messages are
    #: copied, and how much later (in leases) the copies reach the instances again
    echo_dur: tuple[float, float] = (0.3, 1.5)
    echo_lag: tuple[float, float] = (1.0, 3.0)
    #: simulated jobs besides the users (tests/sim/jobs.py; none by default): "detector"
    #: (deadlock detectors, one leading), "deadlocks" (users that take two resources in
    #: either order and convert up: real deadlocks), "breaks" (an operator's `dlm break`)
    jobs: tuple[str, ...] = ()
    #: the modes users draw for requests and conversions (None: NL, CR, CW, PR twice, PW,
    #: EX twice; a profile may draw more writers)
    modes: tuple[Mode, ...] | None = None
    #: "relloss": how long (in leases) every client stays cut from the instance that
    #: missed a release (past that lock's lease there)
    relloss_cut: tuple[float, float] = (1.2, 2.0)
    #: conversions per lock, at most (each after the first drawn with probability 0.7)
    chain: int = 1
    #: a down-conversion from PW/EX writes the value block (V3; only releases otherwise)
    down_writes: bool = False
    #: how often a release from PW/EX writes the value block
    release_writes: float = 1.0
    #: a write whose release or down-conversion returned without an error is committed
    #: (the user's view, as the fault suite's observer has it) even where no quorum
    #: stores it; otherwise only once a quorum stores it
    returned_commits: bool = False
    #: whose locks have an `on_blocking` callback (their requests and conversions carry
    #: BLKAST, so their holders get every blocking event, N1): "even" client ids, "all",
    #: "none" (the others get only those the split-vote yield reads)
    on_blocking: str = "even"


@dataclass
class Result:
    seed: int
    ops: int = 0
    events: int = 0
    checks: int = 0
    faults: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    sim_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    trace: list[str] = field(default_factory=list)


@dataclass
class Schedule:
    """What a seed's run did, explicitly: its faults (time, kind, args) and each user's
    steps (the random choices of each lock it took; "n", its place in the run that recorded
    it, names the step's network draws). Replayed with the seed (the network's draws and
    the clocks still come from it); shrinking removes faults and steps."""

    faults: list[tuple] = field(default_factory=list)
    steps: dict[int, list[dict]] = field(default_factory=dict)


class Network:
    """Messages between clients and instances: a base latency, a slow tail (reordering),
    drops, duplicated requests, partitions (a client cut from some instances).

    Its draws do not come from one stream in the order messages are sent: each message
    draws from the stream of (its client, the step its client's user is in, its instance),
    and each event from the stream of (the client it goes to, that client's step, the
    instance, "ev"), so removing a step or a fault from a schedule (shrinking) changes the
    draws of what it removed and of what came in the same step, not of every later message."""

    def __init__(self, world: World) -> None:
        self.w = world
        #: client -> the step its user is in (the step's "n"; "start", "end" outside them)
        self.step: dict[int, Any] = {}
        self._streams: dict[tuple, random.Random] = {}
        self.cut: dict[tuple[int, int], float] = {}  #: (client, instance) -> until
        #: client -> (until, extra seconds): a latency spike on every message of that client
        self.lag: dict[int, tuple[float, float]] = {}
        #: (client, instance) -> (until, then): the next conversion request that client
        #: sends to that instance is lost; `then` (instance, seconds) cuts the client from
        #: another instance a moment later (the "convloss" fault)
        self.convloss: dict[tuple[int, int], tuple[float, tuple[int, float]]] = {}
        #: client -> (until, lag): every message that client sends until then reaches its
        #: instance a second time `lag` seconds later, in order, its reply read by nobody
        #: (the "latedup" fault: a retrying proxy or client library re-sending commands)
        self.echo: dict[int, tuple[float, float]] = {}
        #: instance -> (until, seconds): the next release that writes no value and reaches
        #: that instance is lost there (its lock stays, stale), then every client is cut
        #: from it for `seconds`, past that lock's lease (the "relloss" fault: G13)
        self.relloss: dict[int, tuple[float, float]] = {}
        #: (until, i, miss, other, gap, d): the next release that writes a value is lost
        #: on the instances `miss`; instance i restarts empty just after it landed, and
        #: `gap` later every client is cut from `other` for `d` (the "rejoinread" fault)
        self.writemiss: tuple | None = None
        #: [until, client, miss, q, rest, d, lock id, stage]: that client's next
        #: up-conversion to PW/EX never reaches `miss`; the same lock's next down-conversion
        #: that writes a value is lost on q; then every client is cut from `rest` for d
        #: (the "vminor" fault: V7)
        self.vminor: list | None = None
        self._writemiss_id: bytes | None = None  #: the writer's lock it hit

    def rng(self, c: SimClient, i: int, ev: bool = False) -> random.Random:
        """The stream of client c's messages to or from instance i in its current step."""
        key = (c.cid, self.step.get(c.cid, "start"), i, ev)
        r = self._streams.get(key)
        if r is None:
            r = self._streams[key] = random.Random("{}:{}:{}:{}:{}".format(self.w.seed, *key))
        return r

    def delay(self, c: SimClient, i: int, ev: bool = False) -> float:
        r = self.rng(c, i, ev)
        w = self.w
        d = 0.0002 + r.random() * 0.0015
        if r.random() < w.cfg.slow and w.t < w.cfg.work_s:
            d += 0.005 + r.random() * 0.2
        if self.lag:
            lag = self.lag.get(c.cid)
            if lag is not None and lag[0] > w.t:
                d += lag[1]  # (one connection: in order, as TCP)
        return d

    def lost(self, c: SimClient, i: int, ev: bool = False) -> bool:
        w = self.w
        if self.cut.get((c.cid, i), -1.0) > w.t:
            return True
        return w.t < w.cfg.work_s and self.rng(c, i, ev).random() < w.cfg.drop

    def send(self, c: SimClient, i: int, calls: list, on_reply: Callable, *args: Any) -> None:
        """Send `calls` to instance i; `on_reply(*args, results)` gets the settled results (a
        redis.TimeoutError after the socket timeout if no reply came)."""
        w = self.w
        box = [False]  # answered (reply or timeout)

        def timeout() -> None:
            if not box[0]:
                box[0] = True
                err = redis.TimeoutError(f"Timeout reading from i{i}")
                on_reply(*args, [err] * len(calls))

        w.at(w.t + c.timeout, c, timeout)
        if self.lost(c, i):
            return
        if self.convloss and self._convloss(c, i, calls):
            return
        if self.relloss and self._relloss(c, i, calls):
            return
        if self.writemiss is not None and self._writemiss(c, i, calls):
            return
        if self.vminor is not None and self._vminor(c, i, calls):
            return
        if self.echo:
            echo = self.echo.get(c.cid)
            if echo is not None and echo[0] > w.t:
                w.at(w.t + echo[1], w.instances[i], self._again, c, i, calls)
        dup = w.t < w.cfg.work_s and self.rng(c, i).random() < w.cfg.dup
        w.at(w.t + self.delay(c, i), w.instances[i], self._arrive, c, i, calls, on_reply, args,
             box, dup)

    def _convloss(self, c: SimClient, i: int, calls: list) -> bool:
        hit = self.convloss.get((c.cid, i))
        if hit is None or hit[0] <= self.w.t or not any(call[0] == "convert" for call in calls):
            return False
        del self.convloss[(c.cid, i)]
        j, d = hit[1]
        w = self.w
        w._fault(f"client {c.cid}'s conversion request to instance {i} lost")
        if j != i:
            w.at(w.t + 0.3, None, w._partition, c.cid, [j], d)
        return True

    def _vminor(self, c: SimClient, i: int, calls: list) -> bool:
        """The "vminor" fault (V7): a write that reaches a minority. The client's next
        up-conversion to PW/EX never reaches `miss` (so it holds PW/EX on a bare quorum:
        q and `rest`); that lock's next down-conversion that writes a value is lost on q
        (q keeps the stronger mode and the older value; the conversion stands on `miss`
        and `rest`, a quorum), and every client is then cut from `rest` for d: a reader's
        quorum is `miss` and q, none of which has the write."""
        until, cid, miss, q, rest, d, lid, stage = self.vminor
        w = self.w
        if until <= w.t:
            self.vminor = None
            return False
        call = calls[0]
        if c.cid != cid or call[0] != "convert":
            return False
        a = call[2]
        if stage == 0:
            if i not in miss or int(a[4]) < Mode.PW:
                return False
            self.vminor[6:] = [a[3], 1]
            w._fault(f"client {cid}'s conversion of {a[3].decode()} to "
                     f"{Mode(int(a[4])).name} never reaches instances {miss}")
            return True
        if a[3] != lid:
            return False
        if int(a[4]) >= Mode.PW:
            return i in miss  # (its re-sends, or its next up-conversion: the same)
        if i != q or a[8] != b"1":
            return False
        self.vminor = None
        w._fault(f"client {cid}'s down-conversion writing {a[9]!r} lost on instance {q}; "
                 f"every client cut from instances {rest} for {d * 1000:.0f} ms")
        for other in w.clients:
            w._partition(other.cid, rest, d)
        return True

    def _relloss(self, c: SimClient, i: int, calls: list) -> bool:
        hit = self.relloss.get(i)
        if hit is None or hit[0] <= self.w.t:
            return False
        # (a release that writes nothing, of a lock granted there in a mode that writes
        # nothing: an expired writer's lock would mark the value invalid, V4)
        res = self.w.instances[i].model.res
        if not any(call[0] == "release" and call[2][5] != b"1" and any(
                lk.id == call[2][3].decode() and lk.gr is not None and lk.gr < Mode.PW
                for lk in getattr(res.get(call[1][2]), "g", ())) for call in calls):
            return False
        del self.relloss[i]
        w = self.w
        w._fault(f"client {c.cid}'s release to instance {i} lost; every client cut from it "
                 f"for {hit[1] * 1000:.0f} ms")
        for other in w.clients:
            w._partition(other.cid, [i], hit[1])
        return True

    def _writemiss(self, c: SimClient, i: int, calls: list) -> bool:
        """The "rejoinread" fault: the calls of the next writer's lock (a request in PW or
        EX) never reach the instances `miss` (they keep the older value); once that lock
        releases with a write that is stored (another lock keeps the resource alive on
        instance r), r restarts empty and, `gap` later, every client is cut from `other`.
        A writer whose release writes nothing is forgotten, the next one taken."""
        until, r, miss, other, gap, d = self.writemiss
        w = self.w
        if 0 <= until <= w.t and self._writemiss_id is None:
            self.writemiss = None
            return False
        call = calls[0]
        if call[0] not in ("request", "convert", "release", "cancel"):
            return False
        lid = call[2][3]
        if self._writemiss_id is None:
            if call[0] != "request" or int(call[2][4]) < Mode.PW:
                return False
            self._writemiss_id = lid
            w._fault(f"client {c.cid}'s lock {lid.decode()} never reaches instances {miss}")
        elif lid != self._writemiss_id:
            return False
        if call[0] == "release" and i == min(set(range(len(w.instances))) - set(miss)):
            res = w.instances[r].model.res.get(call[1][2])
            if call[2][5] != b"1" or res is None or sum(
                    len(q) for q in (res.g, res.c, res.w)) < 2:
                self._writemiss_id = None  # (no write stored: wait for the next writer)
                return i in miss
            self.writemiss = (-1.0, r, miss, other, gap, d)  # (done once r restarts)
            w._fault(f"its release writes; instance {r} restarts empty after it")
            w.at(w.t + 0.3, None, w._restart, r, 0.05)
            w.at(w.t + 0.3, None, setattr, self, "writemiss", None)
            for other_c in w.clients:
                w.at(w.t + 0.35 + gap, None, w._partition, other_c.cid, other, d)
        return i in miss

    def _arrive(self, c: SimClient, i: int, calls: list, on_reply: Callable, args: tuple,
                box: list, dup: bool) -> None:
        w = self.w
        results = self._execute(c, i, calls, dup)
        if self.lost(c, i):
            return

        def back() -> None:
            if not box[0]:
                box[0] = True
                on_reply(*args, c.settle(calls, results))

        w.at(w.t + self.delay(c, i), c, back)

    def _execute(self, c: SimClient, i: int, calls: list, dup: bool,
                 again: bool = False) -> Any:
        """Run `calls` on instance i (each twice if `dup`): their raw results, or the
        connection error of an instance that is down."""
        w = self.w
        inst = w.instances[i]
        if not inst.up:
            return redis.ConnectionError(f"Connection refused by i{i}")
        raws = []
        for call in calls:
            raw, events = inst.execute(call, w.t)
            raws.append(raw)
            if w.tracing:  # every script an instance runs, and its raw answer
                w.note(f"i{i} <- c{c.cid}{' again' if again else ''} {call[0]} "
                       f"{call[1][2:3]!r} {list(call[2][:8])!r} -> {raw!r}")
            self._publish(i, events)
            if dup:  # the same script again at once: its reply is read by nobody
                _, events = inst.execute(call, w.t)
                self._publish(i, events)
            bad = inst.unprocessed(call[1])
            if bad is not None:
                w.violation(f"queues not processed (G8) on instance {i} after "
                            f"{call[0]}: {bad}")
        return raws

    def _again(self, c: SimClient, i: int, calls: list) -> None:
        """A late duplicate of a message reaches instance i: run as the original was,
        its reply read by nobody (the client gave up on that exchange long ago)."""
        self._execute(c, i, calls, False, again=True)

    def _publish(self, i: int, events: list) -> None:
        w = self.w
        for owner, payload in events:
            c = w.by_owner.get(owner)
            if c is None or self.lost(c, i, True):
                continue
            w.at(w.t + self.delay(c, i, True), c, c.deliver_event, i, payload)


class World:
    def __init__(self, seed: int, cfg: Config | None = None, trace: bool = False,
                 schedule: Schedule | None = None) -> None:
        self.seed = seed
        self.cfg = cfg = cfg or Config()
        self.t = 0.0
        self._heap: list = []
        self._seq = 0
        self.res = Result(seed)
        self.tracing = trace
        frng = random.Random(seed * 7 + 2)
        self.wrng = random.Random(seed * 7 + 3)
        self.instances = [SimInstance(i, 1.0 + frng.uniform(-cfg.skew, cfg.skew),
                                      frng.randint(-20, 20)) for i in range(cfg.instances)]
        self.net = Network(self)
        self.clients = [SimClient(self, c, cfg.instances, cfg.lease_ms,
                                  1.0 + frng.uniform(-cfg.skew, cfg.skew),
                                  cfg.timeout0 if c == 0 else 1.0)
                        for c in range(cfg.clients)]
        self.by_owner = {c._core.owner: c for c in self.clients}
        self.users: list[Any] = []
        self.observer = Observer(self)
        for inst in self.instances:
            inst.on_write = self.observer.written
        if "aofrestart" in cfg.kinds:  # the minority of instances that run AOF everysec
            for inst in self.instances[:max(1, (cfg.instances - 1) // 2)]:
                inst.enable_aof()
        self._ids = 0
        self.schedule = schedule
        #: the fault plan: (time, kind, args) each
        self.plan: list[tuple] = (list(schedule.faults) if schedule is not None
                                  else self._plan_faults(frng))
        for t, kind, args in self.plan:
            self.at(t, None, getattr(self, "_" + kind), *args)
        self.user_class: type = User
        self.jobs: list[Any] = []  #: each with start() and finish() (tests/sim/jobs.py)
        if cfg.jobs:
            from .jobs import install

            install(self)

    # ----------------------------------------------------------------- scheduler

    def at(self, t: float, target: Any, fn: Callable, *args: Any) -> None:
        """Run fn(*args) at simulated time t, on `target` (a client or instance: deferred
        while it is paused)."""
        heapq.heappush(self._heap, (max(t, self.t), self._seq, target, fn, args))
        self._seq += 1

    def soon(self, target: Any, fn: Callable, *args: Any) -> None:
        self.at(self.t, target, fn, *args)

    def note(self, line: str) -> None:
        if self.tracing:
            self.res.trace.append(f"{self.t:9.4f} {line}")

    def background_error(self, c: SimClient, exc: BaseException) -> None:
        if not isinstance(exc, DLMError):
            self.violation(f"client {c.cid}: a background flow raised {exc!r}")

    def violation(self, what: str) -> None:
        self.res.violations.append(f"t={self.t:.4f} {what}")

    def _new_id(self) -> str:
        self._ids += 1
        return f"s{self.seed}l{self._ids}"

    def run(self) -> Result:
        cfg = self.cfg
        old_id, protocol.new_id = protocol.new_id, self._new_id
        log = logging.getLogger("redlockdlm")
        level, log.level = log.level, logging.CRITICAL
        try:
            for c in self.clients:
                c.start()
            for c in self.clients:
                u = self.user_class(self, c, None if self.schedule is None
                                    else [dict(st) for st in self.schedule.steps.get(c.cid, [])])
                self.users.append(u)
                u.start()
            for job in self.jobs:
                job.start()
            end = cfg.work_s + 4 * cfg.lease_ms / 1000.0 + 4.0  # every request has ended
            if cfg.hold_after_conv:
                # a conversion begun before work_s may wait client 0's socket timeout
                # (no instance answered, R4), then its lock is held up to 4 leases more
                end += cfg.timeout0 + 4 * cfg.lease_ms / 1000.0
            self._loop(end)
            for u in self.users:
                if not u.finished:
                    self.violation(f"liveness: client {u.c.cid}'s call did not end "
                                   f"({u.doing}) {end - cfg.work_s:.1f} s after the faults")
            for job in self.jobs:
                job.finish()
            for c in self.clients:
                c.run(c._close_flow(DLMError("closed")),
                      lambda v, e, c=c: setattr(c, "closed", True))
            end2 = end + 2 * cfg.lease_ms / 1000.0 + 1.0
            self._loop(end2)
            for inst in self.instances:
                for key, lid, owner in inst.live_locks(self.t):
                    self.violation(f"left behind: lock {lid} of {owner} on {key!r} at "
                                   f"instance {inst.idx} a lease after every client closed")
        finally:
            protocol.new_id = old_id
            log.level = level
        self.res.sim_s = self.t
        return self.res

    def _loop(self, until: float) -> None:
        heap = self._heap
        obs = self.observer
        res = self.res
        while heap and heap[0][0] <= until:
            t, seq, target, fn, args = heapq.heappop(heap)
            if target is not None and target.paused_until > t:
                heapq.heappush(heap, (target.paused_until, seq, target, fn, args))
                continue
            self.t = t
            fn(*args)
            res.events += 1
            obs.check()
        self.t = until

    # ----------------------------------------------------------------- faults

    def _plan_faults(self, rng: random.Random) -> list[tuple]:
        cfg = self.cfg
        lease = cfg.lease_ms / 1000.0
        plan: list[tuple] = []
        for _ in range(cfg.faults):
            t = rng.uniform(0.2, cfg.work_s - 0.5)
            kind = rng.choice(cfg.kinds)
            if kind == "ipause":
                i, d = rng.randrange(cfg.instances), rng.uniform(0.02, 1.5 * lease)
                plan.append((t, "pause", ("instance", i, d)))
            elif kind == "irestart":
                i, d = rng.randrange(cfg.instances), rng.uniform(0.01, 0.5)
                plan.append((t, "restart", (i, d)))
            elif kind == "cpause":
                c, d = rng.randrange(cfg.clients), rng.uniform(0.02, 2.0 * lease)
                plan.append((t, "pause", ("client", c, d)))
            elif kind == "latency":
                c, d = rng.randrange(cfg.clients), rng.uniform(*cfg.lat_dur) * lease
                extra = rng.uniform(*cfg.lat_extra) * lease
                plan.append((t, "latency", (c, d, extra)))
            elif kind == "aofrestart":  # one of the minority of AOF everysec instances
                i, d = rng.randrange(max(1, (cfg.instances - 1) // 2)), rng.uniform(0.01, 0.5)
                plan.append((t, "aofrestart", (i, d)))
            elif kind == "restartcut":  # gap 1: an empty restart, a holder cut from it
                i, d = rng.randrange(cfg.instances), rng.uniform(0.01, 0.5)
                plan.append((t, "restartcut", (i, d, rng.uniform(2.5, 4.0) * lease)))
            elif kind == "latedup":  # V6: a client's messages delivered again, later
                c, d = rng.randrange(cfg.clients), rng.uniform(*cfg.echo_dur) * lease
                lag = rng.uniform(*cfg.echo_lag) * lease
                plan.append((t, "latedup", (c, d, lag)))
            elif kind == "convloss":  # R1: a conversion missed, then a cut elsewhere
                c, i = rng.randrange(cfg.clients), rng.randrange(cfg.instances)
                j, d = rng.randrange(cfg.instances), rng.uniform(1.0, 2.5) * lease
                plan.append((t, "convloss", (c, i, 2.0 * lease, j, d)))
            elif kind == "vminor":  # V7: a write on a minority, readers that miss it
                order = rng.sample(range(cfg.instances), cfg.instances)
                k = cfg.instances - (cfg.instances // 2 + 1)  # N - Q: what a quorum spares
                plan.append((t, "vminor", (rng.randrange(cfg.clients), sorted(order[:k]),
                                           order[k], sorted(order[k + 1:]), 4.0 * lease,
                                           rng.uniform(0.5, 1.5) * lease)))
            elif kind == "relloss":  # G13: a write's release lost on one instance, idle there
                i, d = rng.randrange(cfg.instances), rng.uniform(*cfg.relloss_cut) * lease
                plan.append((t, "relloss", (i, 2.0 * lease, d)))
            elif kind == "rejoinread":  # R2 + V5: a write missed, a restart, a reader
                order = rng.sample(range(cfg.instances), cfg.instances)
                q = cfg.instances // 2 + 1
                k = cfg.instances - q + 1  # (i and the N - Q instances that miss: a quorum)
                i, miss, other = order[0], order[1:k], order[k:]
                t = rng.uniform(0.2, cfg.work_s / 2)  # (readers come after the restart)
                plan.append((t, "rejoinread", (i, sorted(miss), sorted(other), 4.0 * lease,
                                               rng.uniform(1.0, 2.0) * lease,
                                               rng.uniform(0.5, 1.2) * lease)))
            else:
                c, d = rng.randrange(cfg.clients), rng.uniform(0.05, 2.0 * lease)
                k = rng.randint(1, cfg.instances)
                cut = sorted(rng.sample(range(cfg.instances), k))
                plan.append((t, "partition", (c, cut, d)))
        return plan

    def _fault(self, what: str) -> None:
        self.res.faults.append(f"t={self.t:.4f} {what}")
        self.note(what)

    def _pause(self, what: str, idx: int, d: float) -> None:
        who = (self.instances if what == "instance" else self.clients)[idx]
        name = f"{what} {idx}"
        who.paused_until = max(who.paused_until, self.t + d)
        self._fault(f"pause {name} for {d * 1000:.0f} ms")

    def _restart(self, i: int, d: float) -> None:
        inst = self.instances[i]
        inst.up = False
        inst.paused_until = 0.0
        self._fault(f"instance {i} crashes, back empty in {d * 1000:.0f} ms")

        def back() -> None:
            inst.restart_empty()
            inst.up = True

        self.at(self.t + d, None, back)

    def _restartcut(self, i: int, d: float, cut: float) -> None:
        """Instance i restarts empty, and every client holding a lock then stays cut from
        it past the rejoin wait and V5's window (docs/protocol.md, "What is not covered":
        their locks re-join late); the others reach it as soon as it is back."""
        self._restart(i, d)
        for c in self.clients:
            if any(lk.phase in (Phase.HELD, Phase.CONVERTING)
                   for lk in c._core.locks.values()):
                self._partition(c.cid, [i], cut)

    def _aofrestart(self, i: int, d: float) -> None:
        inst = self.instances[i]
        inst.up = False
        inst.paused_until = 0.0
        crashed_at = self.t
        self._fault(f"instance {i} (AOF everysec) crashes, back from its AOF in "
                    f"{d * 1000:.0f} ms")

        def back() -> None:
            inst.restart_from_aof(crashed_at)
            inst.up = True

        self.at(self.t + d, None, back)

    def _latency(self, c: int, d: float, extra: float) -> None:
        self.net.lag[c] = (self.t + d, extra)
        self._fault(f"client {c}'s messages {extra * 1000:.0f} ms slower each way for "
                    f"{d * 1000:.0f} ms")

    def _latedup(self, c: int, d: float, lag: float) -> None:
        self.net.echo[c] = (self.t + d, lag)
        self._fault(f"client {c}'s messages of the next {d * 1000:.0f} ms delivered again "
                    f"{lag * 1000:.0f} ms later")

    def _convloss(self, c: int, i: int, within: float, j: int, d: float) -> None:
        self.net.convloss[(c, i)] = (self.t + within, (j, d))
        self._fault(f"client {c}'s next conversion to instance {i} (within "
                    f"{within * 1000:.0f} ms) will be lost")

    def _vminor(self, c: int, miss: list[int], q: int, rest: list[int], within: float,
                d: float) -> None:
        self.net.vminor = [self.t + within, c, miss, q, rest, d, None, 0]
        self._fault(f"client {c}'s next up-conversion to PW/EX (within {within * 1000:.0f} "
                    f"ms) will miss instances {miss}, its next write by a down-conversion "
                    f"instance {q}")

    def _relloss(self, i: int, within: float, d: float) -> None:
        self.net.relloss[i] = (self.t + within, d)
        self._fault(f"the next release that writes nothing, to instance {i} (within "
                    f"{within * 1000:.0f} ms), will be lost")

    def _rejoinread(self, i: int, miss: list[int], other: list[int], within: float,
                    gap: float, d: float) -> None:
        """R2 and V5's schedule: the next writer's lock (requested within `within`) never
        reaches `miss`, so only i and `other` (a bare quorum) store its write; instance i
        (not in `miss`) restarts empty 0.3 s after that release and forgets it; the locks
        held across the
        restart re-join it (R2); `gap` after its restart every client is cut from `other`
        for `d`, so a reader's quorum is i (a forgotten value block, V5) and `miss` (the
        older value)."""
        self.net.writemiss = (self.t + within, i, miss, other, gap, d)
        self.net._writemiss_id = None
        self._fault(f"the next writer (within {within * 1000:.0f} ms) will miss instances "
                    f"{miss}; then instance {i} restarts")

    def _partition(self, c: int, cut: list[int], d: float) -> None:
        for i in cut:
            self.net.cut[(c, i)] = self.t + d
        self._fault(f"client {c} cut from instances {cut} for {d * 1000:.0f} ms")


class User:
    """A client's application: lock, maybe convert, hold, release, on a few resources, with
    timeouts; sometimes interrupted (KeyboardInterrupt) or cancelled at a random point. A
    step is a generator driven by `_advance`."""

    def __init__(self, world: World, c: SimClient, steps: list[dict] | None = None) -> None:
        self.w = world
        self.c = c
        self.rng = random.Random(world.seed * 7 + 4 + 1000 * c.cid)
        self.finished = False
        self.doing = "start"
        self.gen: Generator | None = None
        self.wait_gen = 0
        self.steps: list[dict] | None = steps  #: a schedule to replay (None: draw them)
        self.recorded: list[dict] = []  #: the steps drawn

    def start(self) -> None:
        self.gen = self.script()
        self.w.soon(self.c, self._advance, None)

    def _advance(self, value: Any) -> None:
        try:
            cmd = self.gen.send(value)
        except StopIteration:
            self.finished = True
            return
        kind = cmd[0]
        c = self.c
        if kind == "sleep":
            self.w.at(self.w.t + cmd[1], c, self._advance, None)
        elif kind == "flow":
            _, flow, interrupt_after = cmd
            proc = c.run(flow, lambda v, e: self._advance((v, e)))
            if interrupt_after is not None:
                self.w.at(self.w.t + interrupt_after, c, self._interrupt, proc)
        elif kind == "req":  # until the request is done, or the user gives up
            _, req, give_up = cmd
            if req.done:
                self.w.soon(c, self._advance, True)
                return
            self.wait_gen += 1
            gen = self.wait_gen
            req.waiter = lambda: self._req_done(gen)
            if give_up is not None:
                self.w.at(self.w.t + give_up, c, self._give_up, req, gen)

    def _req_done(self, gen: int) -> None:
        if gen == self.wait_gen:
            self.wait_gen += 1
            self._advance(True)

    def _give_up(self, req: Any, gen: int) -> None:
        if gen == self.wait_gen and not req.done:
            self.wait_gen += 1
            req.waiter = None
            self._advance(False)

    def _interrupt(self, proc: Any) -> None:
        if self.c.interrupt(proc):
            self.w.note(f"client {self.c.cid}: interrupted in {self.doing}")

    def _count(self, what: str) -> None:
        o = self.w.res.outcomes
        o[what] = o.get(what, 0) + 1

    def step_records(self) -> Iterator[Callable[[str, Callable[[], Any]], Any]]:
        """The user's steps while the workload runs, each a dict of its random choices:
        replayed from `steps` (a shrunk schedule; they end when used up), else drawn and
        recorded in `recorded`. Yields for each its `draw(key, fn)`: the step's value of
        `key`, drawn with `fn` and recorded the first time."""
        w, c, cfg = self.w, self.c, self.w.cfg
        replay = self.steps is not None
        steps = self.steps if replay else self.recorded
        k = 0
        while w.t < cfg.work_s:
            if replay:
                if k == len(steps):
                    return
                st = steps[k]
            else:
                st = {"n": k}
                steps.append(st)
            w.net.step[c.cid] = st["n"]
            k += 1

            def draw(key: str, fn: Callable[[], Any], st: dict = st) -> Any:
                if key not in st:
                    st[key] = fn()
                return st[key]

            yield draw

    def script(self) -> Generator:
        """The user's steps, one lock each (`step_records`: every random choice of a step
        is drawn once and recorded, or replayed from a shrunk schedule)."""
        w, c, rng, cfg = self.w, self.c, self.rng, self.w.cfg
        modes = cfg.modes or (Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PR, Mode.PW, Mode.EX,
                              Mode.EX)
        maybe = lambda: (rng.uniform(0.0, 0.3) if rng.random() < cfg.interrupt else None)  # noqa: E731
        lease = cfg.lease_ms / 1000.0
        for draw in self.step_records():
            yield ("sleep", draw("pause", lambda: rng.uniform(0.0, 0.05)))
            idle = draw("idle", lambda: rng.uniform(1.0, 2.5) * lease
                        if cfg.idle and rng.random() < cfg.idle else 0.0)
            if idle:
                yield ("sleep", idle)
            name = draw("res", lambda: f"r{rng.randrange(cfg.resources)}")
            mode = draw("mode", lambda: rng.choice(modes))
            timeout = draw("timeout", lambda: rng.choice((0.1, 0.3, 1.0, 2.0)))
            self.doing = f"lock {name} {mode.name}"
            try:
                lk, req = c.new_request(name, mode, timeout)
            except DLMError:
                continue
            w.note(f"client {c.cid}: {self.doing} -> {lk.id}")
            v, e = yield ("flow", c._request(lk, req), draw("int_req", maybe))
            w.res.ops += 1
            if e is not None:
                self._count(f"request {type(e).__name__}")
                continue
            if not (yield ("req", req, draw("int_wait", maybe))):
                self.doing = f"cancel {name}"
                yield ("flow", c._withdraw(req), None)
                w.res.ops += 1
                self._count("request cancelled")
                continue
            if req._error is not None:
                self._count(f"request {type(req._error).__name__}")
                continue
            self._count("granted")
            # (a lock held 1 to 4 leases, renewed through faults, or 0..0.2 s)
            yield ("sleep", draw("hold", lambda: rng.uniform(1.0, 4.0) * lease
                                 if cfg.hold and rng.random() < cfg.hold
                                 else rng.uniform(0.0, 0.2)))
            for n in range(cfg.chain):
                x = str(n) if n else ""  # (the first conversion's draws keep their names)
                if not (draw("conv" + x, lambda n=n: rng.random() < (0.7 if n else 0.4))
                        and lk.phase is Phase.HELD):
                    break
                to = draw("to" + x, lambda: rng.choice(modes))
                self.doing = f"convert {name} {lk.mode.name}->{to.name}"
                ct = draw("conv_timeout" + x, lambda: rng.choice((0.1, 0.5, 1.0)))
                wrote = None
                if (cfg.down_writes and lk.mode is not None and lk.mode >= Mode.PW
                        and is_down_conversion(lk.mode, to)):
                    wrote = lk.new_value = b"%s@%d~%d" % (lk.id.encode(), lk.token, n)
                v, e = yield ("flow", c._convert(lk, to, ct), draw("int_conv" + x, maybe))
                w.res.ops += 1
                self._count("converted" if e is None else f"convert {type(e).__name__}")
                w.note(f"client {c.cid}: {self.doing} {lk.id}: {e!r}")
                if wrote is not None and e is None:
                    w.observer.returned(lk.key, wrote)
                self.doing = f"hold {name} after a conversion"
                yield ("sleep", draw("after_conv" + x, lambda: rng.uniform(1.0, 4.0) * lease
                                     if cfg.hold_after_conv
                                     and rng.random() < cfg.hold_after_conv
                                     else rng.uniform(0.0, 0.1)))
            wrote = None
            if (lk.phase is Phase.HELD and lk.mode is not None and lk.mode >= Mode.PW
                    and (cfg.release_writes >= 1.0 or draw(
                        "rel_write", lambda: rng.random() < cfg.release_writes))):
                wrote = lk.new_value = b"%s@%d" % (lk.id.encode(), lk.token)  # (unique)
            self.doing = f"release {name}"
            v, e = yield ("flow", c._release(lk), draw("int_rel", maybe))
            w.res.ops += 1
            self._count("released" if e is None else f"release {type(e).__name__}")
            if wrote is not None and e is None:
                w.observer.returned(lk.key, wrote)
        self.doing = "done"
        w.net.step[c.cid] = "end"


def _during(old: Mode | None, new: Mode) -> Mode | None:
    """What a converting holder may rely on while its conversion is in flight (instances
    may hold either mode): the strongest mode both cover (up: the old one; down: the new
    one; CW<->PR: CR)."""
    if old is None:
        return None
    return _DURING[old, new]


_DURING = {(a, b): max(x for x in Mode if covers(a, x) and covers(b, x))
           for a in Mode for b in Mode}


class Observer:
    """Checks, after every event, from the truth of every client's state at that instant:
    (1) no two incompatible locks both believed valid by their holders (`validity(now) > 0`
    in phase HELD, or converting: `_during`);
    (2) fencing: a grant's token is above the token of every earlier conflicting grant on
    its resource (as a resource that checks tokens sees them);
    (3) value blocks: a value a holder reads as valid (at its grant, any mode but NL) is
    the last write committed when its request or conversion started, or a newer one (a
    write is committed once a quorum of instances stores it; "last" by version, which
    follows the writers' tokens; a CR reader is granted beside a PW writer, so a write
    committed while its grant is in flight may or may not be seen), or no value at all (a
    value block disappears with the resource's last lock, G9, G13).
    (Queues processed on every instance is checked by the network after each call.)"""

    def __init__(self, world: World) -> None:
        self.w = world
        self.seen: set[tuple[str, int, int]] = set()  #: (lock id, token, mode) checked
        #: resource key -> mode -> [(token, lock id)] the two highest, distinct lock ids
        self.top: dict[bytes, dict[int, list[tuple[int, str]]]] = {}
        self.quorum = world.cfg.instances // 2 + 1
        #: (key, value) -> [version, {instances storing it}] of every write seen
        self.writes: dict[tuple[bytes, bytes], list] = {}
        #: key -> [(time, version, value)] of each write when a quorum stored it
        self.commits: dict[bytes, list[tuple[float, int, bytes]]] = {}
        #: lock ids left out of (1): broken by an operator (tests/sim/jobs.py; their holders
        #: may believe them valid until they learn, docs/verification.md)
        self.exempt: set[str] = set()
        self.extra: list[Callable[[], None]] = []  #: the jobs' checks, after every event

    def written(self, inst: Any, key: bytes, value: bytes, version: int,
                stored: bool) -> None:
        rec = self.writes.setdefault((key, value), [version, set()])
        if not stored:
            return
        rec[1].add(inst.idx)
        if len(rec[1]) == self.quorum:
            self.commits.setdefault(key, []).append((self.w.t, version, value))

    def returned(self, key: bytes, value: bytes) -> None:
        """A release or down-conversion that wrote `value` returned without an error: its
        caller takes the write as done, so it counts as committed from now on, whether
        or not a quorum stores it (V7; a write known on a quorum is committed already)."""
        rec = self.writes.get((key, value))
        if self.w.cfg.returned_commits and rec is not None and len(rec[1]) < self.quorum:
            self.commits.setdefault(key, []).append((self.w.t, rec[0], value))

    def _read(self, c: Any, lk: Any) -> None:
        """(3) for a holder that just got its grant."""
        if not lk.value_valid or lk.value is None:
            return
        # when the request (or the conversion) started: its G11 ticket, from the clock
        t0 = c.to_sim((max(lk.ticket, lk.cticket) - TICKET0) / 1e6)
        last = max(((v, val) for t, v, val in self.commits.get(lk.key, ()) if t <= t0),
                   default=None)
        rec = self.writes.get((lk.key, lk.value))
        if rec is None:
            self.w.violation(f"value: client {c.cid} lock {lk.id} read {lk.value!r} "
                             f"valid on {lk.name!r}, never written")
        elif last is not None and rec[0] < last[0]:
            self.w.violation(f"value: client {c.cid} lock {lk.id} {lk.mode.name} read "
                             f"{lk.value!r} (version {rec[0]}) valid on {lk.name!r}; the "
                             f"last write committed before it started is {last[1]!r} "
                             f"(version {last[0]}); "
                             + self._where(lk.key, lk.value))

    def _where(self, key: bytes, value: bytes) -> str:
        """Which instances keep `value`, and the locks that keep the resource alive there
        (a lock its owner no longer has: its release or expiry did not reach there)."""
        w = self.w
        out = []
        for inst in w.instances:
            r = inst.model.res.get(key)
            if r is None or r.vb != value:
                continue
            now = inst.clock_ms(w.t)
            locks = []
            for q in (r.g, r.c, r.w):
                for o in q:
                    c = w.by_owner.get(o.owner)
                    mine = c is not None and c._core.locks.get(o.id) is not None
                    locks.append(f"{o.id}{'' if mine else ' (stale)'}"
                                 f"{' expired' if o.exp <= now else ''}")
            out.append(f"instance {inst.idx} keeps it under {', '.join(locks)}")
        return "; ".join(out) or "no instance keeps it now"

    def check(self) -> None:
        w = self.w
        w.res.checks += 1
        held: dict[bytes, list[tuple[int, Any, Mode]]] = {}
        for c in w.clients:
            now = None
            for lk in c._core.locks.values():
                ph = lk.phase
                if ph is Phase.HELD:
                    m = lk.mode
                elif ph is Phase.CONVERTING:
                    m = _during(lk.mode, lk.rq)
                else:
                    continue
                if now is None:
                    now = c._now()
                if m is None or lk.validity(now) <= 0 or lk.id in self.exempt:
                    continue
                lst = held.setdefault(lk.key, [])
                for cid, other, om in lst:
                    if not COMPAT[m][om]:
                        w.violation(f"two holders: client {c.cid} lock {lk.id} {m.name} "
                                    f"token {lk.token} and client {cid} lock {other.id} "
                                    f"{om.name} token {other.token} on {lk.name!r}")
                lst.append((c.cid, lk, m))
                if w.tracing:  # every script an instance runs, and its raw answer
                    w.note(f"holder c{c.cid} {lk.id} {lk.phase.value} {m.name} "
                           f"mode={lk.mode} rq={lk.rq} votes="
                           + ",".join(f"{v.vote.value}:{v.mode}" for v in lk.votes))
                mark = (lk.id, lk.token, int(m))
                if mark not in self.seen:
                    self.seen.add(mark)
                    self._fencing(lk, m)
                    if ph is Phase.HELD and m is not Mode.NL:
                        self._read(c, lk)
        for fn in self.extra:
            fn()

    def _fencing(self, lk: Any, m: Mode) -> None:
        tops = self.top.setdefault(lk.key, {})
        for x in Mode:
            if COMPAT[m][x]:
                continue
            for tok, lid in tops.get(int(x), ()):
                if lid != lk.id and tok >= lk.token:
                    self.w.violation(f"fencing: lock {lk.id} {m.name} granted with token "
                                     f"{lk.token} after lock {lid} {x.name} with {tok} "
                                     f"on {lk.name!r}")
        lst = [e for e in tops.get(int(m), []) if e[1] != lk.id] + [(lk.token, lk.id)]
        tops[int(m)] = sorted(lst, reverse=True)[:2]


def run_seed(seed: int, cfg: Config | None = None, trace: bool = False,
             schedule: Schedule | None = None) -> Result:
    return World(seed, cfg, trace, schedule).run()


def recorded(seed: int, cfg: Config | None = None) -> tuple[Result, Schedule]:
    """Run a seed and return its schedule, as `Schedule`."""
    w = World(seed, cfg)
    res = w.run()
    return res, Schedule(list(w.plan), {u.c.cid: u.recorded for u in w.users})
