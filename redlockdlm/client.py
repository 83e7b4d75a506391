"""The synchronous client: `DLM`, `Lock` and `Request`.

Every step (an acquisition, its wait, a conversion, a release, a renewal) is a flow of
`redlockdlm.flows`, shared with the asyncio client; this module only performs the
operations the flows yield, with blocking sockets: one command written to every instance
before any reply is read (one round trip for all), a background thread that reads the
pub/sub events of every instance and starts the renewal ticks, a thread per flow that
waits in the background (a queued request, a renewal), and a thread that runs user
callbacks, so a slow callback never delays a renewal.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import logging
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis.exceptions import InvalidResponse, ResponseError

from .connection import (
    REROUTE,
    Instance,
    cluster_round,
    deliver_shard_message,
    event_gaps,
    event_slot,
    event_slots,
    open_session,
    reroute,
    routed,
)
from .engine import codec
from .engine.keys import slot_tag
from .engine.modes import Mode
from .engine.scripts import packed_command
from .errors import DLMError, LockTimeout, NotQueued
from .flows import Broadcast, Flow, Flows, Pipeline, Shielded, Spawn, Subscribe, Wait
from .handle import LockBase, MutexBase, RequestBase, check_decorated, check_locked_args
from .protocol import Call, LockCore, describe
from .wire import Round, settle

try:  # what redis-py's hiredis reader answers when a reply is not all there yet
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH
except ImportError:  # (older redis-py: hiredis's own default)
    _NOT_ENOUGH = False

#: what redis-py raises when a read finds the connection closed by the server
_CLOSED_BY_SERVER = "Connection closed by server."

log = logging.getLogger("redlockdlm")

#: An instance that fails these ways counts as unreachable (InvalidResponse: it is not Redis)
_NET_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, InvalidResponse)


class DLM(Flows):
    """A distributed lock manager client over N independent Redis instances.

    Locks are held on a majority quorum with leases renewed in the background. One `DLM`
    is one owner (session): its locks, blocking notifications and lease renewals. Close it
    (or use it as a context manager) to release everything it holds.
    """

    def __init__(self, urls: Sequence[str] | str, namespace: str = "default", *,
                 lease_ms: int = 10_000, socket_timeout: float = 1.0,
                 connect_timeout: float = 1.0, rejoin_ms: int | None = None, vbmax: int = 64,
                 owner: str | None = None, allow_eviction: bool = False,
                 **redis_options: Any) -> None:
        """Connect to the instances (`urls`: redis://, rediss:// or unix:// URLs, or one
        comma-separated str; an odd number). First contact with each instance that answers
        (an instance that does not is contacted when it first does) raises
        ConfigurationError when it cannot be used safely: DuplicateInstance (two URLs reach
        one server), EvictionPolicy (a maxmemory-policy other than noeviction; volatile-*
        ones are accepted with `allow_eviction=True`, allkeys-* never), LeaseTooLong
        (`lease_ms` above an instance's rejoin wait, rule E1); MixedTransport before any
        contact (rediss:// and redis:// mixed). `rejoin_ms` (default: `lease_ms`, raised to
        the longest rejoin wait an instance stores) is the rejoin wait of an epoch this client
        creates (an instance restarted empty)."""
        self._core, self._instances = open_session(
            Instance, urls, namespace, lease_ms=lease_ms, socket_timeout=socket_timeout,
            connect_timeout=connect_timeout, rejoin_ms=rejoin_ms, vbmax=vbmax, owner=owner,
            redis_options=redis_options, allow_eviction=allow_eviction)
        #: the state lock: held while a flow runs, released during its operations
        self._mu = threading.Lock()
        self._timeout = max(socket_timeout, connect_timeout)
        self._sel = selectors.DefaultSelector()
        #: poll objects of finished rounds, nothing registered (`_collect` takes one)
        self._polls: list[Any] = []
        errors = self._detect(range(len(self._instances)))
        errors += self._run(self._first_contact(range(len(self._instances))))
        if errors:
            for inst in self._instances:
                inst.close()
                inst.pool.disconnect()
            raise errors[0]
        self._closed = False
        #: background flows parked in a Wait: woken ones, and the times of the others
        self._ready: collections.deque[_Parked] = collections.deque()
        self._timers: list[tuple[float, int, _Parked]] = []
        #: the latest time the event thread wakes at (set with the state lock held)
        self._wakes_by = 0.0
        self._seq = 0
        self._callbacks: list[tuple[Callable[..., Any], tuple]] = []
        self._cb_cond = threading.Condition()
        self._core.renew_at = self._now() + self._core.renew_interval()
        self._renewing: set[int] = set()
        #: threads reading a stalled instance's reply (R4, R3): close() waits for them
        self._io: set[threading.Thread] = set()
        self._wake_r, self._wake_w = _socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        for i, inst in enumerate(self._instances):
            self._subscribe(i, inst)
        self._thread = threading.Thread(target=self._loop, name="redlockdlm-events",
                                        daemon=True)
        self._cb_thread = threading.Thread(target=self._run_callbacks,
                                           name="redlockdlm-callbacks", daemon=True)
        self._thread.start()
        self._cb_thread.start()

    # ----------------------------------------------------------------- public API

    @property
    def owner(self) -> str:
        return self._core.owner

    @property
    def quorum(self) -> int:
        return self._core.quorum

    def lock(self, resource: str | bytes, mode: object = Mode.EX, *,
             timeout: float | None = None, noqueue: bool = False, expedite: bool = False,
             no_deadlock_wait: bool = False, value_block: bool = True,
             on_blocking: Callable[[Mode], Any] | None = None,
             on_lost: Callable[[Lock], Any] | None = None,
             lease_ms: int | None = None, parent: Lock | None = None,
             priority: int = 0) -> Lock:
        """Block until `resource` is granted in `mode` on a quorum, and return the Lock.

        Raises LockTimeout (nothing left behind), NotQueued (noqueue and not grantable at
        once), Deadlock (chosen as a victim), ParentNotGranted, QuorumUnavailable (naming
        the instances that did not answer) or its subclass InstancesRecovering (naming the
        instances in their rejoin window, E1). With a `timeout`, the wait goes on through
        failures of instances until that timeout (docs/rules.md R3); without one it fails at
        the first round too few instances answer, and a `noqueue` request after its one
        round: no call without a timeout blocks when no quorum can decide.
        `priority` (docs/rules.md P1; an int in -2**31..2**31-1, default 0) matters only if
        the request is caught in a deadlock: the detector cancels the cycle's request of
        lowest priority, and among those the youngest (docs/detector.md D8). It changes no
        grant: queues stay in ticket order.

        Interrupted (KeyboardInterrupt, or anything a signal handler raises) while it
        waits, the request is withdrawn on every instance (released if granted meanwhile)
        before the exception propagates. `on_blocking` and `on_lost` run on the client's
        callback thread."""
        req = self.enqueue(resource, mode, timeout=timeout, noqueue=noqueue,
                           expedite=expedite, no_deadlock_wait=no_deadlock_wait,
                           value_block=value_block, on_blocking=on_blocking, on_lost=on_lost,
                           lease_ms=lease_ms, parent=parent, priority=priority)
        return req.wait()


    def enqueue(self, resource: str | bytes, mode: object = Mode.EX, *,
                timeout: float | None = None, noqueue: bool = False, expedite: bool = False,
                no_deadlock_wait: bool = False, value_block: bool = True,
                on_granted: Callable[[Lock], Any] | None = None,
                on_blocking: Callable[[Mode], Any] | None = None,
                on_lost: Callable[[Lock], Any] | None = None,
                lease_ms: int | None = None, parent: Lock | None = None,
                priority: int = 0) -> Request:
        """Send the request to every instance and return at once; the Request completes
        (and `on_granted` runs on the callback thread) when the lock is granted.
        `priority`: as for `lock`. Interrupted while the request is on its way, it is
        withdrawn from every instance before the exception propagates."""
        self._check_open()
        with self._mu:
            lk, req = self._new_request(
                resource, mode, timeout=timeout, noqueue=noqueue, expedite=expedite,
                no_deadlock_wait=no_deadlock_wait, value_block=value_block,
                on_granted=on_granted, on_blocking=on_blocking, on_lost=on_lost,
                lease_ms=lease_ms, parent=parent, priority=priority)
            self._resume(self._request(lk, req))
        return req

    def mutex(self, resource: str | bytes, mode: object = Mode.EX, *,
              lease_ms: int | None = None, reentrant: bool = False,
              **options: Any) -> Mutex:
        """A `Mutex`: `resource` in `mode`, taken with `acquire(blocking, timeout)` and
        given back with `release()`, as a `threading.Lock` (or, with `reentrant=True`, an
        `RLock` counting this object's acquisitions). Nothing is sent until `acquire`.
        `lease_ms` is its lock's lease; `options` go to `lock` (priority, on_lost,
        on_blocking...). Bad arguments raise InvalidArgument / InvalidType here."""
        self._check_open()
        return Mutex(self, resource, mode, lease_ms=lease_ms, reentrant=reentrant,
                     options=options)

    def locked(self, resource: str | bytes, mode: object = Mode.EX, *,
               timeout: float | None = None, lease_ms: int | None = None,
               **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A decorator: each call of the function runs holding `resource` in `mode`
        (`lock(resource, mode, timeout=..., lease_ms=..., **options)`, released when the
        call ends, whatever it raises). Errors of `lock` (LockTimeout, Deadlock...) reach
        the caller and the function does not run; a lock lost during the call raises
        LockLost after it. Plain functions only (InvalidType otherwise: `AsyncDLM.locked`
        decorates coroutine functions). The arguments are checked here."""
        m = check_locked_args(self._core, resource, mode, timeout, lease_ms)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            check_decorated(fn, False, "DLM")

            @functools.wraps(fn)
            def locked_call(*args: Any, **kwargs: Any) -> Any:
                with self.lock(resource, m, timeout=timeout, lease_ms=lease_ms, **options):
                    return fn(*args, **kwargs)
            return locked_call
        return decorate

    def close(self) -> None:
        """Release every lock this client holds or waits for (a request still waiting
        fails with DLMError "closed"), then close connections. Interrupted meanwhile
        (KeyboardInterrupt), it still finishes, on its own thread, before the exception
        propagates (bounded by the socket timeouts per lock)."""
        if self._closed:
            return
        t = threading.Thread(target=self._close, name="redlockdlm-close", daemon=True)
        t.start()
        try:
            t.join()
        except BaseException:
            t.join(self._cleanup_limit())
            raise

    def _close(self) -> None:
        if self._closed:
            return
        self._run(self._close_flow(DLMError("this DLM client was closed")))
        # R4, R3: replies still to come from stalled instances, and what they call for (a
        # late grant of a failed request is released): before the connections close
        limit = time.monotonic() + max(inst.timeout for inst in self._instances) + 0.5
        for t in list(self._io):
            t.join(max(0.0, limit - time.monotonic()))
        self._closed = True
        self._poke()
        self._thread.join(timeout=5)
        with self._cb_cond:
            self._cb_cond.notify_all()
        self._cb_thread.join(timeout=5)
        for inst in self._instances:
            try:
                if inst.pubsub is not None:
                    inst.pubsub.close()
                if inst.shards is not None:
                    inst.shards.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            inst.close()
            inst.pool.disconnect()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> DLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- the flow driver

    def _run(self, flow: Flow) -> Any:
        """Run `flow` to its end on this thread (the state lock taken here); its result."""
        with self._mu:
            return self._resume(flow)

    def _resume(self, flow: Flow, op: Any = None) -> Any:
        """Drive `flow` (state lock held) from operation `op` (None: from its start):
        perform each operation it yields and send back the result; an interruption
        (KeyboardInterrupt, what a signal handler raises) is thrown into the flow."""
        if op is None:
            try:
                op = flow.send(None)
            except StopIteration as stop:
                return stop.value
        while True:
            try:
                value, error = self._perform(op), None
            except BaseException as exc:  # noqa: BLE001 - the flow decides (re-raises)
                value, error = None, exc
            try:
                op = flow.send(value) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value

    def _perform(self, op: Any) -> Any:
        """One operation of a flow, state lock held (released while it does I/O)."""
        kind = type(op)  # (the operations are final classes)
        if kind is Wait:
            return self._wait(op.lk, op.until)
        if kind is Spawn:
            self._start(op.flow)
            return None
        self._mu.release()
        try:
            if kind is Broadcast:
                late = op.late
                return self._broadcast(op.cmds, enough=op.enough, late=None if late is None
                                       else lambda i, res: self._run(late(i, res)),
                                       until=op.until)
            if isinstance(op, Pipeline):
                return self._pipeline(op.i, op.calls)
            if isinstance(op, Shielded):
                self._finish_off(self._run, op.flow)
                return None
            if isinstance(op, Subscribe):
                return self._subscribe_members(op.lk, op.members)
            raise TypeError(f"not an operation: {op!r}")
        finally:
            self._mu.acquire()

    def _wait(self, lk: LockCore, until: float | None) -> bool:
        """`Wait` for a flow run by a caller's thread: that thread sleeps on the lock's
        condition (the state lock released meanwhile)."""
        timeout = None if until is None else until - self._now()
        if timeout is not None and timeout <= 0:
            return False
        w = self._waker(lk)
        cond = w.cond
        if cond is None:
            cond = w.cond = threading.Condition(self._mu)
        return cond.wait(timeout)

    def _waker(self, lk: LockCore) -> _Waker:
        w = lk.waker
        if w is None:
            w = lk.waker = _Waker()
        return w

    def _notify(self, lk: LockCore) -> None:
        w = lk.waker
        if w is None:
            return
        if w.cond is not None:  # (a caller's thread has waited on it)
            w.cond.notify_all()
        if w.parked:  # background flows waiting on it: the event thread resumes them
            for entry in w.parked:
                entry.woken = True
                self._ready.append(entry)
            w.parked.clear()
            if threading.current_thread() is not self._thread:
                self._poke()

    def _start(self, flow: Flow) -> None:
        """Run `flow` in the background: here up to its first operation. A `Wait` parks it
        (no thread: the event thread resumes it when the lock changes or its time comes);
        an operation that does I/O goes on a thread of its own."""
        self._step_background(flow, None, None)

    def _step_background(self, flow: Flow, value: Any, error: BaseException | None) -> None:
        """Step a background flow (state lock held) until it parks, hands its I/O to a
        thread, or ends."""
        while True:
            try:
                op = flow.send(value) if error is None else flow.throw(error)
            except StopIteration:
                return
            except Exception:  # noqa: BLE001 - a background flow has nobody to raise to
                log.exception("background step failed")
                return
            value, error = None, None
            if isinstance(op, Spawn):
                self._start(op.flow)
                continue
            if isinstance(op, Wait):
                if op.until is not None and op.until <= self._now():
                    value = False
                    continue
                entry = _Parked(flow, op.lk, op.until)
                self._waker(op.lk).parked.append(entry)
                if op.until is not None:
                    self._seq += 1
                    heapq.heappush(self._timers, (op.until, self._seq, entry))
                    if (op.until < self._wakes_by  # (else the event thread is up by then)
                            and threading.current_thread() is not self._thread):
                        self._poke()
                return
            threading.Thread(target=self._background_io, args=(flow, op), daemon=True,
                             name="redlockdlm-io").start()
            return

    def _background_io(self, flow: Flow, op: Any) -> None:
        with self._mu:
            try:
                value, error = self._perform(op), None
            except BaseException as exc:  # noqa: BLE001 - the flow decides
                value, error = None, exc
            self._step_background(flow, value, error)

    def _resume_parked(self) -> None:
        """(Event thread, state lock held.) Resume the parked flows whose lock changed
        (`Wait` answers True) or whose time came (False)."""
        now = self._now()
        while self._timers and self._timers[0][0] <= now:
            _, _, entry = heapq.heappop(self._timers)
            if entry.woken:
                continue
            entry.woken = True
            w = entry.lk.waker
            if w is not None and entry in w.parked:
                w.parked.remove(entry)
            self._step_background(entry.flow, False, None)
        while self._ready:
            entry = self._ready.popleft()
            self._step_background(entry.flow, True, None)

    def _wake_renewer(self) -> None:
        self._poke()

    # ----------------------------------------------------------------- internals: I/O

    def _cleanup_limit(self) -> float:
        """Seconds a clean-up may take: a few broadcasts, each bounded by the socket
        timeouts of the instances."""
        return 3 * (2 * self._timeout + 0.5) + 1.0

    def _finish_off(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a clean-up after an interruption (KeyboardInterrupt...) on a thread of its
        own and wait for it (bounded by `_cleanup_limit`): a second interruption stops only
        this wait, not the clean-up. What it raises is logged: the interruption is what
        the caller must see."""
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - logged; the interruption goes on
                log.warning("clean-up after an interruption failed: %s", describe(exc))

        t = threading.Thread(target=run, name="redlockdlm-cleanup", daemon=True)
        t.start()
        t.join(self._cleanup_limit())

    def _check_open(self) -> None:
        if self._closed:
            raise DLMError("this DLM client is closed")

    def _broadcast(self, cmds: Iterable[tuple[int, Call]], *, enough: int | None = None,
                   late: Callable[[int, Any], None] | None = None,
                   until: float | None = None) -> dict[int, Any]:
        """Write every command, then read the replies as they come: one round trip for all
        instances. Returns instance -> parsed reply or the exception it raised (as `settle`
        says; an instance silent for its socket timeout: redis.TimeoutError).

        With `enough` (R4, docs/protocol.md): return once that many replies are in and the
        others have had as long again as those took (at least 5 ms): a stalled instance
        then costs the caller nothing more. Its reply is read on another thread and given
        to `late(instance, result)`, which must handle it safely (a grant of a request that
        failed meanwhile is released).

        With `until` too (a monotonic time: R3, the caller's deadline): return then whatever
        is in; the replies not in are read as a stalled instance's are (to `late`) and are
        missing from the result."""
        conns: list[tuple[int, Call, Any]] = []
        results: dict[int, Any] = {}
        packed: tuple[Call | None, bytes] = (None, b"")  # (the same call to several: once)
        for i, call in cmds:
            inst = self._instances[i]
            if inst.cluster is not None:  # a cluster member: on its slot's primary
                call = self._core.member_call(i, call)
                self._subscribe_slot(i, call)
                node = inst.routes.node(call)
                if node is None:  # (no route: through the cluster client)
                    conns.append((i, call, _ClusterCall(self, i, call)))
                    continue
                conn = inst.routes.get(node)
            else:
                conn = inst.get()
            if conn._sock is None:
                # Connecting waits for the handshake's replies (HELLO...): a stalled
                # instance would hold up the others' writes, so it goes on its own thread
                conns.append((i, call, _Connecting(self, i, call, conn)))
                continue
            if packed[0] is not call:
                packed = (call, packed_command(*call))
            try:
                self._write(conn, (packed[1],))
                conns.append((i, call, conn))
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
                conn.disconnect()
                self._instances[i].put(conn)
                if reroute(conn, exc):
                    conns.append((i, call, _ClusterCall(self, i, call)))
                else:
                    results[i] = exc
        t0 = time.monotonic()
        try:
            rest = self._collect(conns, t0, results, enough, until=until)
        except BaseException:  # interrupted: replies nobody will read
            for i, _, conn in conns:
                if i in results or isinstance(conn, _Connecting):
                    continue  # (a connecting thread ends by its own timeouts)
                with contextlib.suppress(Exception):
                    conn.disconnect()
                self._instances[i].put(conn)
            raise
        if rest:
            self._spawn(self._collect, rest, t0, {}, None, late)
        return results

    def _collect(self, entries: list[tuple[int, Call, Any]], t0: float, got: dict[int, Any],
                 enough: int | None, each: Callable[[int, Any], None] | None = None,
                 until: float | None = None) -> list[tuple[int, Call, Any]]:
        """Read the replies of `entries` (instance, call, connection: written at `t0`) in
        the order they arrive, into `got` (and to `each`), until all are in, or `enough`
        replies are in `got` and the others had their grace (see `_broadcast`), or `until`
        (with `enough`). An instance silent for its socket timeout from `t0` gets a
        redis.TimeoutError. Returns the entries not read."""
        todo: dict[int, tuple[int, Call, Any]] = {}
        try:
            poll = self._polls.pop()
        except IndexError:
            poll = select.poll()
        inbound = select.POLLIN | select.POLLPRI
        instances = self._instances

        def read(e: tuple[int, Call, Any]) -> None:
            i, call, conn = e
            res = conn.result() if type(conn) in _THREADED else self._finish(
                i, conn, [call])[0]
            if res is _REROUTED:  # a cluster member's slot elsewhere: through redis-py
                again = _ClusterCall(self, i, call)
                todo[again.fd] = (i, call, again)
                poll.register(again.fd, inbound)
                return
            got[i] = res
            if each is not None:
                each(i, res)

        longest = 0.0
        for e in entries:
            conn = e[2]
            if type(conn) in _THREADED:
                fd = conn.fd
            else:
                sock = conn._sock
                if sock is None:  # (the read fails at once)
                    read(e)
                    continue
                fd = sock.fileno()
            longest = max(longest, instances[e[0]].timeout)
            todo[fd] = e
            poll.register(fd, inbound)
        ends = t0 + longest
        grace_end: float | None = None
        cut = None if enough is None else until
        while todo:
            now = time.monotonic()
            until = ends
            if cut is not None:
                if now >= cut:
                    break
                until = min(until, cut)
            if enough is not None and len(got) >= enough:
                if grace_end is None:
                    grace_end = now + max(0.005, now - t0)
                if now >= grace_end:
                    break
                until = min(until, grace_end)
            events = poll.poll(max(0, int((until - now) * 1000) + 1))
            for fd, _ in events:
                e = todo.pop(fd, None)
                if e is not None:
                    poll.unregister(fd)
                    read(e)
            if not events and time.monotonic() >= ends:
                for fd, e in list(todo.items()):
                    if type(e[2]) in _THREADED:
                        continue  # bounded by its own connect and socket timeouts
                    del todo[fd]
                    poll.unregister(fd)
                    i, _, conn = e
                    conn.disconnect()  # its reply, if any, must not reach the next command
                    instances[i].put(conn)
                    if routed(conn):  # (a failover?)
                        instances[i].routes.refresh()
                    res = redis.TimeoutError(f"Timeout reading from {instances[i].url}")
                    got[i] = res
                    if each is not None:
                        each(i, res)
                ends = time.monotonic() + 0.1  # (only threads of connections left)
        for fd in todo:  # (read later, or by another thread: the poll goes back empty)
            poll.unregister(fd)
        self._polls.append(poll)
        return list(todo.values())

    def _pipeline(self, i: int, calls: Sequence[Call]) -> list[Any]:
        """Send every call to instance `i` in one write and read their replies: one round
        trip however many calls. One result per call, as `settle` gives it. (A cluster
        member: one such round per primary, `_cluster_pipeline`.)"""
        inst = self._instances[i]
        if inst.cluster is not None:
            calls = [self._core.member_call(i, c) for c in calls]
            for c in calls:
                self._subscribe_slot(i, c)
            return self._cluster_pipeline(i, calls)
        conn = inst.get()
        try:
            self._write(conn, [packed_command(*c) for c in calls])
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
            conn.disconnect()
            self._instances[i].put(conn)
            return [exc] * len(calls)
        return self._finish(i, conn, calls)

    def _cluster_pipeline(self, i: int, calls: Sequence[Call]) -> list[Any]:
        """`_pipeline` on cluster member i (`calls` in its layout): the calls of each
        primary (by the slot map) written in one write to it, every primary's before any
        reply is read, so a stalled primary costs one socket timeout, whatever the number
        of its slots. A call met by MOVED / ASK / TRYAGAIN / CLUSTERDOWN, refused by its
        primary's address, or without a route, goes again through the cluster client."""
        inst = self._instances[i]
        routes = inst.routes
        out: list[Any] = [_REROUTED] * len(calls)
        written: list[tuple[Any, list[int]]] = []
        for node, idx in routes.by_primary(calls):
            conn = routes.get(node)
            try:
                self._write(conn, [packed_command(*calls[k]) for k in idx])
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, stalled...
                conn.disconnect()
                inst.put(conn)
                if not reroute(conn, exc):
                    for k in idx:
                        out[k] = exc
                continue
            written.append((conn, idx))
        for conn, idx in written:
            for k, res in zip(idx, self._finish(i, conn, [calls[k] for k in idx])):
                out[k] = res
        again = [k for k, res in enumerate(out) if res is _REROUTED]
        if again:
            for k, res in zip(again, cluster_round(inst.cluster, [calls[k] for k in again],
                                                   inst.url)):
                out[k] = res
        return out

    def _finish(self, i: int, conn: Any, calls: Sequence[Call]) -> list[Any]:
        """Read the replies of `calls`, already written on `conn` to instance `i`, and
        settle them (`wire.Round`: calls that met a missing library, restarted empty or
        flushed, did nothing and are sent again after loading it, or in the `EVAL` form if
        the load is refused). A network error is every call's result and closes the connection. The
        connection goes back to the instance. On a cluster primary's connection (`Routes`),
        a call that did nothing there (a `REROUTE` reply) is `_REROUTED`, to go again
        through the cluster client; a network error (the call may have run) stays the
        call's result, as on a standalone member, and refreshes the slot map."""
        inst = self._instances[i]
        try:
            replies = self._replies(conn, len(calls))
            if len(replies) == 1 and not isinstance(replies[0], BaseException) and not routed(conn):
                # (the common case, one call answered: no `Round` to drive, as it only
                # acts on an error reply)
                return [settle(calls[0], replies[0], inst.url)]
            rnd = Round(calls)
            cmds = rnd.feed(replies)
            while cmds:
                self._write(conn, conn.pack_commands(cmds))
                cmds = rnd.feed(self._replies(conn, len(cmds)))
            if routed(conn):
                return [_REROUTED if isinstance(r, REROUTE) else settle(c, r, inst.url)
                        for c, r in zip(calls, rnd.raws)]
            return [settle(c, r, inst.url) for c, r in zip(calls, rnd.raws)]
        except Exception as exc:  # noqa: BLE001 - unreachable, timed out, not Redis...
            conn.disconnect()
            if routed(conn):  # (a failover? the map again)
                inst.routes.refresh()
            return [exc] * len(calls)
        except BaseException:  # interrupted (KeyboardInterrupt): replies nobody will read
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise
        finally:
            inst.put(conn)

    @staticmethod
    def _write(conn: Any, chunks: Sequence[bytes]) -> None:
        """One write of packed commands (the one place a round trip starts). On an open
        connection of ours that redis-py would write as is (`direct_io`): the socket's own
        `sendall`, a failure raised as `send_packed_command` raises it (the connection
        closed, a timeout as redis.TimeoutError, another OSError as redis.ConnectionError),
        without its layers (health check, str test, debug log); otherwise through it."""
        sock = conn._sock
        if sock is None or not getattr(conn, "dlm_direct", False):
            conn.send_packed_command(chunks)
            return
        try:
            for chunk in chunks:
                _send(sock, chunk)
        except BaseException as exc:  # (what send_packed_command does: never reused)
            conn.disconnect()
            err = _write_error(exc)
            if err is exc:
                raise
            raise err from exc

    @staticmethod
    def _replies(conn: Any, n: int) -> list[Any]:
        """The next `n` replies on `conn`, an error reply as its ResponseError; a network
        error propagates (the connection is then unusable).

        On a connection of ours that redis-py reads with hiredis (`direct_io`), straight
        from its hiredis reader: `recv` (redis-py's `read_from_socket`) only when no whole
        reply is buffered, which is what `read_response` does minus its layers per reply.
        Failures are what it makes of them: a timeout is redis.TimeoutError ("Timeout
        reading from host:port"), a reset or a close by the server (a reply cut in the
        middle included) redis.ConnectionError, garbage InvalidResponse, a ConnectionError
        reply (LOADING...) raised; each closes the connection, so no byte of a reply
        nobody read reaches the next command. A push message (RESP3) goes to redis-py's
        handler, as there."""
        parser = conn._parser
        reader = getattr(parser, "_reader", None) if getattr(conn, "dlm_direct", False) \
            else None
        raws: list[Any] = []
        if reader is None:
            for _ in range(n):
                try:
                    raws.append(conn.read_response())
                except ResponseError as exc:
                    raws.append(exc)
            return raws
        try:
            while True:
                raw = reader.gets()
                if raw is _NOT_ENOUGH:
                    _fill(parser)
                    continue
                if type(raw) is list:
                    if raw and isinstance(raw[0], redis.ConnectionError):
                        raise raw[0]
                elif not _plain_reply(parser, raw):
                    continue
                raws.append(raw)
                if len(raws) == n:
                    return raws
        except (redis.TimeoutError, TimeoutError):
            conn.disconnect()
            raise redis.TimeoutError(f"Timeout reading from {conn._host_error()}") from None
        except OSError as exc:
            conn.disconnect()
            raise redis.ConnectionError(
                f"Error while reading from {conn._host_error()} : {exc.args}") from exc
        except BaseException:
            conn.disconnect()
            raise

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            finally:
                self._io.discard(t)

        t = threading.Thread(target=run, daemon=True, name="redlockdlm-io")
        self._io.add(t)
        t.start()

    # ----------------------------------------------------------------- background thread

    def _detect(self, which: Iterable[int]) -> list[DLMError]:
        """First contact, before `init hello`: the kind of each member of `which` not known
        yet that answers (`Instance.detect`, in parallel). A cluster member gets its cluster
        client and its shard subscriptions; one that shares a node with another member's
        cluster is refused (DuplicateInstance, returned). A member that does not answer is
        used as a standalone server until it does (its calls fail as they would)."""
        todo = [i for i in which if not self._instances[i].detected
                and i not in self._core.refused]
        if not todo:
            return []
        found: dict[int, Any] = {}

        def one(i: int) -> None:
            try:
                found[i] = self._instances[i].detect()
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
                log.info("instance %s: kind not known yet: %s", self._instances[i].url,
                         describe(exc))

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in todo]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors: list[DLMError] = []
        with self._mu:
            for i, ids in sorted(found.items()):
                if ids is None:
                    continue
                inst = self._instances[i]
                err = self._core.note_cluster(i, ids)
                if err is not None:
                    errors.append(err)
                    continue
                if inst.pubsub is not None:  # (a standalone subscription made meanwhile)
                    with contextlib.suppress(Exception):
                        inst.pubsub.close()
                    inst.pubsub = None
                    self._watch(i, inst)
                inst.shards = _Shards(inst.cluster, self._timeout)
        return errors

    def _subscribe_slot(self, i: int, call: Call) -> None:
        """Before a call about a hash slot of cluster member i, for a lock that reads
        events at that point (`Session.reads_events`: an `on_blocking` lock, a waiting one;
        N4): this owner's shard channel of that slot is subscribed there (confirmed), so
        none of its events is missed; if that fails, the call goes anyway (the re-check
        finds the grant). Any other call goes unsubscribed: a lock granted at once never
        reads an event, and one that queues subscribes then (`_event_gaps`)."""
        shards = self._instances[i].shards
        slot = None if shards is None else event_slot(self._core, shards.slots, call)
        if slot is not None:
            self._subscribe_to(i, slot)

    def _subscribe_to(self, i: int, slot: int) -> bool:
        """Subscribe this owner's shard channel of `slot` on cluster member i and wait for
        the confirmation (bounded: `_Shards.subscribe`). True if it is subscribed now."""
        shards = self._instances[i].shards
        if shards is None:
            return False
        def deliver(ev: codec.Event) -> None:
            with self._mu:
                self._on_event(i, ev)

        core = self._core
        try:
            shards.subscribe(slot, core.slot_channel(slot), deliver,
                             lambda: event_slots(core))
        except Exception as exc:  # noqa: BLE001 - the shard unreachable...: re-checks
            log.info("instance %s: no event subscription for slot %d yet: %s",
                     self._instances[i].url, slot, describe(exc))
        self._poke()  # the event thread watches the shard's socket
        return slot in shards.slots

    def _event_gaps(self, lk: LockCore) -> list[int]:
        """(State lock held.) The cluster members where `lk` is queued or granted while it
        waits, whose slot channel is not subscribed yet and not tried in this wait."""
        return event_gaps(self._core, self._instances, lk)

    def _subscribe_members(self, lk: LockCore, members: Sequence[int]) -> list[int]:
        """`Subscribe`: `lk`'s slot on each of `members` (state lock released), one after
        the other; the members where it is subscribed now."""
        return [i for i in members if self._subscribe_to(i, lk.slot)]

    def _watch_shards(self, i: int, inst: Instance) -> None:
        """(Event thread.) Keep the selector on the sockets of the member's shard
        subscriptions (one per primary; redis-py replaces them on a reconnect, and moves a
        channel to the slot's new primary after a migration or failover)."""
        now = inst.shards.sockets()
        for sock in inst.shard_socks - now:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        for sock in now - inst.shard_socks:
            try:
                self._sel.register(sock, selectors.EVENT_READ, i)
            except (KeyError, ValueError, OSError):
                now.discard(sock)
        inst.shard_socks = now

    def _subscribe(self, i: int, inst: Instance) -> None:
        if inst.cluster is not None:
            return  # (shard channels: `_subscribe_slot`)
        ps = None
        try:
            ps = inst.client.pubsub(ignore_subscribe_messages=True)
            ps.subscribe(self._core.channel)
            inst.pubsub = ps
            self._watch(i, inst)
        except Exception as exc:  # noqa: BLE001 - not Redis, refused by the ACL...: retried
            loud = not isinstance(exc, _NET_ERRORS) and not inst.warned
            inst.warned = inst.warned or loud  # once: it is retried every second
            log.log(logging.WARNING if loud else logging.INFO,
                    "instance %s: no event subscription yet: %s", inst.url, describe(exc))
            if ps is not None:
                with contextlib.suppress(Exception):
                    ps.close()
            inst.pubsub = None

    def _watch(self, i: int, inst: Instance) -> None:
        """Keep the selector on the socket the pub/sub connection uses now. redis-py
        replaces that socket when it reconnects inside `get_message`, and closes the old one
        (whose fd number the next socket may reuse): registering by fd alone would leave us
        watching a dead socket, or make `register` fail on the reused fd."""
        ps = inst.pubsub
        conn = ps.connection if ps is not None else None
        sock = conn._sock if conn is not None else None
        if sock is inst.sock:
            return
        if inst.sock is not None:
            try:
                self._sel.unregister(inst.sock)  # by the object: works once it is closed
            except (KeyError, ValueError):
                pass
            inst.sock = None
        if sock is not None:
            self._sel.register(sock, selectors.EVENT_READ, i)
            inst.sock = sock

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass


    def _plan_wake(self) -> float:
        """(Event thread, state lock held.) How long the event thread may sleep: until the
        renewal, the first parked flow's time, or half a second, whichever comes first
        (none if a woken flow is ready). The time it wakes by is `_wakes_by`: a flow parked
        with a later time needs no poke (`_step_background`)."""
        now = self._now()
        until = min(now + 0.5, self._core.renew_at)
        if self._timers:
            until = min(until, self._timers[0][0])
        if self._ready:
            until = now
        self._wakes_by = until
        return max(0.0, until - now)

    def _loop(self) -> None:
        next_resub = 0.0
        with self._mu:
            timeout = self._plan_wake()
        while not self._closed:
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                self._drain(key.data)
            if self._closed:
                break
            now = self._now()
            if now >= next_resub:
                next_resub = now + 1.0
                errors = self._detect(range(self._core.n))
                for err in errors + self._run(self._first_contact(range(self._core.n))):
                    log.error("instance refused, its votes never count: %s", err)
                for i, inst in enumerate(self._instances):
                    if inst.pubsub is None and i not in self._core.refused:
                        self._subscribe(i, inst)
            for i, inst in enumerate(self._instances):
                if inst.shards is not None:
                    self._watch_shards(i, inst)
            with self._mu:
                self._resume_parked()
                if self._renewal_due():
                    self._renew_tick()
                self._check_lost()  # also when every instance stalls and no reply comes
                timeout = self._plan_wake()

    def _drain(self, i: int) -> None:
        inst = self._instances[i]
        if inst.shards is not None:
            def deliver(ev: codec.Event) -> None:
                with self._mu:
                    self._on_event(i, ev)
            try:
                inst.shards.drain(deliver)
            except Exception as exc:  # noqa: BLE001 - every shard lost, a garbled event...
                log.log(logging.INFO, "instance %s: event connection lost: %s", inst.url,
                        describe(exc))
            self._watch_shards(i, inst)
            return
        ps = inst.pubsub
        if ps is None:
            return
        try:
            if not self._read_events(i, ps):
                while True:
                    msg = ps.get_message(timeout=0.0)
                    if msg is None:
                        break
                    if msg.get("type") == "message":
                        ev = codec.parse_event(msg["data"])
                        with self._mu:
                            self._on_event(i, ev)
            self._watch(i, inst)  # a reconnect inside get_message changed the socket
        except Exception as exc:  # noqa: BLE001 - lost, not Redis, a garbled event...
            loud = not isinstance(exc, (*_NET_ERRORS, ValueError, DLMError)) and not inst.warned
            inst.warned = inst.warned or loud  # e.g. SUBSCRIBE refused by the ACL: say so once
            log.log(logging.WARNING if loud else logging.INFO,
                    "instance %s: event connection lost: %s", inst.url, describe(exc))
            try:
                ps.close()
            except Exception:  # noqa: BLE001
                pass
            inst.pubsub = None
            self._watch(i, inst)


    def _read_events(self, i: int, ps: Any) -> bool:
        """(Event thread, `ps`'s socket readable.) Deliver the events of instance i that
        came whole, read straight from the connection's hiredis parser: one `recv` of what
        the socket holds, then every complete message parsed from it, no poll before or
        after (what `PubSub.get_message` does for each message costs two polls and its
        retry, health-check and metrics layers: a third of a contended acquisition's
        event-thread CPU). What came of a message only in part stays in the parser, and
        the selector reports the socket again when the rest comes. False when this path
        cannot read the connection (no hiredis parser, the connection closed or broken):
        `PubSub.get_message` reads it then, and reconnects it as it always did."""
        conn = ps.connection
        reader = _event_reader(conn)
        if reader is None:
            return False
        try:
            _fill(conn._parser)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            conn.disconnect()  # (`get_message` reconnects it and subscribes again)
            return False
        while True:
            raw = reader.gets()
            if raw is _NOT_ENOUGH:
                return True
            if (isinstance(raw, list) and len(raw) == 3
                    and raw[0] in (b"message", "message")):
                ev = codec.parse_event(raw[2])
                with self._mu:
                    self._on_event(i, ev)
            elif isinstance(raw, Exception):  # an error reply (a SUBSCRIBE the ACL
                raise raw  # refuses...): raised, as `get_message` raises it, to `_drain`
            # (anything else: a subscription's confirmation, a PONG)

    # ----------------------------------------------------------------- callbacks

    def _callback(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._cb_cond:
            self._callbacks.append((fn, args))
            self._cb_cond.notify()

    def _run_callbacks(self) -> None:
        while True:
            with self._cb_cond:
                while not self._callbacks and not self._closed:
                    self._cb_cond.wait(0.5)
                if not self._callbacks and self._closed:
                    return
                fn, args = self._callbacks.pop(0)
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a user callback must not kill the client
                log.exception("callback %r raised", fn)  # (SystemExit too: this thread)

    # ----------------------------------------------------------------- release / convert

#: the result of a call to a cluster primary that did nothing there (`REROUTE` replies, the
#: primary's address refused): it goes again through the cluster client (`_ClusterCall`)
_REROUTED = object()


def _send(sock: Any, data: bytes) -> None:
    """`sock.sendall(data)` without the `poll` CPython runs before each send on a socket
    with a timeout (its file descriptor is non-blocking then): one `write`, the GIL given
    up once instead of twice. A plain socket only (a TLS one writes through its `ssl`
    layer); what the buffer cannot take now (a full send buffer: `BlockingIOError`, or a
    part) goes by `sendall`, within the socket's timeout as before. A failure is the
    `OSError` `sendall` raises for it (EPIPE, ECONNRESET, EBADF once closed)."""
    if type(sock) is not socket.socket:
        sock.sendall(data)
        return
    try:
        n = os.write(sock.fileno(), data)
    except BlockingIOError:
        n = 0
    if n < len(data):
        sock.sendall(memoryview(data)[n:])


def _fill(parser: Any) -> None:
    """`parser.read_from_socket()` (redis-py's hiredis parser: one `recv` into its buffer,
    fed to its reader) without the `poll` CPython runs first on a socket with a timeout:
    one `readv` into the same buffer when bytes are there (the poll of `DLM._collect` or
    the event thread's selector said so). When none are (`BlockingIOError`), on a TLS
    socket, or on a parser without that buffer, `read_from_socket` itself: it waits
    within the socket's timeout and raises what it raises. A close by the server is its
    ConnectionError; a reset the `OSError` its `recv_into` raises."""
    sock = parser._sock
    buf = getattr(parser, "_buffer", None)
    if type(sock) is socket.socket and type(buf) is bytearray:
        try:
            n = os.readv(sock.fileno(), (buf,))
        except BlockingIOError:
            pass
        else:
            if n == 0:
                raise redis.ConnectionError(_CLOSED_BY_SERVER)
            parser._reader.feed(buf, 0, n)
            return
    parser.read_from_socket()


def _write_error(exc: BaseException) -> BaseException:
    """What redis-py's `send_packed_command` raises for `exc`, raised by `sendall`."""
    if isinstance(exc, TimeoutError):  # (socket.timeout)
        if exc.errno is not None:  # ETIMEDOUT from the OS: the connection is dead
            return redis.ConnectionError(
                f"Error {exc.errno} while writing to socket. {exc.strerror}.")
        return redis.TimeoutError("Timeout writing to socket")
    if isinstance(exc, OSError):
        errno, msg = ("UNKNOWN", exc.args[0]) if len(exc.args) == 1 else exc.args[:2]
        return redis.ConnectionError(f"Error {errno} while writing to socket. {msg}.")
    return exc


def _plain_reply(parser: Any, raw: Any) -> bool:
    """(`DLM._replies`, a reply that is not a list.) False for a push message, handled by
    redis-py's parser as `read_response` handles it; a ConnectionError reply raised; True
    for any other reply (an error reply as its ResponseError)."""
    push = getattr(parser, "_hiredis_PushNotificationType", None)
    if push is not None and isinstance(raw, push):
        parser.handle_push_response(raw)
        return False
    if isinstance(raw, redis.ConnectionError):
        raise raw
    return True


#: shard channels (hash slots) a cluster member keeps subscribed when no lock reads them
MAX_SLOT_SUBS = 1024
#: the longest wait for a subscription's confirmation before the call goes without it (s)
SUBSCRIBE_WAIT_S = 0.5


class _Shards:
    """A cluster member's event subscriptions: this owner's shard channel for each hash
    slot where a lock of the client read events there (N4: an `on_blocking` lock, a lock
    that waited; SSUBSCRIBE on the slot's primary; redis-py's `ClusterPubSub` reconnects
    and follows a slot to its new primary). A slot stays subscribed up to `MAX_SLOT_SUBS`
    slots: beyond that, the slots of no lock that reads events now are unsubscribed.
    `lock` serializes the subscriber (a flow's thread) and the reader (the event thread)."""

    def __init__(self, rc: Any, timeout: float) -> None:
        self.rc = rc
        self.ps = rc.pubsub()
        self.lock = threading.Lock()
        self.slots: set[int] = set()
        self.timeout = min(timeout, SUBSCRIBE_WAIT_S)
        #: slot -> monotonic time before which a failed subscription is not tried again
        self.retry_at: dict[int, float] = {}

    def subscribe(self, slot: int, channel: bytes, deliver: Callable[[codec.Event], None],
                  in_use: Callable[[], set[int]]) -> None:
        """SSUBSCRIBE `channel` (of `slot`) and wait for its confirmation (events read
        meanwhile go to `deliver`), bounded by the socket timeout and `SUBSCRIBE_WAIT_S`;
        after a failure the slot is not tried again for a second."""
        if time.monotonic() < self.retry_at.get(slot, 0.0):
            return  # (failed a moment ago: the call goes without it, as then)
        with self.lock:
            if slot in self.slots:
                return
            try:
                self._subscribe(slot, channel, deliver, in_use)
            except BaseException:
                self.retry_at[slot] = time.monotonic() + 1.0
                raise

    def _subscribe(self, slot: int, channel: bytes, deliver: Callable[[codec.Event], None],
                   in_use: Callable[[], set[int]]) -> None:
        if len(self.slots) >= MAX_SLOT_SUBS:
            used = in_use()
            drop = [s for s in self.slots if s not in used]
            if drop:
                prefix = channel[:channel.index(b"{")]
                owner = channel[channel.index(b"}:") + 2:]
                self.ps.sunsubscribe(*[prefix + b"{" + slot_tag(s) + b"}:" + owner
                                       for s in drop])
                self.slots.difference_update(drop)
        self.ps.ssubscribe(channel)
        node = self.rc.get_node_from_key(channel)
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            msg = self.ps.get_sharded_message(
                timeout=min(0.05, max(0.0, end - time.monotonic())), target_node=node)
            if msg is None:
                continue
            if msg["type"] == "ssubscribe" and msg["channel"] == channel:
                self.slots.add(slot)
                break
            self._handle(msg, deliver)
        else:
            raise redis.TimeoutError(f"no SSUBSCRIBE confirmation for {channel!r}")
        self._read(deliver)

    def drain(self, deliver: Callable[[codec.Event], None]) -> None:
        """Deliver the events that came (none waited for)."""
        with self.lock:
            self._read(deliver)

    def _read(self, deliver: Callable[[codec.Event], None]) -> None:
        while True:
            msg = self.ps.get_sharded_message(timeout=0.0)
            if msg is None:
                return
            self._handle(msg, deliver)

    _handle = staticmethod(deliver_shard_message)

    def sockets(self) -> set[Any]:
        out = set()
        for ps in list(self.ps.node_pubsub_mapping.values()):
            conn = ps.connection
            sock = conn._sock if conn is not None else None
            if sock is not None:
                out.add(sock)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ps.close()


class _Waker:
    """What wakes a flow waiting on one lock: a caller's thread sleeps on `cond` (made
    when one first does, on the state lock: a lock whose only waiter is a parked
    background flow, as a queued request's, needs none); a background flow parks in
    `parked` (no thread) until `DLM._notify` or its time."""

    __slots__ = ("cond", "parked")

    def __init__(self) -> None:
        self.cond: threading.Condition | None = None
        self.parked: list[_Parked] = []


class _Parked:
    __slots__ = ("flow", "lk", "until", "woken")

    def __init__(self, flow: Flow, lk: LockCore, until: float | None) -> None:
        self.flow = flow
        self.lk = lk
        self.until = until
        self.woken = False


class _Connecting:
    """One command to an instance whose connection is not open yet: connect, write and
    read the reply on a thread of its own (bounded by the connect and socket timeouts),
    then make `fd` readable for `DLM._collect`."""

    def __init__(self, dlm: DLM, i: int, call: Call, conn: Any) -> None:
        self.fd, self._wfd = os.pipe()
        self._box: list[Any] = []
        threading.Thread(target=self._run, args=(dlm, i, call, conn), daemon=True,
                         name="redlockdlm-connect").start()

    def _run(self, dlm: DLM, i: int, call: Call, conn: Any) -> None:
        try:
            dlm._write(conn, (packed_command(*call),))
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
            conn.disconnect()
            dlm._instances[i].put(conn)
            self._box.append(_REROUTED if reroute(conn, exc) else exc)
        else:
            self._box.append(dlm._finish(i, conn, [call])[0])
        os.write(self._wfd, b"x")

    def result(self) -> Any:
        os.close(self.fd)
        os.close(self._wfd)
        return self._box[0]


class _ClusterCall(_Connecting):
    """One call to a cluster member through redis-py's cluster client, on a thread of its
    own (what the fast path, `Routes`, could not deliver: a call met by MOVED / ASK, a
    primary's address refused, a slot not in the map): redis-py routes it to its slot's
    primary (MOVED, ASK, a failover handled there, its map updated) and blocks until it is
    done; `fd` turns readable then, for `DLM._collect`."""

    def __init__(self, dlm: DLM, i: int, call: Call) -> None:
        super().__init__(dlm, i, call, None)

    def _run(self, dlm: DLM, i: int, call: Call, conn: Any) -> None:
        inst = dlm._instances[i]
        try:
            self._box.append(cluster_round(inst.cluster, [call], inst.url)[0])
        finally:
            os.write(self._wfd, b"x")



class Request(RequestBase):
    """An asynchronous lock request (`DLM.enqueue`)."""

    def __init__(self, dlm: DLM, lock: Lock, on_granted: Callable[[Lock], Any] | None) -> None:
        super().__init__(dlm, lock, on_granted)
        self._done = threading.Event()

    def _set_done(self, error: DLMError | None) -> None:
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Lock:
        """Block until granted (return the Lock) or failed (raise its error). A `timeout`
        here only bounds this wait (StillWaiting, a LockTimeout, when it ends first); the request
        itself keeps waiting with its own timeout. Interrupted
        (KeyboardInterrupt, or anything a signal handler raises), the request is withdrawn
        as by `cancel()` (released if granted meanwhile) before the exception propagates."""
        try:
            done = self._done.wait(timeout)
        except BaseException:
            self._dlm._finish_off(self.cancel)
            raise
        if not done:
            raise self._still_waiting(timeout)
        if self._error is not None:
            raise self._error
        return self.lock

    def cancel(self) -> None:
        """Withdraw the request on every instance (or release it if it was granted); it
        completes with LockTimeout("cancelled") if it had not."""
        self._dlm._run(self._dlm._withdraw(self))


class Lock(LockBase):
    """A lock held (or being acquired) on a quorum of instances (see `LockBase` for what
    it shows)."""

    def _guard(self) -> Any:
        return self._dlm._mu

    def lock(self, resource: str | bytes, mode: object = Mode.EX, **kw: Any) -> Lock:
        """Lock a child resource of this one (names are scoped by this lock's resource)."""
        return self._dlm.lock(resource, mode, parent=self, **kw)

    def enqueue(self, resource: str | bytes, mode: object = Mode.EX, **kw: Any) -> Request:
        return self._dlm.enqueue(resource, mode, parent=self, **kw)

    def convert(self, mode: object, *, timeout: float | None = None, noqueue: bool = False,
                quecvt: bool = False, convdeadlk: bool = False,
                no_deadlock_wait: bool = False, priority: int = 0) -> None:
        """Change the mode (up or down). A down-conversion from PW/EX writes a value you set.
        On failure (NotQueued, Deadlock, LockTimeout) the lock keeps its old mode, but a
        down-conversion is never taken back (G4): one that fails is in the new mode.
        `priority` (as for `DLM.lock`) is this conversion's, should it wait on a deadlock.
        Interrupted (KeyboardInterrupt...) before it returns, a conversion that may wait
        (up or sideways) is withdrawn on every instance and the lock keeps its old mode; a
        down-conversion, which never waits (G4) and may already have let other locks in
        beside its new mode, is completed; `mode` tells which. The exception propagates
        once every instance agrees (bounded by the socket timeouts)."""
        self._dlm._run(self._dlm._convert(self._core, mode, timeout, noqueue=noqueue,
                                          quecvt=quecvt, convdeadlk=convdeadlk,
                                          no_deadlock_wait=no_deadlock_wait,
                                          priority=priority))


    def release(self, *, subtree: bool = False) -> None:
        """Release on every instance (writing the value block if set by a PW/EX holder).
        Interrupted meanwhile (KeyboardInterrupt...), the release still reaches every
        instance, on a thread of its own, before the exception propagates."""
        self._dlm._run(self._dlm._release(self._core, subtree=subtree))

    def extend(self, lease_ms: int | None = None) -> None:
        """Renew this lock now on every instance, and with `lease_ms` give it that lease
        from now on (its renewals keep it; rule L1). Returns once a quorum renewed it.
        The lease must be one the instances allow (E1): LeaseTooLong when longer than an
        instance's rejoin wait, InvalidArgument beyond this client's rejoin_ms or outside
        100..86400000, nothing changed. LockReleased / LockStateError when the lock is
        not held; LockLost when it is no longer held on a quorum."""
        self._dlm._run(self._dlm._extend(self._core, lease_ms))

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        lost = self._lost_before_exit()
        self.release(subtree=True)
        self._raise_lost(lost, exc_type)


class Mutex(MutexBase):
    """One lock as a `threading.Lock` (`DLM.mutex`): `acquire`, `release`, `locked`,
    `owned`, and `with m:`. Safe to share between threads; its acquisitions are this
    object's, not a thread's: a second `acquire` while held raises AlreadyHeld (or, made
    `reentrant`, counts)."""

    def __init__(self, dlm: DLM, resource: str | bytes, mode: object, **kw: Any) -> None:
        super().__init__(dlm, resource, mode, **kw)
        self._mu = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock: True once granted on a quorum; False when `blocking=False` and
        it is not free now (NotQueued) or `timeout` seconds passed (-1: no limit), with
        nothing left queued. Deadlock (G14: this DLM holds the resource in a conflicting
        mode), QuorumUnavailable and the other errors of `DLM.lock` propagate.
        AlreadyHeld when this mutex holds it (not reentrant) or another thread is
        acquiring it."""
        with self._mu:
            kw = self._begin(blocking, timeout)
        if kw is None:
            return True
        lock = None
        try:
            lock = self._dlm.lock(self._resource, self._mode, **kw)
        except (LockTimeout, NotQueued):
            pass
        finally:
            with self._mu:
                granted = self._end(lock)
        return granted

    def release(self) -> None:
        """Give the lock back (a reentrant mutex: when its last acquisition is released).
        NotHeld when the mutex does not hold it (nothing sent). If the lock was lost
        while held, it is released and LockLost raised: what it protected was not."""
        self._give_back(None)

    def _give_back(self, exc_type: object) -> None:
        """`release`, and `__exit__` (which passes the exception leaving its block)."""
        with self._mu:
            lock = self._to_release()
        if lock is not None:
            lost = lock._lost_before_exit()
            lock.release(subtree=True)
            lock._raise_lost(lost, exc_type)

    def locked(self) -> bool:
        """True when some owner (this one included) holds the resource in a mode this
        mutex's mode conflicts with, as a quorum of instances answer now (a snapshot;
        QuorumUnavailable when too few answer)."""
        return self._dlm._run(self._dlm._probe(self._resource, self._mode))

    def __enter__(self) -> Mutex:
        if not self.acquire():  # (no timeout: only a withdrawn request ends so)
            raise LockTimeout("the mutex's request was withdrawn", resource=self.resource)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._give_back(exc_type)


def _event_reader(conn: Any) -> Any:
    """The hiredis reader of pub/sub connection `conn`, if `DLM._read_events` can read
    the connection through it (connected, parsed by redis-py's hiredis parser), else
    None."""
    if conn is None or conn._sock is None:
        return None
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    if reader is None or not hasattr(parser, "read_from_socket") or not hasattr(
            reader, "gets"):
        return None
    return reader


def _socketpair():
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


#: what `DLM._collect` reads through a thread of its own (`result()`, `fd`)
_THREADED = (_Connecting, _ClusterCall)

DLM._lock_class = Lock
DLM._request_class = Request
