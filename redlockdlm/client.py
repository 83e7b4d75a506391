"""The synchronous client: `DLM`, `Lock` and `Request`.

All decisions are made by `redlockdlm.protocol.Session`; this module only moves bytes:
it writes one command to every instance before reading any reply (one round trip for
all), runs a background thread that reads the pub/sub events of every instance, renews
leases and re-checks waiters, and a second thread that runs user callbacks, so a slow
callback never delays a renewal.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import selectors
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis.exceptions import InvalidResponse, ResponseError

from .connection import Instance, open_session
from .engine import codec
from .engine.instance import call_script
from .engine.keys import EPOCH_KEY
from .engine.modes import Mode
from .engine.scripts import packed_command
from .errors import (
    ConfigurationError,
    DLMError,
    InvalidType,
    QuorumUnavailable,
)
from .handle import LockBase
from .protocol import (
    Call,
    LockCore,
    Outcome,
    Phase,
    check_callback,
    check_timeout,
    descendants,
    describe,
)
from .wire import Round, settle

log = logging.getLogger("redlockdlm")

#: An instance that fails these ways counts as unreachable (InvalidResponse: it is not Redis)
_NET_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, InvalidResponse)


def hello(client: Any) -> Any:
    """First contact with one instance (`init hello`): its epoch, stored rejoin wait, server
    run_id and maxmemory-policy. Raises what the call raised (unreachable, refused...)."""
    return codec.parse_status(call_script(client, "init", [EPOCH_KEY], [b"hello"]))


class DLM:
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
        self._mu = threading.RLock()
        errors = self._first_contact(range(len(self._instances)))
        if errors:
            for inst in self._instances:
                inst.close()
                inst.pool.disconnect()
            raise errors[0]
        self._cond = threading.Condition(self._mu)
        self._closed = False
        self._timeout = max(socket_timeout, connect_timeout)
        self._callbacks: list[tuple[Callable[..., Any], tuple]] = []
        self._cb_cond = threading.Condition()
        self._next_renew = time.monotonic() + self._core.lease_ms / 3000.0
        self._renewing: set[int] = set()  # instances whose renewal is in flight
        self._sel = selectors.DefaultSelector()
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
        t = check_timeout(timeout)
        for what, fn in (("on_granted", on_granted), ("on_blocking", on_blocking),
                         ("on_lost", on_lost)):
            check_callback(what, fn)
        if parent is not None and not isinstance(parent, Lock):
            raise InvalidType("parent must be a Lock")
        with self._mu:
            lk = self._core.new_lock(resource, mode, parent=parent._core if parent else None,
                                     noqueue=noqueue, expedite=expedite,
                                     no_deadlock_wait=no_deadlock_wait, lease_ms=lease_ms,
                                     priority=priority)
            if t is not None:
                lk.deadline = time.monotonic() + t
            if lk.lease_ms < self._core.lease_ms:  # a shorter lease needs earlier ticks
                self._next_renew = min(self._next_renew,
                                       time.monotonic() + lk.lease_ms / 3000.0)
                self._poke()
            lock = Lock(self, lk, on_blocking, on_lost, value_block)
            lk.user = lock
            req = Request(self, lock, on_granted)
            lk.request = req
            cmds = [(i, self._core.request_cmd(lk)) for i in range(self._core.n)]
            lk.pending = set(range(self._core.n))
            sent = time.monotonic()
            for v in lk.votes:
                v.sent_at = sent
        try:  # R4: on a quorum of replies; a stalled instance's comes to _late_reply
            results = self._broadcast(cmds, enough=self._core.quorum,
                                      late=functools.partial(self._late_reply, lk, sent))
        except BaseException:  # interrupted: some instances may have queued or granted it
            with self._mu:
                self._core.forget(lk)
                lk.phase = Phase.FAILED
            self._finish_off(self._broadcast, [(i, self._core.release_cmd(lk, i=i))
                                               for i in range(self._core.n)])
            raise
        with self._mu:
            try:
                for i, res in results.items():
                    self._core.on_reply(lk, i, res, sent, time.monotonic())
            except DLMError as exc:
                self._core.forget(lk)
                req._finish(exc)
                raise
            self._advance(lk)
        return req

    def close(self) -> None:
        """Release every lock this client holds or waits for, then close connections.
        Interrupted meanwhile (KeyboardInterrupt), it still finishes, on its own thread,
        before the exception propagates (bounded by the socket timeouts per lock)."""
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
        with self._mu:
            roots = [lk for lk in self._core.locks.values() if lk.parent is None]
            pending = [lk.request for lk in self._core.locks.values()
                       if lk.request is not None]
        for lk in roots:
            try:
                self._release(lk, subtree=True)
            except DLMError as exc:
                log.warning("close: release of %s failed: %s", lk.id, exc)
        for req in pending:  # a request still waiting must not wait forever (no-op if done)
            req._finish(DLMError("this DLM client was closed", resource=req.lock.resource,
                                 lock_id=req.lock.id))
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
                   late: Callable[[int, Any], None] | None = None) -> dict[int, Any]:
        """Write every command, then read the replies as they come: one round trip for all
        instances. Returns instance -> parsed reply or the exception it raised (as `settle`
        says; an instance silent for its socket timeout: redis.TimeoutError).

        With `enough` (R4, docs/protocol.md): return once that many replies are in and the
        others have had as long again as those took (at least 5 ms): a stalled instance
        then costs the caller nothing more. Its reply is read on another thread and given
        to `late(instance, result)`, which must handle it safely (a grant of a request that
        failed meanwhile is released)."""
        conns: list[tuple[int, Call, Any]] = []
        results: dict[int, Any] = {}
        for i, call in cmds:
            conn = self._instances[i].get()
            if conn._sock is None:
                # Connecting waits for the handshake's replies (HELLO...): a stalled
                # instance would hold up the others' writes, so it goes on its own thread
                conns.append((i, call, _Connecting(self, i, call, conn)))
                continue
            try:
                self._write(conn, (packed_command(*call),))
                conns.append((i, call, conn))
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
                conn.disconnect()
                self._instances[i].put(conn)
                results[i] = exc
        t0 = time.monotonic()
        try:
            rest = self._collect(conns, t0, results, enough)
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
                 enough: int | None, each: Callable[[int, Any], None] | None = None
                 ) -> list[tuple[int, Call, Any]]:
        """Read the replies of `entries` (instance, call, connection: written at `t0`) in
        the order they arrive, into `got` (and to `each`), until all are in, or `enough`
        replies are in `got` and the others had their grace (see `_broadcast`). An instance
        silent for its socket timeout from `t0` gets a redis.TimeoutError. Returns the
        entries not read."""
        def read(e: tuple[int, Call, Any]) -> None:
            i, call, conn = e
            res = conn.result() if isinstance(conn, _Connecting) else self._finish(
                i, conn, [call])[0]
            got[i] = res
            if each is not None:
                each(i, res)

        todo: dict[int, tuple[int, Call, Any]] = {}
        poll = select.poll()
        for e in entries:
            conn = e[2]
            if isinstance(conn, _Connecting):
                fd = conn.fd
            elif conn._sock is None:  # (the read fails at once)
                read(e)
                continue
            else:
                fd = conn._sock.fileno()
            todo[fd] = e
            poll.register(fd, select.POLLIN | select.POLLPRI)
        ends = t0 + max((self._instances[e[0]].timeout for e in todo.values()), default=0.0)
        grace_end: float | None = None
        while todo:
            now = time.monotonic()
            until = ends
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
                    if isinstance(e[2], _Connecting):
                        continue  # bounded by its own connect and socket timeouts
                    del todo[fd]
                    poll.unregister(fd)
                    i, _, conn = e
                    conn.disconnect()  # its reply, if any, must not reach the next command
                    self._instances[i].put(conn)
                    res = redis.TimeoutError(f"Timeout reading from {self._instances[i].url}")
                    got[i] = res
                    if each is not None:
                        each(i, res)
                ends = time.monotonic() + 0.1  # (only threads of connections left)
        return list(todo.values())

    def _pipeline(self, i: int, calls: Sequence[Call]) -> list[Any]:
        """Send every call to instance `i` in one write and read their replies: one round
        trip however many calls. One result per call, as `settle` gives it."""
        conn = self._instances[i].get()
        try:
            self._write(conn, [packed_command(*c) for c in calls])
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
            conn.disconnect()
            self._instances[i].put(conn)
            return [exc] * len(calls)
        return self._finish(i, conn, calls)

    def _finish(self, i: int, conn: Any, calls: Sequence[Call]) -> list[Any]:
        """Read the replies of `calls`, already written on `conn` to instance `i`, and
        settle them (`wire.Round`: calls that met a missing library, restarted empty or
        flushed, did nothing and are sent again after loading it, or in the `EVAL` form if
        the load is refused). A network error is every call's result and closes the connection. The
        connection goes back to the instance."""
        inst = self._instances[i]
        try:
            rnd = Round(calls)
            cmds = rnd.feed(self._replies(conn, len(calls)))
            while cmds:
                self._write(conn, conn.pack_commands(cmds))
                cmds = rnd.feed(self._replies(conn, len(cmds)))
            return [settle(c, r, inst.url) for c, r in zip(calls, rnd.raws)]
        except Exception as exc:  # noqa: BLE001 - unreachable, timed out, not Redis...
            conn.disconnect()
            return [exc] * len(calls)
        except BaseException:  # interrupted (KeyboardInterrupt): replies nobody will read
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise
        finally:
            inst.put(conn)

    @staticmethod
    def _write(conn: Any, chunks: Sequence[bytes]) -> None:
        """One write of packed commands (the one place a round trip starts)."""
        conn.send_packed_command(chunks)

    @staticmethod
    def _replies(conn: Any, n: int) -> list[Any]:
        """The next `n` replies on `conn`, an error reply as its ResponseError; a network
        error propagates (the connection is then unusable)."""
        raws: list[Any] = []
        for _ in range(n):
            try:
                raws.append(conn.read_response())
            except ResponseError as exc:
                raws.append(exc)
        return raws

    def _send_and_feed(self, lk: LockCore, cmds: list[tuple[int, tuple]],
                       cticket: int | None = None) -> None:
        """Send commands about `lk` (outside the core lock) and record the replies: of a
        quorum of them, when more are sent (R4); the others as they come (`_late_reply`,
        or `_late_convert` for the conversion of ticket `cticket`)."""
        if not cmds:
            return
        sent = time.monotonic()
        late = (functools.partial(self._late_reply, lk, sent) if cticket is None
                else functools.partial(self._late_convert, lk, sent, cticket))
        results = self._broadcast(cmds, enough=min(len(cmds), self._core.quorum), late=late)
        with self._mu:
            for i, res in results.items():
                try:
                    self._core.on_reply(lk, i, res, sent, time.monotonic())
                except DLMError as exc:
                    log.warning("unexpected error from %s: %s", self._instances[i].url, exc)
            self._cond.notify_all()

    def _late_reply(self, lk: LockCore, sent: float, i: int, res: Any) -> None:
        """A reply about `lk` that came after its call returned (R4, on the reading
        thread): record it, re-evaluate, and release the request there if it failed."""
        with self._mu:
            cmds = self._core.on_late_reply(lk, i, res, sent, time.monotonic())
            if lk.phase is Phase.ACQUIRING and self._core.locks.get(lk.id) is lk:
                self._advance(lk)
            self._cond.notify_all()
        if cmds:
            self._broadcast(cmds)

    def _late_convert(self, lk: LockCore, sent: float, cticket: int, i: int,
                      res: Any) -> None:
        with self._mu:
            cmds = self._core.on_late_convert(lk, i, res, sent, cticket, time.monotonic())
            self._cond.notify_all()
        if cmds:
            self._broadcast(cmds)

    # ----------------------------------------------------------------- acquisition loop

    def _advance(self, lk: LockCore) -> Outcome:
        """Evaluate `lk` (core lock held) and act: complete, fail, or schedule."""
        out = self._core.evaluate_acquire(lk, time.monotonic())
        req: Request = lk.request
        if out.done:
            req._finish(None)
        elif out.error is not None:
            self._core.forget(lk)
            # The caller learns of the failure only once the clean-up has reached every
            # instance: a LockTimeout or NotQueued leaves nothing behind (not "soon").
            self._spawn(self._cleanup_then_finish, req, out.error, out.cleanup)
        else:
            if out.actions:
                self._spawn(self._send_and_feed_advance, lk, out.actions)
            lk.wake_at = out.wake_at
            if out.wake_at is not None:
                self._poke()
        self._cond.notify_all()
        return out

    def _cleanup_then_finish(self, req: Request, error: DLMError,
                             cleanup: list[tuple[int, tuple]]) -> None:
        with self._mu:  # a re-check in flight must not land after the clean-up
            while req.lock._core.sends:
                self._cond.wait(0.5)
        try:  # (R4: a stalled instance gets it when it wakes, or the lease ends it there)
            self._broadcast(cleanup, enough=self._core.quorum)
        finally:
            req._finish(error)

    def _send_and_feed_advance(self, lk: LockCore, cmds: list[tuple[int, tuple]]) -> None:
        with self._mu:
            if lk.phase in (Phase.FAILED, Phase.RELEASED):
                return  # withdrawn or failed meanwhile: a re-sent request would re-create it
            lk.sends += 1
        try:
            self._send_and_feed(lk, cmds)
        finally:
            with self._mu:
                lk.sends -= 1
                if lk.phase is Phase.ACQUIRING:
                    self._advance(lk)
                self._cond.notify_all()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        threading.Thread(target=fn, args=args, daemon=True, name="redlockdlm-io").start()

    # ----------------------------------------------------------------- background thread

    def _first_contact(self, which: Iterable[int]) -> list[ConfigurationError]:
        """Identify the instances of `which` not identified yet that answer (Session.identify).
        Returns the configuration errors found (the caller raises or logs them); an
        instance that does not answer is left for later."""
        hellos = {}
        for i in which:
            if self._core.run_ids[i] is not None or i in self._core.refused:
                continue
            inst = self._instances[i]
            try:
                hellos[i] = hello(inst.client)
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis (redis-py
                # can fail with anything on a server that answers HELLO with nonsense)
                log.info("instance %s: no first contact yet: %s", inst.url, describe(exc))
        errors: list[ConfigurationError] = []
        with self._mu:
            for i, st in hellos.items():
                err = self._core.identify(i, st)
                if err is not None:
                    errors.append(err)
        return errors

    def _subscribe(self, i: int, inst: Instance) -> None:
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

    def _loop(self) -> None:
        next_resub = 0.0
        while not self._closed:
            now = time.monotonic()
            with self._mu:
                wakes = [lk.wake_at for lk in self._core.locks.values()
                         if lk.phase is Phase.ACQUIRING]
            deadline = min([self._next_renew, *[w for w in wakes if w is not None]])
            timeout = max(0.0, min(deadline - now, 0.5))
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
            now = time.monotonic()
            if now >= next_resub:
                next_resub = now + 1.0
                for err in self._first_contact([i for i in range(self._core.n)  # reached at last
                                                 if self._core.run_ids[i] is None]):
                    log.error("instance refused, its votes never count: %s", err)
                for i, inst in enumerate(self._instances):
                    if inst.pubsub is None and i not in self._core.refused:
                        self._subscribe(i, inst)
            if now >= self._next_renew:
                with self._mu:
                    self._next_renew = now + self._core.renew_interval()
                self._renew()
            with self._mu:
                self._check_lost()  # also when every instance stalls and no reply comes
            self._recheck(time.monotonic())

    def _drain(self, i: int) -> None:
        inst = self._instances[i]
        ps = inst.pubsub
        if ps is None:
            return
        try:
            while True:
                msg = ps.get_message(timeout=0.0)
                if msg is None:
                    break
                if msg.get("type") == "message":
                    self._on_event(i, codec.parse_event(msg["data"]))
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

    def _on_event(self, i: int, ev: codec.Event) -> None:
        with self._mu:
            notes = self._core.on_event(i, ev, time.monotonic())
            lk = self._core.locks.get(ev.lock_id)
            yields = []
            for kind, lock, arg in notes:
                if kind == "blocking":
                    user: Lock = lock.user
                    if user._on_blocking is not None:
                        self._callback(user._on_blocking, arg)
                elif kind == "yield":
                    yields.append((arg, self._core.yield_cmd_for(lock, arg)))
            if lk is not None:
                if lk.phase is Phase.ACQUIRING:
                    self._advance(lk)
                elif lk.phase is Phase.CONVERTING:
                    self._cond.notify_all()
                elif lk.phase is Phase.HELD and ev.kind == "C":
                    self._check_lost()
        if yields and lk is not None:
            self._spawn(self._send_and_feed_advance, lk, yields)

    def _renew(self) -> None:
        """Start this tick's renewal of every instance whose previous renewal is done; each
        instance on its own thread, so one stalled instance delays nobody else's leases."""
        with self._mu:
            idle = [i for i in range(self._core.n) if i not in self._renewing]
            now = time.monotonic()
            batches = self._core.renew_cmds(now, idle)
            busy = sorted({i for i, _, _ in batches}  # (and rejoins owed: R2)
                          | {i for i in idle if self._core.repairs_due(i, now)})
            self._renewing.update(busy)
        for i in busy:
            self._spawn(self._renew_instance, i, [b for b in batches if b[0] == i])

    def _renew_instance(self, i: int, batches: list[tuple[int, Call, list[LockCore]]]) -> None:
        repairs: list[tuple[LockCore, Call]] = []
        try:
            if batches:  # (none when the instance only owes a rejoin, R2)
                sent = time.monotonic()
                results = self._pipeline(i, [cmd for _, cmd, _ in batches])
                with self._mu:
                    now = time.monotonic()
                    for (_, _, lks), res in zip(batches, results):
                        for note in self._core.on_renew_reply(i, lks, res, sent, now):
                            log.warning("%s", note)  # as it happens: one line each
            with self._mu:
                repairs = self._core.repair_cmds(i, time.monotonic())
            if repairs:  # R1, R2: only where a renewal found something to repair
                sent = time.monotonic()
                results = self._pipeline(i, [cmd for _, cmd in repairs])
                with self._mu:
                    now = time.monotonic()
                    for (lk, _), res in zip(repairs, results):
                        self._core.on_repair_reply(lk, i, res, sent, now)
                    repairs = []
            with self._mu:
                for lk in list(self._core.locks.values()):
                    if lk.phase is Phase.ACQUIRING:
                        self._advance(lk)
                self._check_lost()
                self._cond.notify_all()
        finally:
            with self._mu:
                self._renewing.discard(i)
                for lk, _ in repairs:  # not sent (an unexpected error): not in flight
                    lk.repairing.discard(i)
                self._cond.notify_all()

    def _check_lost(self) -> None:
        for lk in self._core.check_held(time.monotonic()):
            user: Lock = lk.user
            log.warning("lock %s on %s lost: %s", lk.id, user.resource, lk.lost_reason)
            if user._on_lost is not None:
                self._callback(user._on_lost, user)

    def _recheck(self, now: float) -> None:
        todo = []
        with self._mu:
            for lk in list(self._core.locks.values()):
                wake = lk.wake_at
                if lk.phase is Phase.ACQUIRING and wake is not None and now >= wake:
                    lk.wake_at = None
                    if lk.deadline is not None and now >= lk.deadline:
                        self._advance(lk)
                        continue
                    todo.append((lk, self._core.recheck_cmds(lk, now)))
        for lk, cmds in todo:
            if cmds:
                self._spawn(self._send_and_feed_advance, lk, cmds)
            else:
                with self._mu:
                    if lk.phase is Phase.ACQUIRING:
                        self._advance(lk)

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

    def _release(self, lk: LockCore, subtree: bool = False) -> None:
        with self._mu:
            while lk.repairing:  # R1, R2: the repair lands first, never after the release
                self._cond.wait(0.5)
            if lk.phase is Phase.RELEASED:
                return
            if lk.children and not subtree:
                live = [c for c in lk.children if c.phase is not Phase.RELEASED]
                if live:
                    from .errors import HasChildren
                    raise HasChildren("release the child locks first, or ask subtree=True",
                                      lock_id=lk.id)
            cmds = [(i, self._core.release_cmd(lk, subtree=subtree, i=i))
                    for i in range(self._core.n)]
            before = lk.phase
            lk.phase = Phase.RELEASED  # renewals in flight must not report it lost
        # R4: done once a quorum released it; a stalled instance gets it when it wakes (or
        # the lock expires there by its lease)
        results = self._broadcast(cmds, enough=self._core.quorum)
        with self._mu:
            errors = [r for r in results.values() if isinstance(r, DLMError)
                      and not isinstance(r, QuorumUnavailable)]
            if errors and len(errors) == len(results):
                lk.phase = before
                raise errors[0]  # refused everywhere (e.g. HasChildren): nothing changed
            for r in errors:
                log.warning("release of %s: %s", lk.id, r)
            for d in [lk, *descendants(lk)]:
                d.phase = Phase.RELEASED
                self._core.forget(d)
            failed = sum(1 for r in results.values() if isinstance(r, BaseException))
            if failed:
                log.info("release of %s reached %d of %d instances; the rest expire by lease",
                         lk.id, self._core.n - failed, self._core.n)

    def _convert(self, lk: LockCore, mode: object, timeout: float | None,
                 **flags: Any) -> None:
        t = check_timeout(timeout)
        with self._mu:
            while lk.repairing:  # R1, R2: a repair lands before the conversion is sent
                self._cond.wait(0.5)
            old = lk.mode
            m, fl, down = self._core.start_convert(lk, mode, **flags)
            lk.deadline = None if t is None else time.monotonic() + t
            value, version = self._core.convert_value(lk, down)
            cmds = [(i, self._core.convert_cmd(lk, m, fl, value, version, i))
                    for i in range(self._core.n)]
            lk.pending = set(range(self._core.n))
            cticket = lk.cticket
        try:
            self._converting(lk, old, cmds, cticket)
        except DLMError:
            raise
        except BaseException:  # interrupted (KeyboardInterrupt...): nothing half-done
            self._finish_off(self._abandon_convert, lk, old, down, cmds)
            raise

    def _abandon_convert(self, lk: LockCore, old: Mode, down: bool,
                         sent: list[tuple[int, Call]]) -> None:
        """The caller gave up on the conversion (interrupted): complete a down-conversion,
        withdraw any other so that the lock holds its old mode on every instance
        (`Session.abandon_convert_cmds`)."""
        with self._mu:
            cmds = self._core.abandon_convert_cmds(lk, old, down, sent)
        if down:
            self._send_and_feed(lk, cmds, lk.cticket)
            with self._mu:
                now = time.monotonic()
                if self._core.evaluate_convert(lk, old, now).done:
                    return
                out = self._core.evaluate_convert(lk, old, now, timed_out=True)
            results = self._broadcast(out.cleanup)
            with self._mu:
                self._core.rollback_convert(lk, old, results)
            return
        while cmds:
            sent_at = time.monotonic()
            results = self._broadcast(cmds)
            with self._mu:
                for i, res in results.items():
                    self._core.on_abandon_reply(lk, i, res, sent_at, time.monotonic())
                cmds = self._core.abandon_convert_cmds(lk, old, down, sent, first=False)
        with self._mu:
            self._core.end_abandon(lk, old)
            self._cond.notify_all()

    def _converting(self, lk: LockCore, old: Mode, cmds: list[tuple[int, Call]],
                    cticket: int) -> None:
        """Send the conversion (of ticket `cticket`) and wait for its outcome; on failure
        put the old mode back and raise."""
        self._send_and_feed(lk, cmds, cticket)
        with self._mu:
            while True:
                now = time.monotonic()
                out = self._core.evaluate_convert(lk, old, now)
                if out.done:
                    return
                if out.error is not None:
                    break
                if out.actions:
                    self._mu.release()
                    try:
                        self._send_and_feed(lk, out.actions, cticket)
                    finally:
                        self._mu.acquire()
                    continue
                wait = (out.wake_at or now + 0.5) - now
                if lk.deadline is not None:
                    wait = min(wait, lk.deadline - now)
                if wait > 0 and self._cond.wait(wait):
                    continue  # a reply, event or renewal changed something: evaluate
                # The re-check time (wake_at is relative to `now`, so it never comes by
                # re-evaluating) or the deadline: re-ask the instances, as `_recheck` does
                # for new requests.
                now = time.monotonic()
                out = self._core.evaluate_convert(lk, old, now, timed_out=(
                    lk.deadline is not None and now >= lk.deadline))
                if out.error is not None:
                    break
                recheck = self._core.recheck_cmds(lk, now)
                if recheck:
                    self._mu.release()
                    try:
                        self._send_and_feed(lk, recheck, cticket)
                    finally:
                        self._mu.acquire()
        results = self._broadcast(out.cleanup)
        with self._mu:
            self._core.rollback_convert(lk, old, results)
        raise out.error


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
            self._box.append(exc)
        else:
            self._box.append(dlm._finish(i, conn, [call])[0])
        os.write(self._wfd, b"x")

    def result(self) -> Any:
        os.close(self.fd)
        os.close(self._wfd)
        return self._box[0]


