"""Every step of the quorum client, written once for the sync and the asyncio client.

`protocol.Session` takes the decisions (what to send, what the replies mean, when a lock
is held, lost, released or converted). A *flow* strings those decisions together: it is a
generator that calls the Session and, where it needs I/O, yields an operation (`Broadcast`,
`Pipeline`, `Wait`, `Spawn`, `Shielded`) and receives its result. The two transports only
perform operations: `client.DLM` with blocking sockets and threads, `aio.AsyncDLM` with
`redis.asyncio` and tasks (their drivers are a dozen lines each). So the two clients run
the same code for every step (an acquisition, its wait, a conversion, a release, a
withdrawal, a renewal, a late reply, close) and cannot drift apart (docs/design.md §6,
"One client core").

How the two run a flow:

* The sync client drives a flow on the calling thread while holding its state lock
  (`DLM._mu`), released during every operation; a flow that must wait in the background
  (a request that queues, a renewal) continues on a thread of its own.
* The asyncio client drives a flow in the calling task; one that continues in the
  background runs as a task.
* An interruption of the caller (KeyboardInterrupt or what a signal handler raises in the
  sync client, a cancellation in asyncio) is thrown into the flow at the operation it was
  waiting on; the flow cleans up with a `Shielded` flow, which runs to its end whatever
  happens to the caller (bounded by the socket timeouts), then re-raises.
* User callbacks (`on_granted`, `on_blocking`, `on_lost`) are queued by `_callback` and run
  one at a time, in order, after the state change that caused them: on the client's
  callback thread (sync), on the event loop by `call_soon` (asyncio). What they raise is
  logged and changes nothing else.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import metrics as _metrics
from .engine import codec
from .engine.keys import EPOCH_KEY, check_name, resource_key, show_name
from .engine.modes import COMPAT, Mode
from .errors import (
    ConfigurationError,
    DLMError,
    HasChildren,
    InvalidType,
    LockLost,
    LockTimeout,
    QuorumUnavailable,
)
from .protocol import (
    Call,
    LockCore,
    Phase,
    check_callback,
    check_timeout,
    command,
    descendants,
    describe,
)

log = logging.getLogger("redlockdlm")

#: A flow: yields operations, receives their results, returns its own result
Flow = Generator[Any, Any, Any]


@dataclass(slots=True)
class Broadcast:
    """Write every command (instance, call), then read the replies: one round trip for
    all. Result: instance -> parsed reply, or the exception that instance's call met.
    With `enough` (R4, docs/protocol.md): done once that many replies are in and the
    others had as long again (at least 5 ms); a reply that comes later is handed to the
    flow `late(instance, result)`, run in the background.
    With `until` as well (the flows' clock, `Flows._now`; R3: a caller's deadline): done
    at that time whatever is in. The replies not in yet are read in the background as
    with `enough` (to `late`, or dropped) and are missing from the result."""

    cmds: Sequence[tuple[int, Call]]
    enough: int | None = None
    late: Callable[[int, Any], Flow] | None = None
    until: float | None = None


@dataclass(slots=True)
class Pipeline:
    """Every call to instance `i` in one write: a list of results, one per call."""

    i: int
    calls: Sequence[Call]


@dataclass(slots=True)
class Wait:
    """Until something about `lk` changes (`Flows._notify`: a reply, an event, a renewal,
    a withdrawal) or the monotonic time `until` (None: no limit). Result: True if woken
    by a change, False at `until`."""

    lk: LockCore
    until: float | None


@dataclass(slots=True)
class Spawn:
    """Run `flow` in the background: at once up to its first operation, then on its own
    thread (sync) or task (asyncio). Result: None."""

    flow: Flow


@dataclass(slots=True)
class Subscribe:
    """Subscribe the shard channel of `lk`'s slot on each cluster member of `members`
    and wait for the confirmations (N4: a lock that waits reads its events). Result: the
    members where it is subscribed now (those that failed are left to the re-checks)."""

    lk: LockCore
    members: Sequence[int]


@dataclass(slots=True)
class Shielded:
    """Run `flow` (a clean-up after an interruption) to its end even if the caller is
    interrupted again, bounded by the socket timeouts. Result: None (what it raises is
    logged: the interruption is what the caller must see)."""

    flow: Flow


#: A round cut short by a caller's deadline (`Broadcast.until`) still gets this long from
#: its send (seconds): a timeout shorter than a round trip (0: do not wait) still asks every
#: instance once, and a clean-up after the deadline gets as long to be confirmed.
ROUND_FLOOR_S = 0.25


def _interrupted(exc: BaseException) -> bool:
    """True for what an operation raises when the caller is interrupted (operations report
    I/O failures as results, never by raising), not for a flow being closed."""
    return not isinstance(exc, (GeneratorExit, DLMError))


class Flows:
    """The steps of a quorum client (`DLM`, `AsyncDLM`), each a flow over `self._core`.

    A transport subclasses this and provides the primitives below it: `_callback`,
    `_notify`, `_start` (a flow in the background), `_wake_renewer`; and its driver, which
    performs the operations the flows yield."""

    _core: Any  # protocol.Session
    _lock_class: type
    _request_class: type
    #: instances whose renewal is in flight (a tick skips them)
    _renewing: set[int]

    #: the clock of every decision (monotonic seconds)
    _now = staticmethod(time.monotonic)

    # ----------------------------------------------------------------- transport primitives

    def _callback(self, fn: Callable[..., Any], *args: Any) -> None:
        raise NotImplementedError

    def _notify(self, lk: LockCore) -> None:
        """Wake a flow in `Wait` on `lk`."""
        raise NotImplementedError

    def _start(self, flow: Flow) -> None:
        """`Spawn`: run `flow` in the background."""
        raise NotImplementedError

    def _wake_renewer(self) -> None:
        """The renewal time (`Session.renew_at`) moved earlier."""
        raise NotImplementedError

    def _event_gaps(self, lk: LockCore) -> list[int]:
        """The members where `lk`, which reads events now (`Session.reads_events`), is
        not subscribed to them yet and where its state can change by an event: a `Subscribe`
        to send before waiting. A transport whose channel is subscribed before the
        first call (standalone members, the simulator) has none."""
        return []

    def _listen(self, lk: LockCore) -> Flow:
        """Before `lk` waits (N4): it reads events from now on; where its slot's channel
        is not subscribed yet, subscribe it, then re-check the lock there, so that a grant
        published between the reply and the subscription is not missed. True if it
        subscribed (the lock's state may have changed meanwhile)."""
        lk.waits = True
        gaps = self._event_gaps(lk)
        if not gaps:
            return False
        lk.listening.update(gaps)  # (tried once per wait: a failure is left to re-checks)
        got = yield Subscribe(lk, gaps)
        if got and lk.phase in (Phase.ACQUIRING, Phase.CONVERTING):
            yield from self._send_and_feed(
                lk, self._core.recheck_cmds(lk, self._now(), only=got),
                lk.cticket if lk.phase is Phase.CONVERTING else None)
        return True

    # ----------------------------------------------------------------- shared, no I/O

    def _forget(self, lk: LockCore) -> None:
        self._core.forget(lk)

    def _cut(self, deadline: float | None) -> float | None:
        """When a round sent now stops waiting for replies (`Broadcast.until`): at the
        caller's deadline, but never sooner than `ROUND_FLOOR_S` from now (R3)."""
        return None if deadline is None else max(deadline, self._now() + ROUND_FLOOR_S)

    def _new_request(self, resource: str | bytes, mode: object, *, timeout: float | None,
                     noqueue: bool, expedite: bool, no_deadlock_wait: bool,
                     value_block: bool, on_granted: Callable[..., Any] | None,
                     on_blocking: Callable[[Mode], Any] | None,
                     on_lost: Callable[..., Any] | None, lease_ms: int | None,
                     parent: Any, priority: int) -> tuple[LockCore, Any]:
        """Check the arguments (typed errors, nothing sent), create the lock, its handle
        and its request."""
        t = check_timeout(timeout)
        for what, fn in (("on_granted", on_granted), ("on_blocking", on_blocking),
                         ("on_lost", on_lost)):
            check_callback(what, fn)
        if parent is not None and not isinstance(parent, self._lock_class):
            raise InvalidType(f"parent must be a {self._lock_class.__name__}")
        core = self._core
        lk = core.new_lock(resource, mode, parent=parent._core if parent else None,
                           noqueue=noqueue, expedite=expedite,
                           no_deadlock_wait=no_deadlock_wait, lease_ms=lease_ms,
                           priority=priority, blocking=on_blocking is not None)
        now = self._now()
        if t is not None:
            lk.deadline = now + t
        if lk.lease_ms < core.lease_ms and core.renew_at > now + lk.lease_ms / 3000.0:
            core.renew_at = now + lk.lease_ms / 3000.0  # a shorter lease: an earlier tick
            self._wake_renewer()
        lock = self._lock_class(self, lk, on_blocking, on_lost, value_block)
        lk.user = lock
        req = self._request_class(self, lock, on_granted)
        lk.request = req
        return lk, req

    def _on_event(self, i: int, ev: codec.Event) -> None:
        """A pub/sub event from instance `i`: recorded, callbacks queued, yields sent."""
        core = self._core
        now = self._now()
        notes = core.on_event(i, ev, now)
        for kind, lock, arg in notes:
            if kind == "blocking":
                if lock.user._on_blocking is not None:
                    self._callback(lock.user._on_blocking, arg)
            elif kind == "yield":
                self._start(self._send_and_feed(lock, [(arg, core.yield_cmd_for(lock, arg))]))
        lk = core.locks.get(ev.lock_id)
        if lk is not None:
            if lk.phase is Phase.ACQUIRING and core.try_grant(lk, now):
                lk.request._finish(None)  # the waiter learns of it now, not via its flow
            self._notify(lk)
            if lk.phase is Phase.HELD and ev.kind == "C":
                self._check_lost()

    def _check_lost(self) -> None:
        """Report the locks no longer held on a quorum (logged, `on_lost` queued)."""
        for lk in self._core.check_held(self._now()):
            user = lk.user
            log.warning("lock %s on %s lost: %s", lk.id, user.resource, lk.lost_reason)
            _metrics.sink.lock_lost()
            if user._on_lost is not None:
                self._callback(user._on_lost, user)

    def _renewal_due(self) -> bool:
        """True if the renewal time (`Session.renew_at`) has come; then the next is named:
        a third of the shortest lease in use from now."""
        core = self._core
        now = self._now()
        if now < core.renew_at:
            return False
        core.renew_at = now + core.renew_interval()
        return True

    def _renew_tick(self) -> None:
        """Start this tick's renewal of every instance whose previous renewal is done, each
        instance in a flow of its own (one stalled instance delays nobody else's leases)."""
        core = self._core
        now = self._now()
        idle = [i for i in range(core.n) if i not in self._renewing]
        batches = core.renew_cmds(now, idle)
        busy = sorted({b[0] for b in batches}  # (and rejoins owed: R2)
                      | {i for i in idle if core.repairs_due(i, now)})
        self._renewing.update(busy)
        for i in busy:
            self._start(self._renew_instance(i, [b for b in batches if b[0] == i]))

    # ----------------------------------------------------------------- flows

    def _send(self, cmds: Sequence[tuple[int, Call]], enough: int | None = None) -> Flow:
        """Send `cmds`; their results (a clean-up whose answers change nothing)."""
        if not cmds:
            return {}
        return (yield Broadcast(cmds, enough))

    def _first_contact(self, which: Iterable[int]) -> Flow:
        """Identify the instances of `which` not identified yet that answer (`init hello`,
        `Session.identify`). Returns the ConfigurationErrors found (the caller raises or
        logs them); an instance that does not answer is left for later."""
        core = self._core
        todo = [i for i in which if core.run_ids[i] is None and i not in core.refused]
        if not todo:
            return []
        hello = command("init", [EPOCH_KEY], [b"hello"])
        # (`enough`: every one, each read on its own, so a stalled one delays no other)
        results = yield Broadcast([(i, hello) for i in todo], len(todo))
        errors: list[ConfigurationError] = []
        for i, res in sorted(results.items()):
            try:
                if isinstance(res, BaseException):
                    raise res
                st = codec.parse_status(res)
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
                log.info("instance %s: no first contact yet: %s", core.labels[i],
                         describe(exc))
                continue
            err = core.identify(i, st)
            if err is not None:
                errors.append(err)
        return errors

    def _request(self, lk: LockCore, req: Any) -> Flow:
        """Send a new request to every instance and record a quorum of replies (R4: a
        stalled instance's comes to `_late_reply`), then let `_acquire` take it from there
        (in the background once it must wait). Interrupted while the request is on its
        way, it is withdrawn from every instance before the interruption propagates."""
        core = self._core
        cmd = core.request_cmd(lk)  # (the same for every instance: packed once)
        cmds = [(i, cmd) for i in range(core.n)]
        lk.pending = set(range(core.n))
        sent = self._now()
        for v in lk.votes:
            v.sent_at = sent
        try:
            results = yield Broadcast(cmds, core.quorum,
                                      functools.partial(self._late_reply, lk, sent),
                                      self._cut(lk.deadline))
        except BaseException as exc:
            if not _interrupted(exc):
                raise
            # Some instances may have queued or granted it: a release sent after the
            # request, so each instance runs it after the request
            self._forget(lk)
            lk.phase = Phase.FAILED
            yield Shielded(self._send(core.release_cmds(lk)))
            raise
        try:
            for i, res in results.items():
                core.on_reply(lk, i, res, sent, self._now())
        except DLMError as exc:
            self._forget(lk)
            lk.phase = Phase.FAILED
            req._finish(exc)
            raise
        yield Spawn(self._acquire(lk, req))

    def _acquire(self, lk: LockCore, req: Any) -> Flow:
        """Until `lk` is granted, fails, or is withdrawn: evaluate (`evaluate_acquire`),
        send what it asks, wait for a change or the time it names, re-ask the instances
        then. A failure is cleaned up on a quorum of instances before the request
        completes: a LockTimeout or NotQueued leaves nothing behind."""
        try:
            yield from self._acquiring(lk, req)
        finally:
            lk.waits = False  # (granted, failed or withdrawn: no events read for this wait)
            lk.listening.clear()

    def _acquiring(self, lk: LockCore, req: Any) -> Flow:
        core = self._core
        while lk.phase is Phase.ACQUIRING:
            out = core.evaluate_acquire(lk, self._now())
            if out.done:
                req._finish(None)
                self._notify(lk)
                return
            if out.error is not None:
                self._forget(lk)
                while lk.sends:  # a re-check in flight lands before the clean-up
                    yield Wait(lk, self._now() + 0.5)
                try:  # (R4: a stalled instance gets it when it wakes, or by lease)
                    yield Broadcast(out.cleanup, core.quorum, until=self._cut(self._now()))
                finally:
                    req._finish(out.error)
                return
            if out.actions:
                lk.waits = True  # (a split vote's yields: the lock waits, N4)
                yield from self._send_and_feed(lk, out.actions)
                continue
            if (not lk.waits or self._event_gaps(lk)) and (yield from self._listen(lk)):
                continue  # (re-evaluated: the subscription or its re-check may settle it)
            if not (yield Wait(lk, out.wake_at)):
                now = self._now()
                if lk.phase is Phase.ACQUIRING and not (
                        lk.deadline is not None and now >= lk.deadline):
                    yield from self._send_and_feed(lk, core.recheck_cmds(lk, now))
        # withdrawn, released or closed meanwhile (they say why in lk.error, or finish it)
        req._finish(lk.error or LockTimeout("cancelled", resource=lk.user.resource,
                                            lock_id=lk.id))

    def _send_and_feed(self, lk: LockCore, cmds: Sequence[tuple[int, Call]],
                       cticket: int | None = None) -> Flow:
        """Send commands about `lk` and record the replies: of a quorum of them, when more
        are sent (R4); the others as they come (`_late_reply`, or `_late_convert` for the
        conversion of ticket `cticket`). Counted in `lk.sends` while in flight: a
        withdrawal or release waits for them, so none lands after it."""
        if not cmds or (cticket is None and lk.phase in (Phase.FAILED, Phase.RELEASED)):
            return  # withdrawn or failed meanwhile: a re-sent request would re-create it
        core = self._core
        sent = self._now()
        late = (functools.partial(self._late_reply, lk, sent) if cticket is None
                else functools.partial(self._late_convert, lk, sent, cticket))
        lk.sends += 1
        try:
            results = yield Broadcast(cmds, min(len(cmds), core.quorum), late,
                                      self._cut(lk.deadline))
        finally:
            lk.sends -= 1
            self._notify(lk)
        for i, res in results.items():
            try:
                core.on_reply(lk, i, res, sent, self._now())
            except DLMError as exc:
                log.warning("unexpected error from %s: %s", core.labels[i], exc)
        self._notify(lk)

    def _late_reply(self, lk: LockCore, sent: float, i: int, res: Any) -> Flow:
        """A reply about `lk` that came after its call returned (R4): record it, wake the
        waiter, and release the request there if it failed meanwhile."""
        cmds = self._core.on_late_reply(lk, i, res, sent, self._now())
        self._notify(lk)
        if cmds:
            yield Broadcast(cmds)

    def _late_convert(self, lk: LockCore, sent: float, cticket: int, i: int,
                      res: Any) -> Flow:
        cmds = self._core.on_late_convert(lk, i, res, sent, cticket, self._now())
        self._notify(lk)
        if cmds:
            yield Broadcast(cmds)

    def _withdraw(self, req: Any) -> Flow:
        """The caller gave up on a request (cancel, an interrupted wait): it completes with
        LockTimeout("cancelled") and is withdrawn on every instance, or released there if
        it was granted meanwhile, after any command about it still in flight."""
        lk = req.lock._core
        if lk.phase is Phase.RELEASED or lk.phase is Phase.FAILED:
            req._finish(LockTimeout("cancelled", resource=req.lock.resource, lock_id=lk.id))
            return
        was_held = lk.phase is Phase.HELD
        lk.phase = Phase.FAILED  # the acquisition stops at its next step
        req._finish(LockTimeout("cancelled", resource=req.lock.resource, lock_id=lk.id))
        self._notify(lk)
        while lk.sends:  # a re-check in flight lands before the release, never after
            yield Wait(lk, self._now() + 0.5)
        if was_held:
            lk.phase = Phase.HELD
        yield from self._release(lk)

    def _release(self, lk: LockCore, subtree: bool = False) -> Flow:
        """Release `lk` (and with `subtree` its descendants) on every instance: done once
        a quorum released it (R4; a stalled instance gets it when it wakes, or the lease
        ends it there). Refused everywhere (HasChildren...), nothing changed: raised.
        Interrupted (KeyboardInterrupt, a cancellation) at any point, the release is
        completed (`Shielded`) before the interruption propagates."""
        try:
            yield from self._releasing(lk, subtree, again=False)
        except BaseException as exc:
            if _interrupted(exc):
                yield Shielded(self._releasing(lk, subtree, again=True))
            raise

    def _releasing(self, lk: LockCore, subtree: bool, again: bool) -> Flow:
        """`_release`; `again`: its completion after an interruption, which may have come
        after the lock was marked released (so that mark does not end it)."""
        core = self._core
        while lk.repairing:  # R1, R2: the repair lands first, never after the release
            yield Wait(lk, self._now() + 0.5)
        if lk.phase is Phase.RELEASED and not (again and core.locks.get(lk.id) is lk):
            return
        if not subtree and any(c.phase is not Phase.RELEASED for c in lk.children):
            raise HasChildren("release the child locks first, or ask subtree=True",
                              lock_id=lk.id)
        before = lk.phase
        lk.phase = Phase.RELEASED  # renewals in flight must not report it lost
        self._notify(lk)  # an acquisition of it stops
        while lk.sends:  # a re-check in flight lands before the release, never after
            yield Wait(lk, self._now() + 0.5)
        cmds = core.release_cmds(lk, subtree)
        results = yield Broadcast(cmds, core.quorum)
        errors = [r for r in results.values()
                  if isinstance(r, DLMError) and not isinstance(r, QuorumUnavailable)]
        if errors and len(errors) == len(results):
            lk.phase = before
            if before is Phase.ACQUIRING:
                self._start(self._acquire(lk, lk.request))
            raise errors[0]  # refused everywhere (e.g. HasChildren): nothing changed
        for r in errors:
            log.warning("release of %s: %s", lk.id, r)
        self._released(lk, results)

    def _released(self, lk: LockCore, results: dict[int, Any]) -> None:
        for d in [lk, *descendants(lk)]:
            d.phase = Phase.RELEASED
            self._forget(d)
            self._notify(d)
        failed = sum(1 for r in results.values() if isinstance(r, BaseException))
        if failed:
            log.info("release of %s reached %d of %d instances; the rest expire by lease",
                     lk.id, self._core.n - failed, self._core.n)

    def _convert(self, lk: LockCore, mode: object, timeout: float | None,
                 **flags: Any) -> Flow:
        """Convert `lk` to `mode`; on failure it keeps its old mode (and the error is
        raised), except a down-conversion, which stands (G4, and the error is raised:
        `Session._keep_down_conversion`). Interrupted before it returns, a conversion that
        may wait (up or sideways) is withdrawn on every instance and the lock keeps its old
        mode; a down-conversion, which never waits (G4), is completed.
        Its outcome and time from the call are reported to the metrics sink (op "convert")
        and its trace span (`redlockdlm.metrics`)."""
        core = self._core
        t = check_timeout(timeout)
        asked = self._now()
        while lk.repairing:  # R1, R2: a repair lands before the conversion is sent
            yield Wait(lk, self._now() + 0.5)
        old = lk.mode
        m, fl, down = core.start_convert(lk, mode, **flags)
        lk.deadline = None if t is None else self._now() + t
        value, version = core.convert_value(lk, down)
        lk.cargs = (m, fl, value, version)
        if down:  # per instance: the new value where granted PW/EX (V3), or V7's repair
            cmds = [(i, core.convert_cmd(lk, m, fl, *core.stored_value(lk, i), i))
                    for i in range(core.n)]
        else:
            cmds = [(i, core.convert_cmd(lk, m, fl, value, version, i)) for i in range(core.n)]
        lk.pending = set(range(core.n))
        span = _metrics.start_span("convert", lk.path, m)
        outcome = "cancelled"  # (interrupted, unless one of the outcomes below)
        try:
            yield from self._converting(lk, old, cmds, lk.cticket)
            outcome = "granted"
        except DLMError as exc:
            outcome = _metrics.outcome_of(exc)
            raise
        except BaseException as exc:
            if _interrupted(exc):  # nothing half-done
                yield Shielded(self._abandon_convert(lk, old, down, cmds))
            raise
        finally:
            lk.waits = False  # (the conversion's wait is over: N4)
            lk.listening.clear()
            sink = _metrics.sink
            if sink.enabled:
                sink.request_done("convert", outcome, self._now() - asked)
            _metrics.end_span(span, outcome)

    def _converting(self, lk: LockCore, old: Mode, cmds: Sequence[tuple[int, Call]],
                    cticket: int) -> Flow:
        """Send the conversion (of ticket `cticket`) and wait for its outcome; on failure
        put the old mode back and raise."""
        core = self._core
        yield from self._send_and_feed(lk, cmds, cticket)
        while True:
            now = self._now()
            out = core.evaluate_convert(lk, old, now)
            if out.done:
                return
            if out.error is not None:
                break
            if out.actions:
                lk.waits = True  # (a split vote's yields or re-sends: the lock waits, N4)
                yield from self._send_and_feed(lk, out.actions, cticket)
                continue
            if (not lk.waits or self._event_gaps(lk)) and (yield from self._listen(lk)):
                continue  # (re-evaluated: the subscription or its re-check may settle it)
            until = out.wake_at if out.wake_at is not None else now + 0.5
            if lk.deadline is not None:
                until = min(until, lk.deadline)
            if not (yield Wait(lk, until)):
                # The re-check time (wake_at is relative to `now`, so it never comes by
                # re-evaluating) or the deadline: re-ask the instances.
                now = self._now()
                out = core.evaluate_convert(
                    lk, old, now, timed_out=lk.deadline is not None and now >= lk.deadline)
                if out.error is not None:
                    break
                yield from self._send_and_feed(lk, core.recheck_cmds(lk, now), cticket)
        if not out.keep:  # (bounded as the clean-up of a request: R3)
            results = yield Broadcast(out.cleanup, len(out.cleanup),
                                      until=self._cut(self._now()))
            for i, _ in out.cleanup:  # sent, not answered in time: not known, as a timeout
                results.setdefault(i, TimeoutError("no reply within the clean-up's time"))
            core.rollback_convert(lk, old, results)
            self._check_lost()  # a way back that did not go through at once
        raise out.error

    def _abandon_convert(self, lk: LockCore, old: Mode, down: bool,
                         sent: Sequence[tuple[int, Call]]) -> Flow:
        """The caller gave up on the conversion (interrupted): complete a down-conversion,
        withdraw any other so that the lock holds its old mode on every instance
        (`Session.abandon_convert_cmds`)."""
        core = self._core
        cmds = core.abandon_convert_cmds(lk, old, down, sent)
        if down:
            yield from self._send_and_feed(lk, cmds, lk.cticket)
            now = self._now()
            if core.evaluate_convert(lk, old, now).done:
                return
            out = core.evaluate_convert(lk, old, now, timed_out=True)
            if not out.keep:
                results = yield Broadcast(out.cleanup)
                core.rollback_convert(lk, old, results)
                self._check_lost()
            return
        while cmds:
            sent_at = self._now()
            results = yield Broadcast(cmds)
            for i, res in results.items():
                core.on_abandon_reply(lk, i, res, sent_at, self._now())
            cmds = core.abandon_convert_cmds(lk, old, down, sent, first=False)
        core.end_abandon(lk, old)
        self._notify(lk)

    def _extend(self, lk: LockCore, lease_ms: int | None) -> Flow:
        """Renew `lk` now on every instance, with the lease `lease_ms` from here on (None:
        its lease as it is; L1). Done once a quorum answered (R4; a later reply is recorded
        as it comes). Raises LockReleased / LockStateError when the lock is not held,
        LockLost when it is no longer held on a quorum afterwards; a lease refused by
        `Session.check_lock_lease` changes nothing."""
        core = self._core
        if lk.phase not in (Phase.HELD, Phase.CONVERTING):
            raise core._not_held(lk)
        lease = lk.lease_ms if lease_ms is None else core.check_lock_lease(lease_ms)
        while lk.repairing:  # R1, R2: a repair lands first
            yield Wait(lk, self._now() + 0.5)
        if lk.phase not in (Phase.HELD, Phase.CONVERTING):
            raise core._not_held(lk)
        now = self._now()
        core.change_lease(lk, lease, now)
        if core.renew_at > now + lease / 3000.0:  # a shorter lease: an earlier tick
            core.renew_at = now + lease / 3000.0
            self._wake_renewer()
        cmds = core.renew_lock_cmds(lk)
        # (a call timed at the change's own instant counts the shorter lease, L1; this
        # one carries the new lease, so it is timed after the change, by one tick of the
        # clock's float if the clock did not move)
        sent = max(self._now(), math.nextafter(now, math.inf))

        def late(i: int, res: Any) -> Flow:
            for note in core.on_renew_reply(i, [lk], res, sent, self._now()):
                log.warning("%s", note)
            self._notify(lk)
            return
            yield  # (a flow)

        if cmds:
            results = yield Broadcast(cmds, min(len(cmds), core.quorum), late)
            for i, res in results.items():
                for note in core.on_renew_reply(i, [lk], res, sent, self._now()):
                    log.warning("%s", note)
        self._notify(lk)
        self._check_lost()
        if lk.phase not in (Phase.HELD, Phase.CONVERTING) or (
                core.holding(lk, self._now()) < core.quorum):
            why = lk.lost_reason or "not renewed on a quorum of instances"
            raise LockLost(f"the lock could not be extended: {why}", resource=lk.user.resource,
                           lock_id=lk.id)

    def _probe(self, resource: str | bytes, mode: Mode) -> Flow:
        """Whether some owner (this one included) holds `resource` (a root resource) in
        a mode that `mode` cannot be granted beside: True when an instance of those that
        answered (a quorum at least; else QuorumUnavailable) shows such a grant with its
        lease still running. A read, changing nothing: a snapshot, stale at once."""
        core = self._core
        key = resource_key(core.ns, (check_name(resource),))
        call = command("inspect", [EPOCH_KEY, key], [])
        results = yield Broadcast([(i, call) for i in range(core.n) if i not in core.refused],
                                  core.quorum)
        answered, conflict = 0, False
        for res in results.values():
            if isinstance(res, BaseException):
                continue
            try:
                _, (view,) = codec.parse_inspect([key], res)
            except DLMError:
                continue
            answered += 1
            if view is not None and any(
                    lv.queue in ("G", "C") and lv.mode is not None and lv.lease_left_ms > 0
                    and not COMPAT[lv.mode][mode] for lv in view.locks):
                conflict = True
        if answered < core.quorum:
            raise QuorumUnavailable(f"only {answered} of {core.n} instances answered "
                                    f"(a quorum is {core.quorum})", resource=show_name(
                                        (check_name(resource),)))
        return conflict

    def _renew_instance(self, i: int,
                        batches: Sequence[tuple[int, Call, list[LockCore]]]) -> Flow:
        """Renew instance `i` (one pipelined round trip), then send the repairs its reply
        calls for (R1, R2); wake every waiter, report locks lost."""
        core = self._core
        repairs: list[tuple[LockCore, Call]] = []
        try:
            if batches:  # (none when the instance only owes a rejoin, R2)
                sent = self._now()
                results = yield Pipeline(i, [cmd for _, cmd, _ in batches])
                now = self._now()
                sink = _metrics.sink
                if sink.enabled:
                    sink.renewal(core.labels[i], now - sent,
                                 not any(isinstance(r, BaseException) for r in results))
                for (_, _, lks), res in zip(batches, results):
                    for note in core.on_renew_reply(i, lks, res, sent, now):
                        log.warning("%s", note)  # as it happens: one line each
            repairs = core.repair_cmds(i, self._now())
            if repairs:  # R1, R2: only where a renewal found something to repair
                sent = self._now()
                results = yield Pipeline(i, [cmd for _, cmd in repairs])
                now = self._now()
                for (lk, _), res in zip(repairs, results):
                    core.on_repair_reply(lk, i, res, sent, now)
                repairs = []
            for lk in list(core.locks.values()):
                self._notify(lk)
            self._check_lost()
        finally:
            self._renewing.discard(i)
            for lk, _ in repairs:  # not sent (interrupted): not in flight
                lk.repairing.discard(i)
                self._notify(lk)

    def _close_flow(self, closed: DLMError) -> Flow:
        """Release every lock of this client (each root with its subtree); a request still
        waiting fails with `closed` once nothing of it is left on the instances."""
        core = self._core
        for lk in core.locks.values():
            if lk.phase is Phase.ACQUIRING and lk.error is None:
                lk.error = closed
        pending = [lk.request for lk in core.locks.values() if lk.request is not None]
        for lk in [lk for lk in core.locks.values() if lk.parent is None]:
            try:
                yield from self._release(lk, subtree=True)
            except DLMError as exc:
                log.warning("close: release of %s failed: %s", lk.id, exc)
        for req in pending:  # (no-op for those done)
            req._finish(closed)
