"""What a lock handle shows and how a request completes, shared by the sync `Lock` /
`Request` and the asyncio `AsyncLock` / `AsyncRequest`.

Both wrap one `protocol.LockCore`; acquiring, converting and releasing are flows of
`redlockdlm.flows`, run by each client's driver, so everything a handle reads lives here
once and the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

from . import metrics as _metrics
from .engine import codec
from .engine.keys import check_name, show_name
from .engine.modes import Mode
from .errors import (
    AlreadyHeld,
    DLMError,
    InvalidArgument,
    InvalidType,
    LockLost,
    NotHeld,
    StillWaiting,
)
from .protocol import LockCore, Phase, check_timeout


def lock_name(lk: LockCore) -> str:
    """The resource path for people: names joined by ' / ', root first."""
    return show_name(lk.path)


class RequestBase:
    """A lock request: completes once, granted (`lock`) or failed (its error).

    Its completion is reported to the metrics sink (`redlockdlm.metrics`: outcome, wait
    from the request to it) and ends its trace span, the same for both clients."""

    def __init__(self, dlm: Any, lock: Any, on_granted: Callable[[Any], Any] | None) -> None:
        self._dlm = dlm
        self.lock = lock
        self._on_granted = on_granted
        self._error: DLMError | None = None
        self._asked = dlm._now()  #: when it was asked for (its wait's start)
        core = lock._core
        self._span = _metrics.start_span("acquire", core.path, core.rq)

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def _set_done(self, error: DLMError | None) -> None:
        """Wake whoever waits for the request (the transport's own way)."""
        raise NotImplementedError

    def _still_waiting(self, timeout: float | None) -> StillWaiting:
        """The error of a `wait(timeout)` that ended before the request did."""
        own = self.lock._core.deadline
        left = ("no timeout of its own" if own is None
                else f"its own timeout ends in {max(0.0, own - self._dlm._now()):.3g} s")
        return StillWaiting(f"wait(timeout={timeout:g}) ended; the request is still waiting "
                            f"({left}; cancel() withdraws it)", resource=self.lock.resource,
                            lock_id=self.lock.id)

    def _finish(self, error: DLMError | None) -> None:
        """Complete the request (once; later calls change nothing) and queue `on_granted`
        if it was granted."""
        if self.done:
            return
        self._error = error
        self._set_done(error)
        sink = _metrics.sink
        if sink.enabled or self._span is not None:
            outcome = _metrics.outcome_of(error)
            sink.request_done("acquire", outcome, self._dlm._now() - self._asked)
            _metrics.end_span(self._span, outcome)
        if error is None and self._on_granted is not None:
            self._dlm._callback(self._on_granted, self.lock)


class LockBase:
    """The read side of a lock held (or being acquired) on a quorum of instances."""

    def __init__(self, dlm: Any, core: LockCore, on_blocking: Callable[[Mode], Any] | None,
                 on_lost: Callable[[Any], Any] | None, value_block: bool) -> None:
        self._dlm = dlm
        self._core = core
        self._on_blocking = on_blocking
        self._on_lost = on_lost
        self._value_block = value_block

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        """Held while reading state other threads change (the sync client's lock)."""
        return contextlib.nullcontext()

    @property
    def id(self) -> str:
        """The lock id: random, the same on every instance."""
        return self._core.id

    @property
    def resource(self) -> str:
        return lock_name(self._core)

    @property
    def mode(self) -> Mode | None:
        """The mode held on a quorum (None until granted)."""
        return self._core.mode

    @property
    def token(self) -> int:
        """Fencing token: strictly greater than any earlier conflicting holder's."""
        return self._core.token

    @property
    def value(self) -> bytes | None:
        """The value block read at grant (or the one you set, written on release or
        down-conversion)."""
        if self._core.new_value is not None:
            return self._core.new_value
        return self._core.value

    @value.setter
    def value(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidType("a value block is bytes")
        vbmax = self._dlm._core.vbmax
        if len(data) > vbmax:
            raise InvalidArgument(f"value block of {len(data)} bytes exceeds {vbmax} (V1)")
        if self._core.mode is None or self._core.mode < Mode.PW:
            raise InvalidArgument("the value block is written only by PW or EX holders (V3)")
        self._core.new_value = bytes(data)

    @property
    def value_valid(self) -> bool:
        """False when a PW/EX holder lost its lease or was broken since the last write (V4),
        or an instance of the quorum restarted empty and may have forgotten a newer value
        (V5): the value may be stale; rebuild it and write it again (VMS SS$_VALNOTVALID)."""
        return self._core.value_valid

    @property
    def version(self) -> int:
        """The value block's version (the highest a quorum reported)."""
        return self._core.version

    @property
    def valid(self) -> bool:
        """True while the lock is held on a quorum with positive validity."""
        with self._guard():
            return (self._core.phase in (Phase.HELD, Phase.CONVERTING)
                    and self._dlm._core.holding(self._core, time.monotonic())
                    >= self._dlm._core.quorum)

    @property
    def validity_ms(self) -> int:
        """Milliseconds the lock stays valid without another renewal."""
        with self._guard():
            return int(self._core.validity(time.monotonic()) * 1000)

    def _lost_before_exit(self) -> bool:
        return self._core.phase is Phase.LOST or (
            self._core.phase is Phase.HELD and not self.valid)

    def _raise_lost(self, lost: bool, exc_type: object) -> None:
        if lost and exc_type is None:
            why = self._core.lost_reason
            raise LockLost("the lock was lost while held" + (f": {why}" if why else ""),
                           resource=self.resource,
                           lock_id=self.id)

    def __repr__(self) -> str:
        mode = self.mode.name if self.mode is not None else "-"
        return (f"<{type(self).__name__} {self.resource!r} {mode} id={self.id} "
                f"token={self.token} {self._core.phase.value}>")


class MutexBase:
    """The state of a `Mutex` / `AsyncMutex` (`DLM.mutex`): one lock of `resource` in
    `mode`, taken and given back with the `threading.Lock` vocabulary. Each client adds
    only the calls that wait (`acquire`, `release`, `locked`, the context manager)."""

    def __init__(self, dlm: Any, resource: str | bytes, mode: object, *,
                 lease_ms: int | None, reentrant: bool, options: dict[str, Any]) -> None:
        check_name(resource)
        self._mode = codec.as_mode(mode)
        if lease_ms is not None:
            lease_ms = dlm._core.check_lock_lease(lease_ms)
        if not isinstance(reentrant, bool):
            raise InvalidType("reentrant must be a bool")
        for name in ("timeout", "noqueue", "parent"):
            if name in options:
                raise InvalidArgument(f"{name}= is not a Mutex option: acquire(blocking, "
                                      "timeout) says how long to wait")
        self._dlm = dlm
        self._resource = resource
        self._lease_ms = lease_ms
        self._reentrant = reentrant
        self._options = options
        self._lock: Any = None
        self._depth = 0  #: acquisitions not released yet (more than 1: reentrant only)
        self._acquiring = False

    @property
    def resource(self) -> str:
        return show_name((check_name(self._resource),))

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def lock(self) -> Any:
        """The Lock held (its token, value block, `extend`...), or None when not held."""
        return self._lock

    def owned(self) -> bool:
        """True while this mutex holds its lock, valid on a quorum (a lost lock: False)."""
        return self._lock is not None and self._lock.valid

    def _begin(self, blocking: object, timeout: object) -> dict[str, Any] | None:
        """Check an `acquire` (typed errors, nothing sent). None: a reentrant acquisition
        counted, nothing to send; else the `lock()` arguments, and the mutex is marked
        acquiring until `_end`."""
        if not isinstance(blocking, bool):
            raise InvalidType("blocking must be a bool")
        if timeout == -1 and not isinstance(timeout, bool):
            t = None
        elif not blocking:
            raise InvalidArgument("a non-blocking acquire takes no timeout")
        else:
            t = check_timeout(timeout)
        if self._acquiring:
            raise AlreadyHeld("this mutex is being acquired (by another thread or task)",
                              resource=self.resource)
        if self._lock is not None:
            if not self._reentrant:
                raise AlreadyHeld("this mutex holds its lock already and is not reentrant "
                                  "(release() first, or create it with reentrant=True)",
                                  resource=self.resource, lock_id=self._lock.id)
            self._lock._raise_lost(self._lock._lost_before_exit(), None)
            self._depth += 1
            return None
        self._acquiring = True
        return dict(self._options, timeout=t, noqueue=not blocking, lease_ms=self._lease_ms)

    def _end(self, lock: Any) -> bool:
        """The acquisition is over: granted (`lock`) or not (None)."""
        self._acquiring = False
        if lock is None:
            return False
        self._lock, self._depth = lock, 1
        return True

    def _to_release(self) -> Any:
        """Count a `release`; the Lock to release when it was the last acquisition, else
        None. NotHeld (nothing sent) when the mutex holds nothing."""
        if self._lock is None:
            raise NotHeld("release() of a mutex that does not hold its lock",
                          resource=self.resource)
        self._depth -= 1
        if self._depth > 0:
            return None
        lock, self._lock = self._lock, None
        return lock

    def __repr__(self) -> str:
        state = f"held x{self._depth}" if self._lock is not None else "not held"
        return f"<{type(self).__name__} {self.resource!r} {self._mode.name} {state}>"


def check_locked_args(core: Any, resource: str | bytes, mode: object,
                      timeout: float | None, lease_ms: int | None) -> Mode:
    """The arguments of `locked(...)`, checked when decorating (typed errors, nothing
    sent): the mode to lock in."""
    check_name(resource)
    m = codec.as_mode(mode)
    check_timeout(timeout)
    if lease_ms is not None:
        core.check_lock_lease(lease_ms)
    return m


def check_decorated(fn: object, coroutine: bool, client: str) -> None:
    """`locked(...)` decorates a plain function (DLM) or a coroutine function
    (AsyncDLM); anything else is InvalidType (a generator would run after the lock is
    released)."""
    if not callable(fn):
        raise InvalidType("locked(...) decorates a function")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise InvalidType("locked(...) cannot decorate a generator: its body would run "
                          "after the lock is released; lock inside it instead")
    if inspect.iscoroutinefunction(fn) != coroutine:
        other = ("AsyncDLM.locked for coroutine functions" if not coroutine
                 else "DLM.locked for plain functions")
        raise InvalidType(f"{client}.locked decorates "
                          f"{'coroutine' if coroutine else 'plain'} functions; use {other}")