class Request:
    """An asynchronous lock request (`DLM.enqueue`)."""

    def __init__(self, dlm: DLM, lock: Lock, on_granted: Callable[[Lock], Any] | None) -> None:
        self._dlm = dlm
        self.lock = lock
        self._on_granted = on_granted
        self._done = threading.Event()
        self._error: DLMError | None = None

    def _finish(self, error: DLMError | None) -> None:
        if self._done.is_set():
            return
        self._error = error
        self._done.set()
        if error is None and self._on_granted is not None:
            self._dlm._callback(self._on_granted, self.lock)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Lock:
        """Block until granted (return the Lock) or failed (raise its error). A `timeout`
        here only bounds this wait; the request itself keeps its own timeout. Interrupted
        (KeyboardInterrupt, or anything a signal handler raises), the request is withdrawn
        as by `cancel()` (released if granted meanwhile) before the exception propagates."""
        try:
            done = self._done.wait(timeout)
        except BaseException:
            self._dlm._finish_off(self.cancel)
            raise
        if not done:
            from .errors import LockTimeout
            raise LockTimeout("still waiting", resource=self.lock.resource,
                              lock_id=self.lock.id)
        if self._error is not None:
            raise self._error
        return self.lock

    def cancel(self) -> None:
        """Withdraw the request on every instance (or release it if it was granted)."""
        lk = self.lock._core
        with self._dlm._mu:
            if lk.phase is Phase.RELEASED or lk.phase is Phase.FAILED:
                return
            was_held = lk.phase is Phase.HELD
            lk.phase = Phase.FAILED
            from .errors import LockTimeout
            self._finish(LockTimeout("cancelled", resource=self.lock.resource, lock_id=lk.id))
            while lk.sends:  # a re-check in flight lands before the release, never after
                self._dlm._cond.wait(0.5)
            if was_held:
                lk.phase = Phase.HELD
        self._dlm._release(lk)


class Lock(LockBase):
    """A lock held (or being acquired) on a quorum of instances (see `LockBase` for what
    it shows)."""

    def _guard(self) -> threading.RLock:
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
        On failure (NotQueued, Deadlock, LockTimeout) the lock keeps its old mode.
        `priority` (as for `DLM.lock`) is this conversion's, should it wait on a deadlock.
        Interrupted (KeyboardInterrupt...) before it returns, a conversion that may wait
        (up or sideways) is withdrawn on every instance and the lock keeps its old mode; a
        down-conversion, which never waits (G4) and may already have let other locks in
        beside its new mode, is completed; `mode` tells which. The exception propagates
        once every instance agrees (bounded by the socket timeouts)."""
        self._dlm._convert(self._core, mode, timeout, noqueue=noqueue, quecvt=quecvt,
                           convdeadlk=convdeadlk, no_deadlock_wait=no_deadlock_wait,
                           priority=priority)

    def release(self, *, subtree: bool = False) -> None:
        """Release on every instance (writing the value block if set by a PW/EX holder)."""
        self._dlm._release(self._core, subtree=subtree)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        lost = self._lost_before_exit()
        self.release(subtree=True)
        self._raise_lost(lost, exc_type)


def _socketpair():
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b
