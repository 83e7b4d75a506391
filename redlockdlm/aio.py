"""The asyncio client: `AsyncDLM`, `AsyncLock` and `AsyncRequest`.

The same features as the sync client, with every decision taken by the same
`redlockdlm.protocol.Session`; this module only moves bytes with `redis.asyncio`: one
command written to every instance before any reply is read, a task per instance reading
pub/sub events, a renewal task, and awaitables for completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .client import (
    RESEND,
    _mask,
    check_timeouts,
    open_session,
    pool_from_url,
    settle,
)
from .engine import codec
from .engine.modes import Mode
from .engine.scripts import command, fallback, load_command, packed_command
from .errors import (
    DLMError,
    HasChildren,
    InvalidType,
    LockTimeout,
    ProtocolError,
    QuorumUnavailable,
)
from .handle import LockBase, lock_name
from .protocol import (
    Call,
    LockCore,
    Phase,
    check_callback,
    check_timeout,
    descendants,
    describe,
)

log = logging.getLogger("redlockdlm")

#: An instance that fails these ways counts as unreachable (InvalidResponse: it is not Redis)
_NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError,
               InvalidResponse)


async def _send(conn: Any, packed: bytes) -> None:
    """Write one packed command (`scripts.packed_command`). On a connected connection
    whose socket takes the bytes at once (a lock command always fits), write them straight
    to its stream: redis-py's `send_packed_command` wraps every write in `asyncio.wait_for`,
    a task per command. Otherwise (not connected yet, or a full socket buffer) redis-py
    connects, writes and drains within its `socket_timeout`. A write that fails shows as
    an error on the read that follows, which disconnects."""
    writer = getattr(conn, "_writer", None)  # redis-py's asyncio StreamWriter, if connected
    if writer is None or writer.is_closing():
        await conn.send_packed_command(packed, check_health=False)
        return
    writer.write(packed)
    if writer.transport.get_write_buffer_size():
        await conn.send_packed_command(b"", check_health=False)  # drain, with the timeout


class _Instance:
    def __init__(self, url: str, *, socket_timeout: float, connect_timeout: float,
                 **options: Any) -> None:
        check_timeouts(socket_timeout=socket_timeout, connect_timeout=connect_timeout)
        self.pool = pool_from_url(aredis.ConnectionPool, url, socket_timeout=socket_timeout,
                                  socket_connect_timeout=connect_timeout, **options)
        self.url = _mask(url)
        self.client = aredis.Redis(connection_pool=self.pool)
        self.timeout = socket_timeout
        self._idle: list[Any] = []

    def get(self) -> Any:
        """A connection of our own (no pool bookkeeping on the hot path); it connects on
        its first command."""
        try:
            return self._idle.pop()
        except IndexError:
            return self.pool.make_connection()

    def put(self, conn: Any) -> None:
        self._idle.append(conn)

    async def close(self) -> None:
        while self._idle:
            with contextlib.suppress(Exception):
                await self._idle.pop().disconnect()
        with contextlib.suppress(Exception):
            await self.pool.disconnect()


class AsyncDLM:
    """The asyncio twin of `redlockdlm.DLM`. Create it inside a running loop, use it as
    ``async with AsyncDLM(urls) as dlm:``; `close()` releases everything it holds."""

    def __init__(self, urls: Sequence[str] | str, namespace: str = "default", *,
                 lease_ms: int = 10_000, socket_timeout: float = 1.0,
                 connect_timeout: float = 1.0, rejoin_ms: int | None = None, vbmax: int = 64,
                 owner: str | None = None, **redis_options: Any) -> None:
        self._core, self._instances = open_session(
            _Instance, urls, namespace, lease_ms=lease_ms, socket_timeout=socket_timeout,
            connect_timeout=connect_timeout, rejoin_ms=rejoin_ms, vbmax=vbmax, owner=owner,
            redis_options=redis_options)
        self._closed = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False
        self._changed: dict[str, asyncio.Event] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._renewing: set[int] = set()  # instances whose renewal is in flight
        self._renew_soon = asyncio.Event()  # a lock with a shorter lease appeared

    # ----------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        for i in range(len(self._instances)):
            self._tasks.append(asyncio.create_task(self._events(i)))
        self._tasks.append(asyncio.create_task(self._renewer()))

    async def __aenter__(self) -> AsyncDLM:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release every lock this client holds or waits for, then close connections."""
        if self._closed:
            return
        roots = [lk for lk in self._core.locks.values() if lk.parent is None]
        pending = [lk.request for lk in self._core.locks.values()  # type: ignore[attr-defined]
                   if getattr(lk, "request", None) is not None and not lk.request.done]
        for req in pending:  # a request still waiting must not wait forever
            req._finish(DLMError("this AsyncDLM client was closed",
                                 resource=req.lock.resource, lock_id=req.lock.id))
            if req._task is not None:
                req._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await req._task
        for lk in roots:
            try:
                await self._release(lk, subtree=True)
            except DLMError as exc:
                log.warning("close: release of %s failed: %s", lk.id, exc)
        self._closed = True
        for t in self._tasks + list(self._background):
            t.cancel()
        for t in self._tasks + list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for inst in self._instances:
            await inst.close()

    @property
    def owner(self) -> str:
        return self._core.owner

    @property
    def quorum(self) -> int:
        return self._core.quorum

    # ----------------------------------------------------------------- public API

    async def lock(self, resource: str | bytes, mode: object = Mode.EX, *,
                   timeout: float | None = None, noqueue: bool = False,
                   expedite: bool = False, no_deadlock_wait: bool = False,
                   value_block: bool = True,
                   on_blocking: Callable[[Mode], Any] | None = None,
                   on_lost: Callable[[AsyncLock], Any] | None = None,
                   lease_ms: int | None = None, parent: AsyncLock | None = None,
                   priority: int = 0) -> AsyncLock:
        """Wait until `resource` is granted in `mode` on a quorum; same errors and
        `priority` (the deadlock detector's choice of a victim) as DLM.lock."""
        req = await self.enqueue(resource, mode, timeout=timeout, noqueue=noqueue,
                                 expedite=expedite, no_deadlock_wait=no_deadlock_wait,
                                 value_block=value_block, on_blocking=on_blocking,
                                 on_lost=on_lost, lease_ms=lease_ms, parent=parent,
                                 priority=priority)
        return await req.wait()

    async def enqueue(self, resource: str | bytes, mode: object = Mode.EX, *,
                      timeout: float | None = None, noqueue: bool = False,
                      expedite: bool = False, no_deadlock_wait: bool = False,
                      value_block: bool = True,
                      on_granted: Callable[[AsyncLock], Any] | None = None,
                      on_blocking: Callable[[Mode], Any] | None = None,
                      on_lost: Callable[[AsyncLock], Any] | None = None,
                      lease_ms: int | None = None,
                      parent: AsyncLock | None = None, priority: int = 0) -> AsyncRequest:
        """Send the request to every instance; the returned AsyncRequest is awaitable.
        `priority`: as for DLM.lock."""
        if self._closed:
            raise DLMError("this AsyncDLM client is closed")
        self._start()
        t = check_timeout(timeout)
        for what, fn in (("on_granted", on_granted), ("on_blocking", on_blocking),
                         ("on_lost", on_lost)):
            check_callback(what, fn)
        if parent is not None and not isinstance(parent, AsyncLock):
            raise InvalidType("parent must be an AsyncLock")
        lk = self._core.new_lock(resource, mode, parent=parent._core if parent else None,
                                 noqueue=noqueue, expedite=expedite,
                                 no_deadlock_wait=no_deadlock_wait, lease_ms=lease_ms,
                                 priority=priority)
        if t is not None:
            lk.deadline = time.monotonic() + t
        if lk.lease_ms < self._core.lease_ms:
            self._renew_soon.set()  # the renewer shortens its tick
        lock = AsyncLock(self, lk, on_blocking, on_lost, value_block)
        lk.user = lock  # type: ignore[attr-defined]
        self._changed[lk.id] = asyncio.Event()
        cmds = [(i, self._core.request_cmd(lk)) for i in range(self._core.n)]
        lk.pending = set(range(self._core.n))
        sent = time.monotonic()
        for v in lk.votes:
            v.sent_at = sent
        try:
            results = await self._broadcast(cmds)
            for i, res in results.items():
                self._core.on_reply(lk, i, res, sent, time.monotonic())
        except BaseException:
            self._forget(lk)
            raise
        fut: asyncio.Future[AsyncLock] = asyncio.get_running_loop().create_future()
        req = AsyncRequest(self, lock, fut, on_granted)
        lk.request = req  # type: ignore[attr-defined]
        task = asyncio.create_task(self._acquire(lk, req))
        req._task = task
        return req

    # ----------------------------------------------------------------- I/O

    async def _broadcast(self, cmds: Iterable[tuple[int, Call]]) -> dict[int, Any]:
        """Write every command, then read every reply (one round trip for all). Replies are
        read one after another within one deadline (`socket_timeout` + 0.5 s from the
        first read): every request is already on its way, so this costs no round trip,
        and it needs no task per instance."""
        results: dict[int, Any] = {}
        conns: list[tuple[int, Call, Any]] = []
        for i, call in cmds:
            conn = self._instances[i].get()
            try:
                await _send(conn, packed_command(*call))
                conns.append((i, call, conn))
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
                await conn.disconnect()
                self._instances[i].put(conn)
                results[i] = exc
        if not conns:
            return results
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(inst.timeout for inst in self._instances) + 0.5
        unread = conns[::-1]
        try:
            while unread:
                i, call, conn = unread.pop()
                left = max(0.001, min(self._instances[i].timeout, deadline - loop.time()))
                results[i] = (await self._finish(i, conn, [call], left))[0]
        finally:  # cancelled: replies nobody will read must not reach the next command
            for i, _, conn in unread:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                self._instances[i].put(conn)
        return results

    async def _pipeline(self, i: int, calls: Sequence[Call]) -> list[Any]:
        """Send every call to instance `i` in one write and read their replies: one round
        trip however many calls (`DLM._pipeline`, with the same results)."""
        conn = self._instances[i].get()
        try:
            await self._write(conn, [packed_command(*c) for c in calls])
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
            await conn.disconnect()
            self._instances[i].put(conn)
            return [exc] * len(calls)
        return await self._finish(i, conn, calls)

    async def _finish(self, i: int, conn: Any, calls: Sequence[Call],
                      first_timeout: float | None = None) -> list[Any]:
        """`DLM._finish`: read, settle, resend after loading a missing library, give the
        connection back. `first_timeout` bounds the wait for the first reply."""
        inst = self._instances[i]
        try:
            raws = await self._replies(conn, len(calls), first_timeout, inst.url)
            out = [settle(c, r, inst.url) for c, r in zip(calls, raws)]
            again = [k for k, r in enumerate(out) if r is RESEND]
            if again:
                try:
                    await conn.send_command(*load_command())
                    await conn.read_response()
                    cmds = [command(*calls[k]) for k in again]
                except ResponseError:  # FUNCTION LOAD refused (ACL): the EVAL form
                    cmds = [fallback(*calls[k]) for k in again]
                await self._write(conn, conn.pack_commands(cmds))
                for k, raw in zip(again, await self._replies(conn, len(again))):
                    res = settle(calls[k], raw, inst.url)
                    out[k] = ProtocolError("script missing after a load",
                                           instance=inst.url) if res is RESEND else res
            return out
        except Exception as exc:  # noqa: BLE001 - unreachable, timed out, not Redis...
            await conn.disconnect()
            return [exc] * len(calls)
        except BaseException:  # cancelled: replies nobody will read
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        finally:
            inst.put(conn)

    @staticmethod
    async def _write(conn: Any, chunks: Sequence[bytes]) -> None:
        """One write of packed commands (the one place a pipelined round trip starts)."""
        await conn.send_packed_command(chunks, check_health=False)

    @staticmethod
    async def _replies(conn: Any, n: int, first_timeout: float | None = None,
                       url: str = "") -> list[Any]:
        """The next `n` replies on `conn`, an error reply as its ResponseError; a network
        error or timeout propagates (the connection is then unusable)."""
        raws: list[Any] = []
        for k in range(n):
            try:
                if k == 0 and first_timeout is not None:
                    raw = await conn.read_response(timeout=first_timeout)
                    if raw is None:  # redis-py's answer to a read given its own timeout
                        raise RedisTimeoutError(f"Timeout reading from {url}")
                else:
                    raw = await conn.read_response()
                raws.append(raw)
            except ResponseError as exc:
                raws.append(exc)
        return raws

    async def _send_and_feed(self, lk: LockCore, cmds: list[tuple[int, Call]]) -> None:
        if not cmds:
            return
        sent = time.monotonic()
        results = await self._broadcast(cmds)
        for i, res in results.items():
            try:
                self._core.on_reply(lk, i, res, sent, time.monotonic())
            except DLMError as exc:
                log.warning("unexpected error from %s: %s", self._instances[i].url, exc)
        self._notify(lk)

    def _notify(self, lk: LockCore) -> None:
        ev = self._changed.get(lk.id)
        if ev is not None:
            ev.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _forget(self, lk: LockCore) -> None:
        self._core.forget(lk)
        self._changed.pop(lk.id, None)

    async def _wait_change(self, lk: LockCore, until: float | None) -> bool:
        ev = self._changed.get(lk.id)
        if ev is None:
            return False
        timeout = None if until is None else max(0.0, until - time.monotonic())
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            ev.clear()
            return True
        except asyncio.TimeoutError:
            return False

    # ----------------------------------------------------------------- acquisition

    async def _acquire(self, lk: LockCore, req: AsyncRequest) -> None:
        try:
            while True:
                out = self._core.evaluate_acquire(lk, time.monotonic())
                if out.done:
                    req._finish(None)
                    return
                if out.error is not None:
                    self._forget(lk)
                    try:  # nothing left behind once the caller sees the error
                        await self._broadcast(out.cleanup)
                    finally:
                        req._finish(out.error)
                    return
                if out.actions:
                    await self._send_and_feed(lk, out.actions)
                    continue
                if not await self._wait_change(lk, out.wake_at):
                    now = time.monotonic()
                    if lk.deadline is not None and now >= lk.deadline:
                        continue
                    await self._send_and_feed(lk, self._core.recheck_cmds(lk, now))
        except asyncio.CancelledError:
            if not req.done:
                req._finish(LockTimeout("cancelled", resource=lock_name(lk), lock_id=lk.id))
            raise

    # ----------------------------------------------------------------- background

    async def _events(self, i: int) -> None:
        inst = self._instances[i]
        warned = False
        while not self._closed:
            ps = inst.client.pubsub(ignore_subscribe_messages=True)
            try:
                await ps.subscribe(self._core.channel)
                while not self._closed:
                    # A long wait: a poll every second cost 1,000 idle sessions 40 % of a
                    # core in timers; close() cancels this task and a broken connection
                    # raises. Not timeout=None, which redis-py before 8 bounds by
                    # socket_timeout and reports as an error.
                    msg = await ps.get_message(timeout=30.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    self._on_event(i, codec.parse_event(msg["data"]))
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await ps.aclose()
                raise
            except Exception as exc:  # noqa: BLE001 - not Redis, refused by the ACL...
                loud = not isinstance(exc, (*_NET_ERRORS, ValueError, DLMError)) and not warned
                warned = warned or loud  # once: retried every half second
                log.log(logging.WARNING if loud else logging.INFO,
                        "instance %s: no event subscription: %s", inst.url, describe(exc))
                with contextlib.suppress(Exception):
                    await ps.aclose()
                await asyncio.sleep(0.5)

    def _on_event(self, i: int, ev: codec.Event) -> None:
        notes = self._core.on_event(i, ev, time.monotonic())
        lk = self._core.locks.get(ev.lock_id)
        for kind, lock, arg in notes:
            if kind == "blocking":
                user: AsyncLock = lock.user  # type: ignore[attr-defined]
                if user._on_blocking is not None:
                    self._run_callback(user._on_blocking, arg)
            elif kind == "yield":
                self._spawn(self._send_and_feed(lock, [(arg, self._core.yield_cmd_for(lock,
                                                                                       arg))]))
        if lk is not None:
            self._notify(lk)
            if lk.phase is Phase.HELD and ev.kind == "C":
                self._check_lost()

    def _run_callback(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            res = fn(*args)
            if asyncio.iscoroutine(res):
                self._spawn(res)
        except Exception:  # noqa: BLE001 - a user callback must not kill the client
            log.exception("callback %r raised", fn)

    async def _renewer(self) -> None:
        """Every renewal interval (a third of the shortest lease in use), renew each
        instance in its own task, so one stalled instance delays nobody else's leases;
        ticks are counted from their start, not from the end of the previous one."""
        next_tick = time.monotonic()
        while not self._closed:
            next_tick += self._core.renew_interval()
            while True:
                left = next_tick - time.monotonic()
                if left <= 0:
                    break
                self._renew_soon.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._renew_soon.wait(), left)
                next_tick = min(next_tick, time.monotonic() + self._core.renew_interval())
            idle = [i for i in range(self._core.n) if i not in self._renewing]
            now = time.monotonic()
            batches = self._core.renew_cmds(now, idle)
            for i in sorted({b[0] for b in batches}  # (and rejoins owed: R2)
                            | {i for i in idle if self._core.repairs_due(i, now)}):
                self._renewing.add(i)
                self._spawn(self._renew_instance(i, [b for b in batches if b[0] == i]))
            self._check_lost()  # also when every instance stalls and no reply comes

    async def _renew_instance(self, i: int,
                              batches: list[tuple[int, Call, list[LockCore]]]) -> None:
        repairs: list[tuple[LockCore, Call]] = []
        try:
            if batches:  # (none when the instance only owes a rejoin, R2)
                sent = time.monotonic()
                results = await self._pipeline(i, [cmd for _, cmd, _ in batches])
                now = time.monotonic()
                for (_, _, lks), res in zip(batches, results):
                    for note in self._core.on_renew_reply(i, lks, res, sent, now):
                        log.warning("%s", note)  # as it happens: one line each
            repairs = self._core.repair_cmds(i, time.monotonic())
            if repairs:  # R1, R2: only where a renewal found something to repair
                sent = time.monotonic()
                results = await self._pipeline(i, [cmd for _, cmd in repairs])
                now = time.monotonic()
                for (lk, _), res in zip(repairs, results):
                    self._core.on_repair_reply(lk, i, res, sent, now)
                repairs = []
            for lk in list(self._core.locks.values()):
                self._notify(lk)
            self._check_lost()
        finally:
            self._renewing.discard(i)
            for lk, _ in repairs:  # not sent (cancelled): not in flight
                lk.repairing.discard(i)
                self._notify(lk)

    def _check_lost(self) -> None:
        for lk in self._core.check_held(time.monotonic()):
            user: AsyncLock = lk.user  # type: ignore[attr-defined]
            log.warning("lock %s on %s lost: %s", lk.id, user.resource, lk.lost_reason)
            if user._on_lost is not None:
                self._run_callback(user._on_lost, user)

    # ----------------------------------------------------------------- release / convert

    async def _after_repairs(self, lk: LockCore) -> None:
        """Wait until no repair of `lk` is in flight (R1, R2; `_renew_instance` notifies
        when its repairs are done or dropped): woken by that notification, not a poll."""
        if not lk.repairing:
            return
        own = lk.id not in self._changed  # a held lock has no change event of its own
        if own:
            self._changed[lk.id] = asyncio.Event()
        try:
            while lk.repairing:
                await self._wait_change(lk, time.monotonic() + 0.5)
        finally:
            if own:
                self._changed.pop(lk.id, None)

    async def _release(self, lk: LockCore, subtree: bool = False) -> None:
        await self._after_repairs(lk)  # R1, R2: the repair lands first, not after this
        if lk.phase is Phase.RELEASED:
            return
        if not subtree and any(c.phase is not Phase.RELEASED for c in lk.children):
            raise HasChildren("release the child locks first, or ask subtree=True",
                              lock_id=lk.id)
        cmds = [(i, self._core.release_cmd(lk, subtree=subtree, i=i))
                    for i in range(self._core.n)]
        before = lk.phase
        lk.phase = Phase.RELEASED  # renewals in flight must not report it lost
        results = await self._broadcast(cmds)
        errors = [r for r in results.values()
                  if isinstance(r, DLMError) and not isinstance(r, QuorumUnavailable)]
        if errors and len(errors) == len(results):
            lk.phase = before
            raise errors[0]  # refused everywhere (e.g. HasChildren): nothing changed
        for r in errors:
            log.warning("release of %s: %s", lk.id, r)
        for d in [lk, *descendants(lk)]:
            d.phase = Phase.RELEASED
            self._forget(d)

    async def _convert(self, lk: LockCore, mode: object, timeout: float | None,
                       **flags: Any) -> None:
        t = check_timeout(timeout)
        await self._after_repairs(lk)  # R1, R2: the repair lands first, not after this
        old = lk.mode
        m, fl, down = self._core.start_convert(lk, mode, **flags)
        lk.deadline = None if t is None else time.monotonic() + t
        value, version = self._core.convert_value(lk, down)
        cmds = [(i, self._core.convert_cmd(lk, m, fl, value, version, i))
                for i in range(self._core.n)]
        lk.pending = set(range(self._core.n))
        await self._send_and_feed(lk, cmds)
        while True:
            now = time.monotonic()
            out = self._core.evaluate_convert(lk, old, now)
            if out.done:
                return
            if out.error is not None:
                break
            if out.actions:
                await self._send_and_feed(lk, out.actions)
                continue
            until = out.wake_at
            if lk.deadline is not None:
                until = lk.deadline if until is None else min(until, lk.deadline)
            if not await self._wait_change(lk, until):
                now = time.monotonic()
                out = self._core.evaluate_convert(
                    lk, old, now, timed_out=lk.deadline is not None and now >= lk.deadline)
                if out.error is not None:
                    break
                await self._send_and_feed(lk, self._core.recheck_cmds(lk, now))
        results = await self._broadcast(out.cleanup)
        self._core.rollback_convert(lk, old, results)
        raise out.error


class AsyncRequest:
    """An asynchronous lock request: `await req` or `await req.wait(timeout)`."""

    def __init__(self, dlm: AsyncDLM, lock: AsyncLock, fut: asyncio.Future[AsyncLock],
                 on_granted: Callable[[AsyncLock], Any] | None) -> None:
        self._dlm = dlm
        self.lock = lock
        self._fut = fut
        self._on_granted = on_granted
        self._task: asyncio.Task[Any] | None = None

    def _finish(self, error: DLMError | None) -> None:
        if self._fut.done():
            return
        if error is None:
            self._fut.set_result(self.lock)
            if self._on_granted is not None:
                self._dlm._run_callback(self._on_granted, self.lock)
        else:
            self._fut.set_exception(error)
            self._fut.exception()  # retrieved here: nobody may await a closed client's request

    @property
    def done(self) -> bool:
        return self._fut.done()

    async def wait(self, timeout: float | None = None) -> AsyncLock:
        """Wait until granted (the lock) or failed (its error). `timeout` bounds only this
        wait; the request keeps its own timeout."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._fut), timeout)
        except asyncio.TimeoutError:
            raise LockTimeout("still waiting", resource=self.lock.resource,
                              lock_id=self.lock.id) from None

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.wait().__await__()

    async def cancel(self) -> None:
        """Withdraw the request everywhere (or release the lock if it was granted)."""
        lk = self.lock._core
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._finish(LockTimeout("cancelled", resource=self.lock.resource, lock_id=lk.id))
        if lk.phase is not Phase.RELEASED:
            await self._dlm._release(lk)


class AsyncLock(LockBase):
    """A lock held on a quorum of instances, asyncio flavour (see `LockBase`)."""

    async def lock(self, resource: str | bytes, mode: object = Mode.EX, **kw: Any) -> AsyncLock:
        """Lock a child resource of this one (names are scoped by this lock's resource)."""
        return await self._dlm.lock(resource, mode, parent=self, **kw)

    async def enqueue(self, resource: str | bytes, mode: object = Mode.EX,
                      **kw: Any) -> AsyncRequest:
        return await self._dlm.enqueue(resource, mode, parent=self, **kw)

    async def convert(self, mode: object, *, timeout: float | None = None,
                      noqueue: bool = False, quecvt: bool = False, convdeadlk: bool = False,
                      no_deadlock_wait: bool = False, priority: int = 0) -> None:
        """Change the mode; on failure the lock keeps its old mode (as `Lock.convert`,
        `priority` included)."""
        await self._dlm._convert(self._core, mode, timeout, noqueue=noqueue, quecvt=quecvt,
                                 convdeadlk=convdeadlk, no_deadlock_wait=no_deadlock_wait,
                                 priority=priority)

    async def release(self, *, subtree: bool = False) -> None:
        """Release on every instance (writing the value block if set by a PW/EX holder)."""
        await self._dlm._release(self._core, subtree=subtree)

    async def __aenter__(self) -> AsyncLock:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        lost = self._lost_before_exit()
        await self.release(subtree=True)
        self._raise_lost(lost, exc_type)
