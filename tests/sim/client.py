"""`SimClient`: the real client core (`redlockdlm.flows.Flows` over `protocol.Session`)
with a driver that performs its operations as events of the simulator (no threads, no
asyncio), the way `client.DLM` performs them with sockets and threads:

* `Broadcast`: one message per instance over the simulated network; each reply is settled
  by the real `wire.settle`; with `enough` (R4) the flow resumes once that many replies
  are in and the others had as long again (at least 5 ms), later replies run the `late`
  flow in the background; a silent instance answers `redis.TimeoutError` after the socket
  timeout (and its reply, if it comes later, is thrown away: the real client disconnects).
* `Pipeline`: one message with every call, run back to back by the instance.
* `Wait`: a timer at `until` (the client's clock) and a wake by `_notify`.
* `Spawn`: a new simulated process, run at once up to its first operation.
* `Shielded`: the clean-up runs as its own process; the caller resumes when it ends.
* An interruption (KeyboardInterrupt) is thrown into a flow at the operation it waits on;
  replies of an interrupted Broadcast are dropped as the real client drops them.

Every wake-up is a scheduled event (never a nested call), as a woken thread runs only
after the current one releases the state lock.
"""

from __future__ import annotations

from typing import Any

from redlockdlm.engine import codec
from redlockdlm.flows import Broadcast, Flow, Flows, Pipeline, Shielded, Spawn, Wait
from redlockdlm.handle import LockBase, RequestBase
from redlockdlm.protocol import LockCore, Session
from redlockdlm.wire import settle


class SimRequest(RequestBase):
    def __init__(self, dlm: Any, lock: Any, on_granted: Any) -> None:
        super().__init__(dlm, lock, on_granted)
        self._is_done = False
        self.waiter: Any = None  #: the user process waiting for it

    @property
    def done(self) -> bool:
        return self._is_done

    def _set_done(self, error: Any) -> None:
        self._is_done = True
        if self.waiter is not None:
            w, self.waiter = self.waiter, None
            self._dlm.world.soon(self._dlm, w)


class SimLock(LockBase):
    pass


TICKET0 = 1_700_000_000_000_000  #: a ticket at the clients' clock 0 (µs)


class SimTicket:
    """G11 tickets from the client's simulated wall clock (µs), strictly increasing."""

    def __init__(self, client: SimClient) -> None:
        self.client = client
        self._last = 0

    def next(self) -> int:
        t = max(int(self.client._now() * 1e6) + TICKET0, self._last + 1)
        self._last = t
        return t


class Proc:
    """A flow being driven: suspended on one operation at a time."""

    __slots__ = ("flow", "on_done", "gen", "op", "state", "client")

    def __init__(self, client: SimClient, flow: Flow, on_done: Any = None) -> None:
        self.client = client
        self.flow = flow
        self.on_done = on_done  #: fn(value, exc) when the flow ends
        self.gen = 0  #: bumped at each resume: a stale timer or wake is ignored
        self.op: Any = None  #: what it waits on: "wait", "bcast", "pipe", "shield", None
        self.state: Any = None  #: the broadcast or waiting state


class _Bcast:
    __slots__ = ("proc", "n", "got", "t0", "enough", "late", "done", "accept_late", "gen")

    def __init__(self, proc: Proc, op: Broadcast, t0: float) -> None:
        self.proc = proc
        self.n = len(op.cmds)
        self.got: dict[int, Any] = {}
        self.t0 = t0
        self.enough = op.enough
        self.late = op.late
        self.done = False
        self.accept_late = True
        self.gen = proc.gen


