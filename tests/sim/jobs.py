"""Simulated jobs beside the users (`Config.jobs`, opt-in: `PROFILES` "deadlock", "breaks",
"jobs" in tests/sim/run.py): the deadlock detector, a workload that makes deadlocks, and an
operator's `dlm break`; with the invariants they need (docs/verification.md, "Jobs").

* `SimDetector`: one detector process. Its rounds run the real decision code of
  `redlockdlm.detector` (`_parse_scan` of lua/scan.lua's reply, `wait_for_graph`,
  `find_cycles`, `judge`: D7's confirmation and D8's victim) over replies that come from the
  simulated instances through the simulated network, on the process's own clock: a full
  round every `INTERVAL` s (the waiter index, then the resources it names, D1), a
  confirming round `INTERVAL / 2` after one that saw a new cycle (only that cycle's
  resources), the victim cancelled on every instance with reason ``deadlock`` (D8). Several
  run; each leads only while it holds `__leader__/detector` in EX on a quorum, taken with
  NOQUEUE before each round, as `redlockdlm.leader.Leadership` does through a real client
  core (`SimClient`): leaders are elected under the simulated faults.
* `DeadlockUser`: takes two resources in a random order (and sometimes converts the first
  up first), waiting without a timeout: opposite orders and conversions make real
  deadlocks, which only the detector ends.
* `Operator`: `dlm break` at random times, of a random lock its holder believes held
  (`--lock`) or of its owner's locks on that resource (`--owner`), on every instance; a
  detector's leadership lock among them (a broken leader stands by once it learns).

Checks (beside the observer's): no victim where there was no cycle (`Truth`), a broken
lock never comes back on an instance that broke it, its holder learns it lost it within a
lease and a renewal, two detectors never both lead.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from types import SimpleNamespace
from typing import Any

from redlockdlm.detector import (
    InstanceScan,
    Snapshot,
    find_cycles,
    judge,
    wait_for_graph,
)
from redlockdlm.detector.graph import Cycle, WaitingRequest
from redlockdlm.detector.scanning import _parse_scan, _split_members
from redlockdlm.engine import codec
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.engine.modes import COMPAT, Mode
from redlockdlm.errors import DLMError, ProtocolError
from redlockdlm.flows import Broadcast, Flow, Wait
from redlockdlm.protocol import Phase, command

from .client import SimClient
from .world import User

INTERVAL = 0.5  #: s between a detector's full rounds (`dlm detector --interval`)
DETECTORS = 2  #: detector processes; one leads
BREAKS = 4  #: operator breaks per run
LEADER = "__leader__/detector"


def install(w: Any) -> None:
    """Add the jobs of `w.cfg.jobs` to world `w` (before it runs)."""
    jobs = w.cfg.jobs
    rng = random.Random(f"{w.seed}:jobs")
    if "deadlocks" in jobs:
        w.user_class = DeadlockUser
    truth = Truth(w)
    if "detector" in jobs:
        dets = [SimDetector(w, k, truth, rng) for k in range(DETECTORS)]
        w.jobs.extend(dets)
        w.observer.extra.append(lambda: _one_leader(w, dets))
    if "breaks" in jobs:
        w.jobs.append(Operator(w, rng))


def job_client(w: Any, cid: int) -> SimClient:
    """A client process for a job: the real client core, its own network streams."""
    cfg = w.cfg
    c = SimClient(w, cid, cfg.instances, cfg.lease_ms, 1.0, 1.0)
    w.by_owner[c._core.owner] = c
    return c


def close(c: SimClient) -> None:
    """Close a job's client as the world closes the users' (its locks released)."""
    c.run(c._close_flow(DLMError("closed")), lambda v, e: setattr(c, "closed", True))


def _sleep(until: float) -> Flow:
    """Until the client clock reads `until`."""
    yield Wait(SimpleNamespace(waker=None), until)


# ----------------------------------------------------------------- the truth


class Truth:
    """What an observer that sees every client and every instance knows of who waits for
    whom: an over-approximation of the wait-for graph between owners, so that a victim
    whose owner is on no cycle of it had no deadlock to break. A lock W waiting for `rq`
    (its client is acquiring or converting it, or an instance queues it) waits for
    another lock of its resource that some client believes held, or some instance grants
    or converts, in a mode incompatible with `rq` (G1, G5); a new request also waits for
    every queued conversion and every earlier waiter, compatible or not (G8: no barging;
    what those wait for it inherits). Client beliefs and every instance are merged, and
    expired leases count too: it can only have more edges than the real graph."""

    def __init__(self, w: Any) -> None:
        self.w = w
        self.chosen = 0
        self.false = 0
        #: lock id -> (its owner was on a cycle when chosen, what chose it)
        self.verdict: dict[str, tuple[bool, str]] = {}
        w.truth = self

    def edges(self) -> dict[str, set[str]]:
        w = self.w
        per: dict[bytes, list[tuple]] = {}  # key -> (owner, id, held, rq, conv, ticket)
        for c in w.clients:
            for lk in c._core.locks.values():
                ph = lk.phase
                if ph is Phase.HELD:
                    per.setdefault(lk.key, []).append((c._core.owner, lk.id, lk.mode, None,
                                                       False, lk.ticket))
                elif ph is Phase.CONVERTING:
                    per.setdefault(lk.key, []).append((c._core.owner, lk.id, lk.mode, lk.rq,
                                                       True, lk.cticket))
                elif ph is Phase.ACQUIRING:
                    per.setdefault(lk.key, []).append((c._core.owner, lk.id, None, lk.rq,
                                                       False, lk.ticket))
        for inst in w.instances:
            for key, r in inst.model.res.items():
                for q, conv in ((r.g, False), (r.c, True), (r.w, False)):
                    for lk in q:
                        held = None if lk.gr is None else Mode(lk.gr)
                        rq = None if lk.rq is None else Mode(lk.rq)
                        per.setdefault(key, []).append(
                            (lk.owner, lk.id, held, rq, conv, lk.cticket if conv else lk.ticket))
        adj: dict[str, set[str]] = {}
        for locks in per.values():
            for o, lid, _, rq, conv, tk in locks:
                if rq is None:
                    continue
                for o2, lid2, held2, rq2, conv2, tk2 in locks:
                    if lid2 == lid:
                        continue
                    if ((held2 is not None and not COMPAT[held2][rq])
                            or (not conv and rq2 is not None and (conv2 or tk2 <= tk))):
                        adj.setdefault(o, set()).add(o2)
        return adj

    def on_cycle(self, owner: str, adj: dict[str, set[str]] | None = None) -> bool:
        """Whether `owner` is on a cycle of `adj` (default: the graph now)."""
        if adj is None:
            adj = self.edges()
        seen, todo = set(), list(adj.get(owner, ()))
        while todo:
            o = todo.pop()
            if o == owner:
                return True
            if o not in seen:
                seen.add(o)
                todo.extend(adj.get(o, ()))
        return False

    def victim(self, det: SimDetector, req: WaitingRequest, cyc: Cycle,
               before: dict[str, set[str]]) -> None:
        """A detector chose `req`: whether its owner is on a cycle now or was when the
        deciding round began (`before`: its reads came in between; a cycle that an
        operator's break or a lease ran out ended meanwhile is a race the detector cannot
        see), kept for `ended` (a victim whose cycle dissolved is harmless if the cancel
        finds its request gone or granted: only a victim told `Deadlock` is judged)."""
        w = self.w
        self.chosen += 1
        ok = self.on_cycle(req.owner) or self.on_cycle(req.owner, before)
        self.verdict[req.lock_id] = (ok, f"detector {det.k} chose it at t={w.t:.4f} on "
                                         f"{req.key!r} ({'->'.join(cyc.path)})")
        w.note(f"detector {det.k}: victim {req.lock_id} of {req.owner} "
               f"(cycle {'->'.join(cyc.path)}), on a cycle now: {ok}")

    def ended(self, c: SimClient, lock_id: str, e: BaseException) -> None:
        """A user's request or conversion ended with `Deadlock` as a victim: a detector
        must have chosen it while its owner was on a cycle."""
        if type(e).__name__ != "Deadlock" or "victim" not in str(e):
            return
        got = self.verdict.get(lock_id)
        if got is None:
            self.w.violation(f"client {c.cid}: {lock_id} told it is a deadlock victim; no "
                             f"detector chose it")
        elif not got[0]:
            self.false += 1
            self.w.violation(f"false victim: client {c.cid}'s {lock_id} cancelled as a "
                             f"deadlock victim; {got[1]}, with no cycle through its owner")


# ----------------------------------------------------------------- the detector


def _one_leader(w: Any, dets: list[SimDetector]) -> None:
    """Two detectors never both believe they lead (the leadership lock is an EX lock: the
    observer's invariant (1) for it), unless the operator broke one's lock."""
    leading = []
    for d in dets:
        lk = d.lk
        if (lk is not None and lk.phase is Phase.HELD and lk.id not in w.observer.exempt
                and lk.validity(d.c._now()) > 0):
            leading.append(d.k)
    if len(leading) > 1:
        w.violation(f"two detectors lead: {leading}")


class SimDetector:
    """One detector process (see the module's docstring)."""

    def __init__(self, w: Any, k: int, truth: Truth, rng: random.Random) -> None:
        self.w = w
        self.k = k
        self.truth = truth
        self.c = job_client(w, 100 + k)
        self.previous: list[Cycle] = []
        self.lk: Any = None  #: the leadership lock
        self.stopped = False
        self.rounds = self.led = 0
        self.victims: list[str] = []
        cfg = w.cfg
        lease = cfg.lease_ms / 1000.0
        # leader election under faults: each detector paused once, maybe cut from instances
        t, d = rng.uniform(0.5, cfg.work_s - 0.5), rng.uniform(0.2, 2.0) * lease
        w.at(t, None, self._pause, d)
        if rng.random() < 0.5:
            t, d = rng.uniform(0.5, cfg.work_s - 0.5), rng.uniform(0.2, 2.0) * lease
            cut = sorted(rng.sample(range(cfg.instances), rng.randint(1, cfg.instances)))
            w.at(t, None, w._partition, self.c.cid, cut, d)

    def _pause(self, d: float) -> None:
        self.c.paused_until = max(self.c.paused_until, self.w.t + d)
        self.w._fault(f"pause detector {self.k} for {d * 1000:.0f} ms")

    def start(self) -> None:
        self.c.start()
        self.w.at(0.05 + 0.1 * self.k, self.c, lambda: self.c.run(self._loop(),
                                                                   self._ended))

    def _ended(self, v: Any, e: BaseException | None) -> None:
        if e is not None:
            self.w.violation(f"detector {self.k}: its loop raised {e!r}")

    def finish(self) -> None:
        self.stopped = True
        self.w.note(f"detector {self.k}: {self.rounds} rounds, {self.led} led, "
                    f"victims {self.victims}")
        close(self.c)

    def _loop(self) -> Flow:
        """`Detector.run_forever` without watch rounds: a full round every INTERVAL, and a
        confirming round INTERVAL / 2 after the reads of one that saw a new cycle (D7)."""
        c = self.c
        while not self.stopped:
            t0 = c._now()
            try:
                read_at = yield from self._round(True)
                if read_at is not None:
                    yield from _sleep(read_at + INTERVAL / 2)
                    if self.stopped:
                        break
                    yield from self._round(False)
            except DLMError as exc:  # as run_forever: logged, the next round starts afresh
                self.w.note(f"detector {self.k}: round failed: {exc!r}")
            yield from _sleep(t0 + INTERVAL)

    def _lead(self) -> Flow:
        """`Leadership.__call__`: True while our EX lock on LEADER is valid (held on a
        quorum, `Lock.valid`); else release it and try again with NOQUEUE."""
        c = self.c
        core = c._core
        lk = self.lk
        if lk is not None:
            if (lk.phase in (Phase.HELD, Phase.CONVERTING)
                    and core.holding(lk, c._now()) >= core.quorum):
                return True
            self.w.note(f"detector {self.k}: leadership lost")
            self.lk = None
            try:
                yield from c._release(lk)
            except DLMError:
                pass
        lk, req = c._new_request(LEADER, Mode.EX, timeout=None, noqueue=True,
                                 expedite=False, no_deadlock_wait=False, value_block=False,
                                 on_granted=None, on_blocking=None, on_lost=None,
                                 lease_ms=None, parent=None, priority=0)
        try:
            yield from c._request(lk, req)
        except DLMError:
            return False
        while not req.done:
            yield Wait(lk, c._now() + 0.05)
        if req._error is not None:
            return False
        self.lk = lk
        self.w.note(f"detector {self.k}: leading (token {lk.token})")
        return True

    def _round(self, full: bool) -> Flow:
        """One round (`Detector._round`); the time of its reads if it saw a new cycle."""
        c, w = self.c, self.w
        core = c._core
        n = core.n
        self.rounds += 1
        if not (yield from self._lead()):
            self.previous = []  # a standby forgets (a new leader confirms itself, D7)
            return None
        self.led += 1
        before = self.truth.edges()  # (the truth when the round's reads start)
        waiters: dict[int, Any] = {}
        if full:  # D1: the waiter index, then the resources it names, per instance
            got = yield Broadcast([(i, command("waiters", [EPOCH_KEY, core.wkey], []))
                                   for i in range(n)])
            keys: dict[int, list[bytes]] = {}
            for i, res in got.items():
                if isinstance(res, BaseException):
                    waiters[i] = res
                    continue
                ws = _split_members(list(res[1:]))
                waiters[i] = ws
                keys[i] = list(dict.fromkeys(key for _, key in ws))
        else:  # D7: only the resources of the cycles to confirm, on every instance
            want = list(dict.fromkeys(e.key for cyc in self.previous for e in cyc.edges))
            keys = {i: want for i in range(n)}
        cmds = [(i, command("scan", [EPOCH_KEY, *ks], [])) for i, ks in keys.items() if ks]
        scans = (yield Broadcast(cmds)) if cmds else {}
        read_at = c._now()
        insts = []
        for i in range(n):
            label = core.labels[i]
            err = waiters.get(i) if isinstance(waiters.get(i), BaseException) else None
            raw = scans.get(i)
            if err is None and isinstance(raw, BaseException):
                err = raw
            if err is not None:
                insts.append(InstanceScan(label, error=repr(err)))
                continue
            now, resources = 0, {}
            if raw is not None:
                try:
                    now, resources, _ = _parse_scan(keys[i], raw)
                except ProtocolError as exc:
                    w.violation(f"detector {self.k}: scan reply of instance {i}: {exc!r}")
                    insts.append(InstanceScan(label, error=repr(exc)))
                    continue
            insts.append(InstanceScan(label, now, tuple(waiters.get(i, ())), resources))
        snap = Snapshot(tuple(insts))
        cycles = find_cycles(wait_for_graph(snap))
        j = judge(cycles, self.previous, snap)
        self.previous = list(j.remember)
        for cyc in j.first_seen:
            w.note(f"detector {self.k}: cycle seen {'->'.join(cyc.path)}")
        for req, cyc in j.victims:  # D8: cancel on every instance, reason deadlock
            self.truth.victim(self, req, cyc, before)
            self.victims.append(req.lock_id)
            args = codec.cancel_args(core.rejoin_ms, core.chan_prefix, req.owner, req.lock_id,
                                     "deadlock", True)
            cancel = command("cancel", [EPOCH_KEY, core.wkey, req.key,
                                        req.parent_key or req.key], args)
            yield Broadcast([(i, cancel) for i in range(n)])
        return read_at if full and j.first_seen else None


# ----------------------------------------------------------------- the workload


class DeadlockUser(User):
    """Built by the world in place of `User`: lock one resource, maybe convert it up, lock
    a second one, release both, the two resources in a random order, waiting without a
    timeout (one request in five with 3 s, longer than the detector needs): opposite
    orders and up-conversions make real deadlocks, ended only by the detector (or at once
    by G7, G14)."""

    def script(self) -> Generator:
        return _deadlock_script(self)


def _deadlock_script(u: Any) -> Generator:
    w, c, rng, cfg = u.w, u.c, u.rng, u.w.cfg
    modes = (Mode.PR, Mode.PW, Mode.EX, Mode.EX, Mode.CW)
    for draw in u.step_records():
        yield ("sleep", draw("pause", lambda: rng.uniform(0.0, 0.1)))
        names = draw("res", lambda: rng.sample([f"r{i}" for i in range(cfg.resources)], 2))
        held = []
        for j, name in enumerate(names):
            mode = draw(f"mode{j}", lambda: rng.choice(modes))
            timeout = draw(f"timeout{j}", lambda: 3.0 if rng.random() < 0.2 else None)
            u.doing = f"lock {name} {mode.name}"
            try:
                lk, req = c.new_request(name, mode, timeout)
            except DLMError as exc:  # G14 (its own lock) and the like: refused at once
                u._count(f"request {type(exc).__name__}")
                break
            v, e = yield ("flow", c._request(lk, req), None)
            w.res.ops += 1
            if e is None:
                yield ("req", req, None)
                e = req._error
            if e is not None:
                u._count(_outcome("request", e))
                w.truth.ended(c, lk.id, e)
                break
            u._count("granted")
            held.append(lk)
            yield ("sleep", draw(f"hold{j}", lambda: rng.uniform(0.0, 0.1)))
            if j == 0 and lk.mode < Mode.EX and draw("conv", lambda: rng.random() < 0.3):
                to = draw("to", lambda: rng.choice((Mode.PW, Mode.EX)))
                u.doing = f"convert {name} {lk.mode.name}->{to.name}"
                v, e = yield ("flow", c._convert(lk, to, None), None)
                w.res.ops += 1
                u._count("converted" if e is None else _outcome("convert", e))
                if e is not None:
                    w.truth.ended(c, lk.id, e)
        for lk in reversed(held):
            if lk.phase is Phase.HELD and lk.mode is not None and lk.mode >= Mode.PW:
                lk.new_value = b"%s@%d" % (lk.id.encode(), lk.token)
            u.doing = f"release {lk.name}"
            v, e = yield ("flow", c._release(lk), None)
            w.res.ops += 1
            u._count("released" if e is None else f"release {type(e).__name__}")
    u.doing = "done"
    w.net.step[c.cid] = "end"


def _outcome(what: str, e: BaseException) -> str:
    if type(e).__name__ == "Deadlock" and "victim" in str(e):
        return f"{what} deadlock victim"
    return f"{what} {type(e).__name__}"


# ----------------------------------------------------------------- the operator


class Operator:
    """`dlm break` at BREAKS random times before the faults stop, on every instance; and
    the checks of what a break promises (docs/verification.md)."""

    def __init__(self, w: Any, rng: random.Random) -> None:
        self.w = w
        self.rng = rng
        self.c = job_client(w, 200)
        self.times = sorted(rng.uniform(0.3, w.cfg.work_s - 0.3) for _ in range(BREAKS))
        #: (instance, lock id) -> (the instance's generation, the time) when a break
        #: removed it there
        self.gone: dict[tuple[int, str], tuple[int, float]] = {}
        #: id of every call sent -> (when, the call): a call sent before the break that
        #: arrives after it is a message in flight, not a client re-creating the lock
        self.sent: dict[int, tuple[float, Any]] = {}
        self.came_back_in_flight = 0
        self.on: dict[str, set[int]] = {}  #: lock id -> instances it was broken on
        self.learn: dict[str, float] = {}  #: broken on a quorum: lock id -> deadline
        self.came_back_restarted = 0
        w.observer.extra.append(self.check)
        for inst in w.instances:
            inst.execute = self._wrap(inst, inst.execute)
        send = w.net.send

        def sending(c: Any, i: int, calls: list, on_reply: Any, *args: Any) -> None:
            for call in calls:
                self.sent[id(call)] = (w.t, call)
            send(c, i, calls, on_reply, *args)

        w.net.send = sending

    def start(self) -> None:
        for t in self.times:
            self.w.at(t, self.c, self._pick)

    def finish(self) -> None:
        self.w.note(f"operator: broke {sorted(self.on)}; came back on a restarted instance "
                    f"{self.came_back_restarted}, by a call in flight {self.came_back_in_flight}")
        close(self.c)

    def _pick(self) -> None:
        w, rng = self.w, self.rng
        # (every client's: the users', and a detector's leadership lock)
        held = [(c, lk) for c in w.by_owner.values() for lk in c._core.locks.values()
                if lk.phase in (Phase.HELD, Phase.CONVERTING)]
        if not held:
            return
        c, lk = held[rng.randrange(len(held))]
        by_owner = rng.random() < 0.3
        lock_id, owner = ("", c._core.owner) if by_owner else (lk.id, "")
        w._fault(f"operator breaks {'owner ' + owner if by_owner else 'lock ' + lock_id} "
                 f"on {lk.name!r}")
        core = self.c._core
        call = command("break", [EPOCH_KEY, core.wkey, lk.key],
                       codec.break_args(core.rejoin_ms, core.chan_prefix, lock_id, owner))
        self.c.run(self._break([(i, call) for i in range(core.n)]))

    def _break(self, cmds: list) -> Flow:
        got = yield Broadcast(cmds)
        for i, raw in sorted(got.items()):
            if not isinstance(raw, BaseException):
                self.w.note(f"operator: instance {i} broke "
                            f"{[b.lock_id for b in codec.parse_break_reply(raw).broken]}")

    def _wrap(self, inst: Any, execute: Any) -> Any:
        def run(call: tuple, t: float) -> tuple[Any, list]:
            raw, events = execute(call, t)
            if call[0] == "break":
                if not isinstance(raw, BaseException):
                    self._broken(inst, codec.parse_break_reply(raw))
            elif self.gone:
                self._came_back(inst, call)
            return raw, events
        return run

    def _broken(self, inst: Any, rep: Any) -> None:
        w = self.w
        for b in rep.broken:
            w.observer.exempt.add(b.lock_id)  # its holder may believe it until it learns
            self.gone[(inst.idx, b.lock_id)] = (inst.gen, w.t)
            on = self.on.setdefault(b.lock_id, set())
            on.add(inst.idx)
            if len(on) == w.observer.quorum:
                lease = w.cfg.lease_ms / 1000.0
                self.learn[b.lock_id] = w.t + lease + lease / 3 + 1.0

    def _came_back(self, inst: Any, call: tuple) -> None:
        """A lock an instance broke must never be there again (R2 re-requests only where
        the epoch changed; nothing else re-creates a lock): checked after every call that
        was sent after the break (one sent before and still in flight may re-create it,
        G12: counted, not judged; so is one on an instance restarted since, R2)."""
        sent = self.sent.get(id(call), (None,))[0]
        for key in call[1][2:]:
            r = inst.model.res.get(key)
            if r is None:
                continue
            for q in (r.g, r.c, r.w):
                for lk in q:
                    got = self.gone.get((inst.idx, lk.id))
                    if got is None:
                        continue
                    gen, t = got
                    if gen != inst.gen:
                        self.came_back_restarted += 1
                    elif sent is not None and sent < t:
                        self.came_back_in_flight += 1
                    else:
                        self.w.violation(f"broken lock {lk.id} of {lk.owner} came back on "
                                         f"instance {inst.idx} ({key!r}) by a {call[0]} "
                                         f"sent after the break")
                    del self.gone[(inst.idx, lk.id)]

    def check(self) -> None:
        """The holder of a lock broken on a quorum learns it lost it within a lease and a
        renewal (and a socket timeout) of the break, unless paused: at its next renewal or
        by the `C|id|broken` event (docs/protocol.md, Leases and loss)."""
        if not self.learn:
            return
        w = self.w
        for lid, until in list(self.learn.items()):
            if w.t < until:
                continue
            del self.learn[lid]
            for c in w.by_owner.values():
                lk = c._core.locks.get(lid)
                if (lk is not None and lk.phase in (Phase.HELD, Phase.CONVERTING)
                        and c.paused_until <= w.t and lk.validity(c._now()) > 0):
                    w.violation(f"broken lock {lid} of client {c.cid} still believed "
                                f"valid {w.t - until:.2f} s past the bound")