class SimClient(Flows):
    """One client process (one owner) in the simulated world."""

    _lock_class = SimLock
    _request_class = SimRequest

    def __init__(self, world: Any, cid: int, n: int, lease_ms: int, rate: float,
                 socket_timeout: float = 1.0) -> None:
        self.world = world
        self.cid = cid
        self.rate = rate  #: its monotonic clock runs at this rate of simulated time
        self.timeout = socket_timeout
        self._core = Session(n, "sim", lease_ms=lease_ms, owner=f"c{cid}")
        self._core.distinct_epochs = True
        self._core.labels = [f"i{i}" for i in range(n)]
        self._core.tickets = SimTicket(self)
        self._now = self.clock  # (Flows._now: the clock of every decision)
        self._renewing: set[int] = set()
        self.paused_until = 0.0
        self.closed = False
        self.loop_gen = 0
        self.next_contact = 0.0
        self.callbacks = 0
        self.blocked = 0  #: on_blocking calls (N1)

    # ----------------------------------------------------------------- clock

    def clock(self) -> float:
        return self.world.t * self.rate + 1000.0

    def to_sim(self, local: float) -> float:
        return (local - 1000.0) / self.rate

    # ----------------------------------------------------------------- Flows primitives

    def _callback(self, fn: Any, *args: Any) -> None:
        self.callbacks += 1
        self.world.soon(self, lambda: fn(*args))

    def _notify(self, lk: LockCore) -> None:
        waiting = lk.waker
        if waiting:
            lk.waker = None
            for proc, gen in waiting:
                if proc.gen == gen and proc.op == "wait":
                    proc.gen += 1
                    self.world.soon(self, self._woken, proc, proc.gen)

    def _woken(self, proc: Proc, gen: int) -> None:
        """A wake by `_notify`, unless the wait ended meanwhile (an interruption thrown
        into it between the wake and this event: resuming it again would run its caller's
        continuation twice)."""
        if proc.gen == gen and proc.op == "wait":
            self._resume(proc, True)

    def _start(self, flow: Flow) -> None:
        self.run(flow)

    def _wake_renewer(self) -> None:
        self.loop_gen += 1
        self.world.soon(self, self._tick, self.loop_gen)

    # ----------------------------------------------------------------- the driver

    def run(self, flow: Flow, on_done: Any = None) -> Proc:
        proc = Proc(self, flow, on_done)
        self._step(proc, None, None)
        return proc

    def _resume(self, proc: Proc, value: Any = None, exc: BaseException | None = None) -> None:
        proc.op = proc.state = None
        self._step(proc, value, exc)

    def interrupt(self, proc: Proc) -> bool:
        """Throw KeyboardInterrupt into `proc` at the operation it waits on (a Wait or a
        Broadcast); False if it waits on something else or has ended."""
        if proc.op == "bcast":
            st = proc.state
            st.done, st.accept_late = True, False  # its replies are read by nobody
        elif proc.op != "wait":
            return False
        proc.gen += 1
        self._resume(proc, None, KeyboardInterrupt())
        return True

    def _step(self, proc: Proc, value: Any, exc: BaseException | None) -> None:
        flow = proc.flow
        while True:
            try:
                op = flow.send(value) if exc is None else flow.throw(exc)
            except StopIteration as stop:
                if proc.on_done is not None:
                    self.world.soon(self, proc.on_done, stop.value, None)
                return
            except BaseException as e:  # noqa: BLE001 - the flow's outcome, to its caller
                if proc.on_done is not None:
                    self.world.soon(self, proc.on_done, None, e)
                else:
                    self.world.background_error(self, e)
                return
            value, exc = None, None
            if isinstance(op, Spawn):
                self._start(op.flow)
                continue
            if isinstance(op, Wait):
                if op.until is not None and op.until - self._now() <= 0:
                    value = False
                    continue
                proc.gen += 1
                proc.op = "wait"
                if op.lk.waker is None:
                    op.lk.waker = []
                op.lk.waker.append((proc, proc.gen))
                if op.until is not None:
                    self.world.at(self.to_sim(op.until), self, self._timer, proc, proc.gen)
                return
            if isinstance(op, Broadcast):
                if not op.cmds:
                    value = {}
                    continue
                proc.gen += 1
                st = _Bcast(proc, op, self.world.t)
                proc.op, proc.state = "bcast", st
                for i, call in op.cmds:
                    self.world.net.send(self, i, [call], self._bcast_reply, st, i)
                if op.until is not None and op.enough is not None and self.world.cfg.cut:
                    # R3: the caller's deadline ends the round; what is not in by then
                    # comes to `late`, as in the real drivers
                    self.world.at(max(self.world.t, self.to_sim(op.until)), self,
                                  self._grace, st)
                return
            if isinstance(op, Pipeline):
                proc.gen += 1
                proc.op = "pipe"
                self.world.net.send(self, op.i, list(op.calls), self._pipe_reply, proc,
                                    proc.gen)
                return
            if isinstance(op, Shielded):
                proc.gen += 1
                proc.op = "shield"
                gen = proc.gen
                self.run(op.flow, lambda v, e, g=gen: self._resume(proc) if proc.gen == g else None)
                return
            raise TypeError(f"not an operation: {op!r}")

    def _timer(self, proc: Proc, gen: int) -> None:
        if proc.gen == gen and proc.op == "wait":
            proc.gen += 1
            self._resume(proc, False)

    def _bcast_reply(self, st: _Bcast, i: int, results: list) -> None:
        res = results[0]
        if st.done:
            if st.accept_late and st.late is not None:
                self._start(st.late(i, res))
            return
        st.got[i] = res
        self._bcast_check(st)

    def _bcast_check(self, st: _Bcast) -> None:
        got = len(st.got)
        if got < st.n:
            if st.enough is not None and got == st.enough:  # R4: the others' grace
                now = self.world.t
                self.world.at(now + max(0.005, now - st.t0), self, self._grace, st)
            return
        st.done = True
        self._resume(st.proc, dict(st.got))

    def _grace(self, st: _Bcast) -> None:
        if not st.done:
            st.done = True
            self._resume(st.proc, dict(st.got))

    def _pipe_reply(self, proc: Proc, gen: int, results: list) -> None:
        if proc.gen == gen and proc.op == "pipe":
            self._resume(proc, results)

    # ----------------------------------------------------------------- replies, events

    def settle(self, calls: list, raws: list | BaseException) -> list:
        """The results the real transport hands to the core: `settle` per call, or the
        network error as every call's result."""
        if isinstance(raws, BaseException):
            return [raws] * len(calls)
        return [settle(c, r, "sim") for c, r in zip(calls, raws)]

    def deliver_event(self, i: int, payload: bytes) -> None:
        if self.closed:
            return
        self._on_event(i, codec.parse_event(payload))

    # ----------------------------------------------------------------- background loop

    def start(self) -> None:
        self._core.renew_at = self._now() + self._core.renew_interval()
        self.run(self._contact())
        self._wake_renewer()

    def _contact(self) -> Flow:
        for err in (yield from self._first_contact(range(self._core.n))):
            self.world.note(f"client {self.cid}: instance refused: {err}")

    def _tick(self, gen: int) -> None:
        """`DLM._loop`: first contact with instances not met yet (every second), the renewal
        tick when due, locks lost; then sleep until the next renewal (0.5 s at most)."""
        if gen != self.loop_gen or self.closed:
            return
        now = self._now()
        core = self._core
        if now >= self.next_contact and any(r is None for r in core.run_ids):
            self.next_contact = now + 1.0
            self.run(self._contact())
        if self._renewal_due():
            self._renew_tick()
        self._check_lost()
        wait = max(0.0, min(core.renew_at - self._now(), 0.5))
        self.world.at(self.to_sim(self._now() + wait) + 1e-9, self, self._tick, gen)

    def new_request(self, resource: str, mode: object, timeout: float) -> tuple[LockCore, Any]:
        asks = self.world.cfg.on_blocking
        notified = asks == "all" or (asks == "even" and self.cid % 2 == 0)
        return self._new_request(resource, mode, timeout=timeout, noqueue=False,
                                 expedite=False, no_deadlock_wait=False, value_block=True,
                                 on_granted=None, on_blocking=self._blocked if notified else None,
                                 on_lost=None, lease_ms=None, parent=None, priority=0)

    def _blocked(self, mode: Any) -> None:
        """The users' `on_blocking` (N1): counted, nothing else (users hold as they planned)."""
        self.blocked += 1


