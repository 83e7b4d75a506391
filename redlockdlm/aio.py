"""The asyncio client: `AsyncDLM`, `AsyncLock` and `AsyncRequest`.

Every step (an acquisition, its wait, a conversion, a release, a renewal) is a flow of
`redlockdlm.flows`, shared with the sync client; this module only performs the operations
the flows yield, with `redis.asyncio`: one command written to every instance before any
reply is read, a task per instance reading pub/sub events, a renewal task, a task per flow
that waits in the background (a queued request, a renewal), and awaitables for completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # what redis-py's hiredis reader answers when a reply is not all there yet
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH
except ImportError:  # (older redis-py: hiredis's own default)
    _NOT_ENOUGH = False

from .connection import (
    CHECK_IDLE_S,
    REFRESH_EVERY_S,
    REROUTE,
    Pooled,
    Routes,
    acluster_round,
    cluster_client,
    cluster_node_ids,
    deliver_shard_message,
    event_gaps,
    event_slot,
    event_slots,
    open_session,
    reroute,
    routed,
)
from .engine import codec
from .engine.modes import Mode
from .engine.scripts import packed_command
from .errors import DLMError, LockTimeout, NotQueued
from .flows import Broadcast, Flow, Flows, Pipeline, Shielded, Spawn, Subscribe, Wait
from .handle import LockBase, MutexBase, RequestBase, check_decorated, check_locked_args
from .protocol import Call, LockCore, describe
from .wire import Round, missing, settle

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


def _stream(conn: Any) -> asyncio.StreamReader | None:
    """The asyncio StreamReader of an open redis-py connection, if it is one whose arrival
    of data `_any_data` can wait for (asyncio's, with the attributes it uses); else None."""
    global _streams_checked
    stream = getattr(conn, "_reader", None)
    if type(stream) is not asyncio.StreamReader or getattr(conn, "_writer", None) is None:
        return None
    if not _streams_checked:  # (once: they are asyncio's, the same for every reader)
        if not all(hasattr(stream, a) for a in ("_waiter", "_buffer", "_eof", "_exception",
                                                "_maybe_resume_transport")):
            return None
        _streams_checked = True
    return stream


_streams_checked = False
try:  # what a redis-py parser with hiredis parses with
    from hiredis import Reader as _HiredisReader
except ImportError:
    _HiredisReader = None
_NOT_YET = object()  #: `_buffered_reply`: not all of the reply came yet


def _parses(conn: Any, stream: asyncio.StreamReader) -> bool:
    """True if `conn` parses with hiredis from `stream`, so that `_buffered_reply` can take
    a reply that came whole without waiting for one that did not."""
    parser = getattr(conn, "_parser", None)
    return (getattr(parser, "_stream", None) is stream
            and type(getattr(parser, "_reader", None)) is _HiredisReader)


async def _buffered_reply(conn: Any, stream: asyncio.StreamReader) -> Any:
    """The next reply on `conn` (`_parses`) if all of it has come, else `_NOT_YET` (what
    came of it stays in the parser): the data buffered in `stream` is fed to the parser,
    never waited for. An error reply is returned as its ResponseError; a closed or broken
    connection, or bytes that are not Redis, raise (as redis-py's `read_response`)."""
    raw = _take(conn._parser._reader, stream)
    if type(raw) is list:  # (the common case, a script's reply: one test)
        if raw and isinstance(raw[0], RedisConnectionError):
            raise raw[0]
        return raw
    push = getattr(conn._parser, "_hiredis_PushNotificationType", None)
    while push is not None and isinstance(raw, push):  # (RESP3 push: not the reply)
        await conn._parser.handle_push_response(raw)
        raw = _take(conn._parser._reader, stream)
    if isinstance(raw, RedisConnectionError):
        raise raw
    if isinstance(raw, list) and raw and isinstance(raw[0], RedisConnectionError):
        raise raw[0]
    return raw


def _take(reader: Any, stream: asyncio.StreamReader) -> Any:
    """`_buffered_reply`'s parsing: what `stream` holds goes to the hiredis `reader` as
    redis-py's parser would read it (`StreamReader.read` without the wait)."""
    raw = reader.gets()
    while raw is _NOT_ENOUGH:
        buf = stream._buffer  # type: ignore[attr-defined]
        if buf:
            reader.feed(buf)
            buf.clear()
            stream._maybe_resume_transport()  # type: ignore[attr-defined]
        elif stream._exception is not None:  # type: ignore[attr-defined]
            exc = stream._exception  # type: ignore[attr-defined]
            raise RedisConnectionError(f"Error while reading: {exc!r}") from exc
        elif stream._eof:  # type: ignore[attr-defined]
            raise RedisConnectionError("Connection closed by server.")
        else:
            return _NOT_YET
        raw = reader.gets()
    return raw


def _readable(stream: asyncio.StreamReader) -> bool:
    """True if a read of `stream` would not wait: data is buffered, or it met its end or
    an error (which the read then reports)."""
    return bool(stream._buffer) or stream._eof or stream._exception is not None  # type: ignore[attr-defined]


class _Wake:
    """A stand-in for the future a StreamReader keeps while a read waits for data
    (`StreamReader._waiter`): put in several readers at once, it wakes the one coroutine
    waiting in `_any_data` once `need` of them got data, their end or an error (or its
    timer fires). A reader calls only `cancelled()` and `set_result` / `set_exception`
    on it, once, and drops it."""

    __slots__ = ("fut", "need")

    def __init__(self, fut: asyncio.Future[None], need: int) -> None:
        self.fut = fut
        self.need = need

    def cancelled(self) -> bool:
        return False

    def set_result(self, _: object) -> None:
        self.need -= 1
        if self.need <= 0:
            self.fire()

    def set_exception(self, _: BaseException) -> None:
        self.set_result(None)  # the read that follows raises it

    def fire(self) -> None:
        if not self.fut.done():
            self.fut.set_result(None)


async def _any_data(streams: Sequence[asyncio.StreamReader], timeout: float,
                    need: int = 1) -> None:
    """Wait until `need` of `streams` (none `_readable` now) are `_readable`, or `timeout`
    seconds: one future and one timer, however many streams (none of which any other
    coroutine reads meanwhile)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    wake = _Wake(fut, need)
    for st in streams:
        st._waiter = wake  # type: ignore[attr-defined]
    timer = loop.call_later(timeout, wake.fire)
    try:
        await fut
    finally:
        timer.cancel()
        for st in streams:
            if st._waiter is wake:  # type: ignore[attr-defined]
                st._waiter = None  # type: ignore[attr-defined]


class _Routes(Routes):
    """`connection.Routes` for asyncio: connections of our own (redis.asyncio, with the
    member's options as redis-py's cluster client keeps them per node) to each primary of
    a cluster member, a call written on the one of its slot's primary as a standalone
    member's call is (no task, no redis-py bookkeeping per call). The slot map is the
    `redis.asyncio.RedisCluster`'s, which every call it reroutes corrects."""

    def __init__(self, rc: Any) -> None:
        super().__init__(rc)
        self._refresh_task: asyncio.Future[None] | None = None

    def get(self, node: Any) -> Any:
        """A connection of our own to `node` (idle ones checked as `_Instance.get` does);
        a new one connects on its first command."""
        idle = self._idle.get(node.name)
        while idle:
            conn, since = idle.pop()
            if time.monotonic() - since < CHECK_IDLE_S or not _Instance.stale(conn):
                return conn
            _Instance.drop(conn)
        conn = node.connection_class(**node.connection_kwargs)
        conn.dlm_node = node.name  # (where `put` brings it back)
        return conn

    def refresh(self) -> None:
        """Read the slot map again, in a task of its own (at most once per
        `REFRESH_EVERY_S`): after a primary timed out, a failover may have moved its
        slots, and nothing else would tell the map (a MOVED needs an answer)."""
        now = time.monotonic()
        if self._refreshing or now - self._refreshed < REFRESH_EVERY_S:
            return
        self._refreshing, self._refreshed = True, now

        async def run() -> None:
            try:
                await self.rc.nodes_manager.initialize()
            except Exception:  # noqa: BLE001 - the cluster unreachable: the next timeout
                pass
            finally:
                self._refreshing = False

        self._refresh_task = asyncio.ensure_future(run())

    async def aclose(self) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_task.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh_task
        for idle in self._idle.values():
            while idle:
                with contextlib.suppress(Exception):
                    await idle.pop()[0].disconnect()


#: the result of a call on a cluster primary's connection of our own that did nothing
#: there (a `REROUTE` reply; the primary's address refused): it goes again through the
#: cluster client
_REROUTED = object()


class _Instance(Pooled):
    """One Redis instance, with redis.asyncio's pool and client."""

    pool_class = aredis.ConnectionPool
    client_class = aredis.Redis

    @staticmethod
    def stale(conn: Any) -> bool:
        """`Pooled.stale` for an asyncio connection: its stream saw the end (the peer
        closed it) or holds bytes nobody asked for."""
        reader = getattr(conn, "_reader", None)  # redis-py's asyncio StreamReader
        if reader is None:
            return False
        return reader.at_eof() or bool(getattr(reader, "_buffer", b""))  # (EOF, or data)

    @staticmethod
    def drop(conn: Any) -> None:
        asyncio.ensure_future(conn.disconnect(nowait=True))

    #: a cluster member's shard subscriptions (`_Shards`)
    shards: Any = None

    async def detect(self) -> list[str] | None:
        """`Instance.detect` with redis.asyncio: a cluster member gets its
        `redis.asyncio.RedisCluster`; its node ids, or None for a standalone server."""
        try:
            slots = await self.client.execute_command("CLUSTER", "SLOTS")
        except aredis.ResponseError as exc:
            slots = exc
        ids = cluster_node_ids(slots)
        if ids is not None:
            rc = cluster_client(aredis.RedisCluster, self._how)
            try:
                await rc.initialize()
            except BaseException:
                with contextlib.suppress(Exception):
                    await rc.aclose()
                raise
            self.routes = _Routes(rc)
            self.cluster = rc
        self.detected = True
        return ids

    async def close(self) -> None:
        while self._idle:
            with contextlib.suppress(Exception):
                await self._idle.pop()[0].disconnect()
        with contextlib.suppress(Exception):
            await self.pool.disconnect()
        if self.routes is not None:
            await self.routes.aclose()
        if self.shards is not None:
            with contextlib.suppress(Exception):
                await self.shards.ps.aclose()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                await self.cluster.aclose()


#: shard channels (hash slots) a cluster member keeps subscribed when no lock reads them
MAX_SLOT_SUBS = 1024
#: the longest the reader of a cluster member's events waits on its shards' sockets
#: before it reads them anyway (s): a broken connection shows at once (its end, an error)
IDLE_READ_S = 30.0
#: how long it waits per read when a shard's connection is not open (being reconnected by
#: redis-py), or not one whose arrival of data it can wait for (s)
SHARD_READ_S = 0.05
#: the longest wait for a subscription's confirmation before the call goes without it (s)
SUBSCRIBE_WAIT_S = 0.5


class _Shards:
    """`client._Shards` for asyncio: this owner's shard channel for each hash slot where a
    lock of the client read events on a cluster member (N4: an `on_blocking` lock, a lock
    that waited; redis-py's cluster pub/sub: SSUBSCRIBE on the slot's primary, a reconnect
    and a slot's move to a new primary followed there). A slot stays subscribed up to
    `MAX_SLOT_SUBS` slots: beyond that, the slots of no lock that reads events now are
    unsubscribed. The subscriber (a flow's task) and the reader (`AsyncDLM._events`) take
    `lock` in turn. The reader waits, holding it, until one of the shards' sockets has
    data (its end, an error) or a subscriber `poke`s it: an idle client does not wake,
    however many members and slots; a subscriber waits for its turn no longer than the
    reader takes to let go."""

    def __init__(self, rc: Any, timeout: float) -> None:
        self.rc = rc
        self.ps = rc.pubsub()
        self.lock = asyncio.Lock()
        self.slots: set[int] = set()
        self.timeout = min(timeout, SUBSCRIBE_WAIT_S)
        #: slot -> monotonic time before which a failed subscription is not tried again
        self.retry_at: dict[int, float] = {}
        self._wake: _Wake | None = None  #: the reader's wait, while it waits
        self._wanted = 0  #: subscribers waiting for `lock`

    def poke(self) -> None:
        """End the reader's wait now (a subscriber wants `lock`)."""
        if self._wake is not None:
            self._wake.fire()

    async def subscribe(self, slot: int, channel_of: Callable[[int], bytes],
                        deliver: Callable[[codec.Event], None],
                        in_use: Callable[[], set[int]]) -> None:
        """SSUBSCRIBE this owner's channel of `slot` (`channel_of(slot)`) and wait for its
        confirmation (events read meanwhile go to `deliver`), bounded by the socket timeout
        and `SUBSCRIBE_WAIT_S`; after a failure the slot is not tried again for a second.
        With `MAX_SLOT_SUBS` slots subscribed already, those not in `in_use()` (the slots
        of the locks that read events now) are unsubscribed first."""
        loop = asyncio.get_running_loop()
        if loop.time() < self.retry_at.get(slot, 0.0):
            return  # (failed a moment ago: the call goes without it, as then)
        self._wanted += 1
        self.poke()
        try:
            async with self.lock:
                if slot in self.slots:
                    return
                await self._subscribe(slot, channel_of, deliver, in_use)
        except BaseException:
            self.retry_at[slot] = loop.time() + 1.0
            raise
        finally:
            self._wanted -= 1

    async def _subscribe(self, slot: int, channel_of: Callable[[int], bytes],
                         deliver: Callable[[codec.Event], None],
                         in_use: Callable[[], set[int]]) -> None:
        if len(self.slots) >= MAX_SLOT_SUBS:
            used = in_use()
            drop = [s for s in self.slots if s not in used]
            if drop:
                await self.ps.sunsubscribe(*[channel_of(s) for s in drop])
                self.slots.difference_update(drop)
        channel = channel_of(slot)
        await self.ps.ssubscribe(channel)
        node = self.rc.get_node_from_key(channel)
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        while loop.time() < end:
            msg = await self.ps.get_sharded_message(
                timeout=min(0.05, max(0.0, end - loop.time())), target_node=node)
            if msg is None:
                continue
            if msg["type"] == "ssubscribe" and msg["channel"] == channel:
                self.slots.add(slot)
                await self._drain(deliver)  # (what came with it: the reader waits on sockets)
                return
            self.handle(msg, deliver)
        raise RedisTimeoutError(f"no SSUBSCRIBE confirmation for {channel!r}")

    async def read(self, deliver: Callable[[codec.Event], None]) -> None:
        """Deliver the events that came, then wait (holding `lock`) until a shard's
        socket has data, its end or an error, or a subscriber wants the lock, or
        `IDLE_READ_S`; `SHARD_READ_S` where a shard's connection cannot be waited on."""
        async with self.lock:
            await self._drain(deliver)
            if self._wanted:
                return
            streams, others = self._streams()
            if any(_readable(st) for st in streams):
                return
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._wake = wake = _Wake(fut, 1)
            for st in streams:
                st._waiter = wake  # type: ignore[attr-defined]
            timer = loop.call_later(SHARD_READ_S if others else IDLE_READ_S, wake.fire)
            try:
                await fut
            finally:
                timer.cancel()
                self._wake = None
                for st in streams:
                    if st._waiter is wake:  # type: ignore[attr-defined]
                        st._waiter = None  # type: ignore[attr-defined]

    def _streams(self) -> tuple[list[asyncio.StreamReader], bool]:
        """The StreamReaders of the shards' open connections, and whether some shard
        subscribed to a channel has none that can be waited on (not open now)."""
        streams, others = [], False
        for ps in list(self.ps.node_pubsub_mapping.values()):
            conn = ps.connection
            st = _stream(conn) if conn is not None else None
            if st is not None:
                streams.append(st)
            elif ps.shard_channels:
                others = True
        return streams, others

    async def _drain(self, deliver: Callable[[codec.Event], None]) -> None:
        """Deliver the events that came, none waited for."""
        if not self.ps.node_pubsub_mapping:
            return
        while True:
            msg = await self.ps.get_sharded_message(timeout=0.0)
            if msg is None:
                return
            self.handle(msg, deliver)

    handle = staticmethod(deliver_shard_message)


class AsyncDLM(Flows):
    """The asyncio twin of `redlockdlm.DLM`. Create it inside a running loop, use it as
    ``async with AsyncDLM(urls) as dlm:``; `close()` releases everything it holds."""

    def __init__(self, urls: Sequence[str] | str, namespace: str = "default", *,
                 lease_ms: int = 10_000, socket_timeout: float = 1.0,
                 connect_timeout: float = 1.0, rejoin_ms: int | None = None, vbmax: int = 64,
                 owner: str | None = None, allow_eviction: bool = False,
                 **redis_options: Any) -> None:
        """As `DLM`, except that the first contact with the instances (and the
        ConfigurationError it may raise) happens at ``async with`` or the first request."""
        self._core, self._instances = open_session(
            _Instance, urls, namespace, lease_ms=lease_ms, socket_timeout=socket_timeout,
            connect_timeout=connect_timeout, rejoin_ms=rejoin_ms, vbmax=vbmax, owner=owner,
            redis_options=redis_options, allow_eviction=allow_eviction)
        self._contacted = False
        self._closed = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False
        self._background: set[asyncio.Task[Any]] = set()
        self._renewing: set[int] = set()  # instances whose renewal is in flight
        self._renew_soon = asyncio.Event()  # a lock with a shorter lease appeared
        #: clean-ups that outlive a cancelled caller (`_complete`); close() waits for them
        self._cleanups: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- lifecycle

    def _start_tasks(self) -> None:
        if self._started:
            return
        self._started = True
        self._core.renew_at = self._now() + self._core.renew_interval()
        for i in range(len(self._instances)):
            self._tasks.append(asyncio.create_task(self._events(i)))
        self._tasks.append(asyncio.create_task(self._renewer()))

    async def _ensure_started(self) -> None:
        """First contact with every instance (once; raises the ConfigurationError found),
        then the event and renewal tasks."""
        if not self._contacted:
            errors = await self._detect(range(len(self._instances)))
            errors += await self._run(self._first_contact(range(len(self._instances))))
            if errors:
                raise errors[0]
            self._contacted = True
        self._start_tasks()

    async def __aenter__(self) -> AsyncDLM:
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release every lock this client holds or waits for (a request still waiting
        fails with DLMError "closed"), then close connections. Cancelled meanwhile, it
        still finishes (bounded by the socket timeouts) before the CancelledError reaches
        the caller: no lock of this client is left anywhere."""
        if self._closed:
            return
        await self._complete(self._close())

    async def _close(self) -> None:
        if self._closed:
            return
        await self._run(self._close_flow(DLMError("this AsyncDLM client was closed")))
        others = [t for t in self._cleanups if t is not asyncio.current_task()]
        if others:  # clean-ups of cancelled calls still need the connections
            await asyncio.wait(others, timeout=self._cleanup_limit())
        # R4, R3: replies still to come from stalled instances, and what they call for (a
        # late grant of a failed request is released), before the connections close
        loop = asyncio.get_running_loop()
        limit = loop.time() + max(inst.timeout for inst in self._instances) + 0.5
        while True:
            late = [t for t in self._background
                    if not t.done() and t is not asyncio.current_task()]
            if not late or loop.time() >= limit:
                break
            await asyncio.wait(late, timeout=limit - loop.time())
        self._closed = True
        for t in self._tasks + list(self._background):
            t.cancel()
        for t in self._tasks + list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for inst in self._instances:
            await inst.close()


    def _cleanup_limit(self) -> float:
        """Seconds a clean-up may take: a few broadcasts, each bounded by the slowest
        instance's socket timeout (+ 0.5 s, `_broadcast`)."""
        return 3 * (max(inst.timeout for inst in self._instances) + 0.5) + 1.0

    async def _complete(self, coro: Awaitable[Any]) -> Any:
        """Await `coro` run as a task of its own, to its end even if the caller is cancelled
        meanwhile: then the task is waited for (bounded by `_cleanup_limit`; it goes on in
        the background after a second cancellation) and the CancelledError re-raised. For
        what must not stop half-way: a release, a clean-up after a cancellation, close."""
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_failure)  # nobody else will see what it raises
            if not task.done():
                await asyncio.wait([task], timeout=self._cleanup_limit())
            raise

    async def _clean_up(self, coro: Awaitable[Any]) -> None:
        """`_complete` for the clean-up after a cancellation: the CancelledError is what
        the caller must see, so what the clean-up raises is logged, not raised."""
        try:
            await self._complete(coro)
        except Exception as exc:  # noqa: BLE001 - logged; the cancellation goes on
            log.warning("clean-up after a cancellation failed: %s", describe(exc))

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
        `priority` (the deadlock detector's choice of a victim) as DLM.lock.

        Cancelled (`Task.cancel`, `asyncio.wait_for`, `asyncio.timeout`, a TaskGroup) at
        any point, the request is withdrawn on every instance, or released there if it was
        granted meanwhile, before the CancelledError reaches the caller (bounded by the
        socket timeouts): nothing is left queued or granted. `on_blocking` and `on_lost`
        run on the event loop (a coroutine function's result is run as a task)."""
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
        `priority`: as for DLM.lock. `on_granted` runs on the event loop once granted.
        Cancelled while the request is on its way, it is withdrawn from every instance
        before the CancelledError propagates."""
        if self._closed:
            raise DLMError("this AsyncDLM client is closed")
        if not self._started:
            await self._ensure_started()
        lk, req = self._new_request(
            resource, mode, timeout=timeout, noqueue=noqueue, expedite=expedite,
            no_deadlock_wait=no_deadlock_wait, value_block=value_block, on_granted=on_granted,
            on_blocking=on_blocking, on_lost=on_lost, lease_ms=lease_ms, parent=parent,
            priority=priority)
        await self._run(self._request(lk, req))
        return req

    def mutex(self, resource: str | bytes, mode: object = Mode.EX, *,
              lease_ms: int | None = None, reentrant: bool = False,
              **options: Any) -> AsyncMutex:
        """An `AsyncMutex`: as `DLM.mutex`, with `await m.acquire(...)`,
        `await m.release()`, `await m.locked()` and `async with m:`. Nothing is sent
        until `acquire`; bad arguments raise InvalidArgument / InvalidType here."""
        if self._closed:
            raise DLMError("this AsyncDLM client is closed")
        return AsyncMutex(self, resource, mode, lease_ms=lease_ms, reentrant=reentrant,
                          options=options)

    def locked(self, resource: str | bytes, mode: object = Mode.EX, *,
               timeout: float | None = None, lease_ms: int | None = None,
               **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A decorator for coroutine functions: each call runs holding `resource` in
        `mode` (as `DLM.locked`; a call cancelled while it waits or runs leaves nothing
        behind, as `lock` and `release` guarantee). InvalidType for a plain function
        (`DLM.locked` decorates those). The arguments are checked here."""
        m = check_locked_args(self._core, resource, mode, timeout, lease_ms)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            check_decorated(fn, True, "AsyncDLM")

            @functools.wraps(fn)
            async def locked_call(*args: Any, **kwargs: Any) -> Any:
                async with await self.lock(resource, m, timeout=timeout, lease_ms=lease_ms,
                                           **options):
                    return await fn(*args, **kwargs)
            return locked_call
        return decorate

    # ----------------------------------------------------------------- the flow driver

    async def _resume(self, flow: Flow, op: Any = None) -> Any:
        """Drive `flow` from operation `op` (None: from its start): perform each operation
        it yields and send back the result; a cancellation is thrown into the flow."""
        if op is None:
            try:
                op = flow.send(None)
            except StopIteration as stop:
                return stop.value
        while True:
            try:
                if type(op) is Broadcast:  # (the common one: no _perform frame)
                    late = op.late
                    value = await self._broadcast(
                        op.cmds, enough=op.enough,
                        late=None if late is None else self._late_runner(late),
                        until=op.until)
                else:
                    value = await self._perform(op)
                error = None
            except BaseException as exc:  # noqa: BLE001 - the flow decides (re-raises)
                value, error = None, exc
            try:
                op = flow.send(value) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value

    #: run `flow` to its end in this task; its result
    _run = _resume

    def _late_runner(self, late: Callable[[int, Any], Flow]) -> Callable[[int, Any], Any]:
        return lambda i, res: self._run(late(i, res))

    async def _perform(self, op: Any) -> Any:
        """Every operation but `Broadcast`, which `_resume` awaits itself."""
        if isinstance(op, Wait):
            return await self._wait(op.lk, op.until)
        if isinstance(op, Pipeline):
            return await self._pipeline(op.i, op.calls)
        if isinstance(op, Spawn):
            self._start(op.flow)
            return None
        if isinstance(op, Shielded):
            await self._clean_up(self._run(op.flow))
            return None
        if isinstance(op, Subscribe):
            return await self._subscribe_members(op.lk, op.members)
        raise TypeError(f"not an operation: {op!r}")

    async def _wait(self, lk: LockCore, until: float | None) -> bool:
        ev = lk.waker
        if ev is None:
            ev = lk.waker = asyncio.Event()
        if not ev.is_set():
            timeout = None if until is None else until - self._now()
            if timeout is not None and timeout <= 0:
                return False
            try:
                await asyncio.wait_for(ev.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        ev.clear()
        return True

    def _notify(self, lk: LockCore) -> None:
        if lk.waker is not None:
            lk.waker.set()

    def _start(self, flow: Flow) -> None:
        """Run `flow` here up to its first operation, then as a task."""
        try:
            op = flow.send(None)
        except StopIteration:
            return
        self._spawn(self._resume(flow, op))

    def _wake_renewer(self) -> None:
        self._renew_soon.set()

    def _callback(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a user callback on the loop, soon (after the step that caused it); a
        coroutine it returns runs as a task. What it raises is logged (with its
        traceback) and changes nothing else."""
        asyncio.get_running_loop().call_soon(self._run_callback, fn, args)

    def _run_callback(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            res = fn(*args)
            if asyncio.iscoroutine(res):
                self._spawn(_logged(fn, res))
        except Exception:  # noqa: BLE001 - a user callback must not kill the client
            log.exception("callback %r raised", fn)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background step failed: %s", describe(task.exception()))

    # ----------------------------------------------------------------- I/O

    async def _detect(self, which: Iterable[int]) -> list[DLMError]:
        """`DLM._detect`: the kind of each member of `which` not known yet that answers."""
        todo = [i for i in which if not self._instances[i].detected
                and i not in self._core.refused]
        if not todo:
            return []
        found = await asyncio.gather(*[self._instances[i].detect() for i in todo],
                                     return_exceptions=True)
        errors: list[DLMError] = []
        for i, ids in zip(todo, found):
            if isinstance(ids, BaseException):
                if not isinstance(ids, Exception):
                    raise ids
                log.info("instance %s: kind not known yet: %s", self._instances[i].url,
                         describe(ids))
                continue
            if ids is None:
                continue
            inst = self._instances[i]
            err = self._core.note_cluster(i, ids)
            if err is not None:
                errors.append(err)
                continue
            inst.shards = _Shards(inst.cluster, inst.timeout)
        return errors

    async def _subscribe_slot(self, i: int, call: Call) -> None:
        """`DLM._subscribe_slot`: before a call about a hash slot of cluster member i, for
        a lock that reads events at that point (`Session.reads_events`: an `on_blocking`
        lock, a waiting one; N4), this owner's shard channel of that slot subscribed there
        (confirmed); if that fails, the call goes anyway (the re-check finds the grant).
        Any other call goes unsubscribed: a lock granted at once never reads an event, and
        one that queues subscribes then (`_event_gaps`)."""
        shards = self._instances[i].shards
        slot = None if shards is None else event_slot(self._core, shards.slots, call)
        if slot is not None:
            await self._subscribe_to(i, slot)

    async def _subscribe_to(self, i: int, slot: int) -> bool:
        """Subscribe this owner's shard channel of `slot` on cluster member i and wait for
        the confirmation (bounded: `_Shards.subscribe`). True if it is subscribed now."""
        shards = self._instances[i].shards
        if shards is None:
            return False
        core = self._core
        try:
            await shards.subscribe(slot, core.slot_channel, functools.partial(self._on_event, i),
                                   lambda: event_slots(core))
        except Exception as exc:  # noqa: BLE001 - the shard unreachable...: re-checks
            log.info("instance %s: no event subscription for slot %d yet: %s",
                     self._instances[i].url, slot, describe(exc))
        return slot in shards.slots

    def _event_gaps(self, lk: LockCore) -> list[int]:
        """The cluster members where `lk` is queued or granted while it waits, whose slot
        channel is not subscribed yet and not tried in this wait (`connection.event_gaps`)."""
        return event_gaps(self._core, self._instances, lk)

    async def _subscribe_members(self, lk: LockCore, members: Sequence[int]) -> list[int]:
        """`Subscribe`: `lk`'s slot on each of `members`, all at once (each member's own
        subscription and confirmation); the members where it is subscribed now."""
        got = await asyncio.gather(*[self._subscribe_to(i, lk.slot) for i in members])
        return [i for i, ok in zip(members, got) if ok]

    async def _cluster_call(self, i: int, call: Call) -> list[Any]:
        inst = self._instances[i]
        return await acluster_round(inst.cluster, [call], inst.url)

    async def _broadcast(self, cmds: Iterable[tuple[int, Call]], *,
                         enough: int | None = None,
                         late: Callable[[int, Any], Any] | None = None,
                         until: float | None = None) -> dict[int, Any]:
        """Write every command, then read every reply (one round trip for all). Replies are
        read one after another within one deadline (`socket_timeout` + 0.5 s from the
        first read): every request is already on its way, so this costs no round trip,
        and it needs no task per instance.

        With `enough` (R4, `DLM._broadcast`): the replies are read as they come (`_gather`),
        and the call returns once that many are in and the others have had as long again
        as those took (at least 5 ms); a stalled instance's reply goes to
        `late(instance, result)` when it comes (a background task), which must handle it
        safely. With `until` too (the loop's monotonic time: R3, the caller's deadline): it
        returns then whatever is in; the replies not in go to `late` as a stalled
        instance's do and are missing from the result."""
        results: dict[int, Any] = {}
        conns: list[tuple[int, Call, Any]] = []
        unsent: list[tuple[int, Call, Any]] = []
        #: cluster members' calls that go through the cluster client (no route, refused)
        rerouted: list[tuple[int, Call]] = []
        cmds = list(cmds)
        if any(self._instances[i].cluster is not None for i, _ in cmds):
            # a cluster member's call in its per-slot layout, the slot's channel subscribed
            # (confirmed) before any call is written
            laid = []
            for i, call in cmds:
                if self._instances[i].cluster is not None:
                    call = self._core.member_call(i, call)
                    await self._subscribe_slot(i, call)
                laid.append((i, call))
            cmds = laid
        gather = enough is not None and (len(cmds) > 1 or until is not None)
        packed: tuple[Call | None, bytes] = (None, b"")  # (the same call to several: once)
        for i, call in cmds:
            inst = self._instances[i]
            if inst.routes is not None:  # a cluster member: on its slot's primary
                node = inst.routes.node(call)
                if node is None:
                    rerouted.append((i, call))
                    continue
                conn = inst.routes.get(node)
            else:
                conn = inst.get()
            if gather and getattr(conn, "_writer", None) is None:
                # connecting waits for the handshake's replies: a stalled instance would
                # hold up the others' writes, so its task connects and writes too
                unsent.append((i, call, conn))
                continue
            if packed[0] is not call:
                packed = (call, packed_command(*call))
            try:
                await _send(conn, packed[1])
                conns.append((i, call, conn))
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
                await conn.disconnect()
                inst.put(conn)
                if reroute(conn, exc):
                    rerouted.append((i, call))
                else:
                    results[i] = exc
        if rerouted:  # (read as they come, with the cluster client's tasks)
            gather = True
            if enough is None:
                enough = len(cmds)
        if gather:
            unsent += [(i, call, None) for i, call in rerouted]  # (a task each)
            if conns + unsent:
                return await self._gather(conns, unsent, results, enough or 0, late, until)
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

    async def _gather(self, conns: list[tuple[int, Call, Any]],
                      unsent: list[tuple[int, Call, Any]], results: dict[int, Any],
                      enough: int, late: Callable[[int, Any], Any] | None,
                      until: float | None = None) -> dict[int, Any]:
        """`_broadcast` with `enough`: read the replies as they come. Where every
        connection is open, this task reads them itself, woken by whichever connection has
        data (`_Wake`), as the sync client polls its sockets: no task per instance. The
        instances still silent when the grace is over are read by a task each, which hands
        the reply to `late`. Otherwise (a connection not open yet, which its task connects
        and writes first) every reply is read by its own task (`_gather_tasks`).

        As in the sync client, a reply that asks for more round trips on its instance (the
        library missing there: load, send again) is completed here, before the others are
        read (they wait in their buffers), and a parser without hiredis reads a reply that
        has begun to arrive to its end, within the instance's socket timeout."""
        if unsent:
            return await self._gather_tasks(conns, unsent, results, enough, late, until)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # instance -> (call, connection, its stream, whether `_buffered_reply` parses it)
        todo: dict[int, tuple[Call, Any, asyncio.StreamReader, bool]] = {}
        for i, call, conn in conns:
            st = _stream(conn)
            if st is None:
                return await self._gather_tasks(conns, unsent, results, enough, late, until)
            todo[i] = (call, conn, st, _parses(conn, st))
        ends = {i: t0 + self._instances[i].timeout for i in todo}
        # (R3: the caller's deadline, on the loop's clock; the replies not in then come late)
        cut = None if until is None else loop.time() + (until - self._now())
        grace_end: float | None = None
        try:
            while todo:
                for i in [i for i, e in todo.items()  # (`_readable`, inline)
                          if e[2]._buffer or e[2]._eof or e[2]._exception is not None]:
                    call, conn, st, parses = todo[i]
                    if not parses:  # a reply read as redis-py reads it
                        del todo[i]
                        left = max(0.001, ends[i] - loop.time())
                        results[i] = (await self._finish(i, conn, [call], left))[0]
                        continue
                    try:
                        raw = await _buffered_reply(conn, st)
                    except Exception as exc:  # noqa: BLE001 - closed, reset, not Redis...
                        del todo[i]
                        results[i] = exc
                        with contextlib.suppress(Exception):
                            await conn.disconnect()
                        self._instances[i].put(conn)
                        if routed(conn):  # (a failover? the map again; not resent)
                            self._instances[i].routes.refresh()
                        continue
                    if raw is _NOT_YET:  # a part of it came: wait for the rest
                        continue
                    del todo[i]
                    if isinstance(raw, BaseException) and (
                            missing(raw) or (isinstance(raw, REROUTE) and routed(conn))):
                        # the library is missing there: load, send again; or a cluster
                        # member's slot is not on that node: through the cluster client
                        results[i] = (await self._finish(i, conn, [call], first=[raw]))[0]
                    else:  # (what `_finish` does with a reply that ends the round)
                        results[i] = settle(call, raw, self._instances[i].url)
                        self._instances[i].put(conn)
                if not todo:
                    break
                now = loop.time()
                if cut is not None and now >= cut:
                    break
                if len(results) >= enough:
                    if grace_end is None:  # the others' grace: as long again as it took
                        grace_end = now + max(0.005, now - t0)
                    if now >= grace_end:
                        break
                until = min(ends[i] for i in todo)
                if until <= now:  # silent for its socket timeout: as `_finish` says
                    for i in [i for i in todo if ends[i] <= now]:
                        conn = todo.pop(i)[1]
                        results[i] = RedisTimeoutError(
                            f"Timeout reading from {self._instances[i].url}")
                        with contextlib.suppress(Exception):
                            await conn.disconnect()
                        self._instances[i].put(conn)
                        if routed(conn):  # (a failover? the map again)
                            self._instances[i].routes.refresh()
                    continue
                # woken once the quorum can be complete, or (in the grace) all are in
                need = len(todo)
                if grace_end is not None:
                    until = min(until, grace_end)
                else:
                    need = min(need, enough - len(results))
                if cut is not None:
                    until = min(until, cut)
                await _any_data([e[2] for e in todo.values()], until - now, need)
        except BaseException:  # cancelled: replies nobody will read must not stay queued
            for i, (_, conn, _, _) in todo.items():
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                self._instances[i].put(conn)
            raise
        now = loop.time()
        for i, (call, conn, _, _) in todo.items():  # R4: a stalled instance, read when it comes
            t = asyncio.ensure_future(self._finish(i, conn, [call], max(0.001, ends[i] - now)))
            self._background.add(t)
            t.add_done_callback(functools.partial(self._late_done, i, late))
        return results

    async def _gather_tasks(self, conns: list[tuple[int, Call, Any]],
                            unsent: list[tuple[int, Call, Any]], results: dict[int, Any],
                            enough: int,
                            late: Callable[[int, Any], Any] | None,
                            until: float | None = None) -> dict[int, Any]:
        """`_gather` with a task per instance reading its reply (for a connection not open
        yet, the task connects and writes first)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if until is not None:  # (on the loop's clock)
            until = t0 + (until - self._now())
        tasks = {asyncio.ensure_future(self._finish(i, conn, [call], self._instances[i].timeout)):
                 i for i, call, conn in conns}
        tasks.update({asyncio.ensure_future(self._send_finish(i, call, conn)): i
                      for i, call, conn in unsent})
        waiting = set(tasks)
        try:
            while waiting and len(results) < enough:
                left = None if until is None else until - loop.time()
                if left is not None and left <= 0:
                    break
                done, waiting = await asyncio.wait(waiting, timeout=left,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    results[tasks[t]] = t.result()[0]
            if waiting and len(results) >= enough:  # the others' grace: as long again
                grace = max(0.005, loop.time() - t0)
                if until is not None:
                    grace = min(grace, max(0.0, until - loop.time()))
                done, waiting = await asyncio.wait(waiting, timeout=grace)
                for t in done:
                    results[tasks[t]] = t.result()[0]
        except BaseException:  # cancelled: no reply of this call is wanted any more
            for t in waiting:
                t.cancel()
            raise
        for t in waiting:  # R4: a stalled instance; its reply is handled when it comes
            self._background.add(t)
            t.add_done_callback(functools.partial(self._late_done, tasks[t], late))
        return results

    async def _send_finish(self, i: int, call: Call, conn: Any) -> list[Any]:
        if conn is None:  # a cluster member's call through the cluster client
            return await self._cluster_call(i, call)
        try:
            await _send(conn, packed_command(*call))
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
            await conn.disconnect()
            self._instances[i].put(conn)
            if reroute(conn, exc):
                return await self._cluster_call(i, call)
            return [exc]
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            self._instances[i].put(conn)
            raise
        return await self._finish(i, conn, [call], self._instances[i].timeout)

    def _late_done(self, i: int, late: Callable[[int, Any], Any] | None,
                   task: asyncio.Future[Any]) -> None:
        self._background.discard(task)  # type: ignore[arg-type]
        if task.cancelled() or late is None:
            return
        res = late(i, task.result()[0])
        if asyncio.iscoroutine(res):
            self._spawn(res)

    async def _pipeline(self, i: int, calls: Sequence[Call]) -> list[Any]:
        """Send every call to instance `i` in one write and read their replies: one round
        trip however many calls (`DLM._pipeline`, with the same results)."""
        inst = self._instances[i]
        if inst.cluster is not None:
            calls = [self._core.member_call(i, c) for c in calls]
            for c in calls:
                await self._subscribe_slot(i, c)
            return await self._cluster_pipeline(i, calls)
        conn = inst.get()
        try:
            await self._write(conn, [packed_command(*c) for c in calls])
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, not Redis...
            await conn.disconnect()
            self._instances[i].put(conn)
            return [exc] * len(calls)
        return await self._finish(i, conn, calls)

    async def _cluster_pipeline(self, i: int, calls: Sequence[Call]) -> list[Any]:
        """`_pipeline` on cluster member i (`calls` in its layout): the calls of each
        primary (by the slot map) in one write to it, every primary's before any reply is
        read, so a stalled primary costs one socket timeout whatever the number of its
        slots. A call without a route, or whose primary's address refused it, goes
        afterwards through the cluster client (as one met by MOVED..., `_finish`)."""
        inst = self._instances[i]
        routes = inst.routes
        out: list[Any] = [_REROUTED] * len(calls)
        written: list[tuple[Any, list[int]]] = []
        try:
            for node, idx in routes.by_primary(calls):
                conn = routes.get(node)
                try:
                    await self._write(conn, [packed_command(*calls[k]) for k in idx])
                except Exception as exc:  # noqa: BLE001 - unreachable, refused, stalled...
                    await conn.disconnect()
                    inst.put(conn)
                    if not reroute(conn, exc):
                        for k in idx:
                            out[k] = exc
                    continue
                written.append((conn, idx))
            while written:
                conn, idx = written[0]
                res = await self._finish(i, conn, [calls[k] for k in idx])
                written.pop(0)
                for k, r in zip(idx, res):
                    out[k] = r
        except BaseException:  # cancelled: replies nobody will read must not stay queued
            for conn, _ in written[1:]:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                inst.put(conn)
            raise
        again = [k for k, r in enumerate(out) if r is _REROUTED]
        if again:
            for k, r in zip(again, await acluster_round(inst.cluster, [calls[k] for k in again],
                                                        inst.url)):
                out[k] = r
        return out

    async def _finish(self, i: int, conn: Any, calls: Sequence[Call],
                      first_timeout: float | None = None,
                      first: list[Any] | None = None) -> list[Any]:
        """`DLM._finish`: read, settle, resend after loading a missing library, give the
        connection back. `first_timeout` bounds the wait for the first reply; `first`: the
        replies of `calls`, where they were read already (`_gather`)."""
        inst = self._instances[i]
        ours = routed(conn)
        try:
            rnd = Round(calls)
            if first is None:
                first = await self._replies(conn, len(calls), first_timeout, inst.url)
            cmds = rnd.feed(first)
            while cmds:
                await self._write(conn, conn.pack_commands(cmds))
                cmds = rnd.feed(await self._replies(conn, len(cmds)))
            out = [_REROUTED if ours and isinstance(r, REROUTE) else settle(c, r, inst.url)
                   for c, r in zip(calls, rnd.raws)]
        except Exception as exc:  # noqa: BLE001 - unreachable, timed out, not Redis...
            await conn.disconnect()
            if ours:  # (a failover? the map again; the call may have run: not resent)
                inst.routes.refresh()
            return [exc] * len(calls)
        except BaseException:  # cancelled: replies nobody will read
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        finally:
            inst.put(conn)
        again = [k for k, r in enumerate(out) if r is _REROUTED]
        if again:  # did nothing on that node: through the cluster client, which follows
            for k, r in zip(again, await acluster_round(inst.cluster, [calls[k] for k in again],
                                                        inst.url)):
                out[k] = r
        return out

    @staticmethod
    async def _write(conn: Any, chunks: Sequence[bytes]) -> None:
        """One write of packed commands (the one place a pipelined round trip starts), as
        `_send` writes: straight to the stream of an open connection."""
        await _send(conn, b"".join(chunks))

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

    # ----------------------------------------------------------------- background

    async def _events(self, i: int) -> None:
        inst = self._instances[i]
        warned = False
        while not self._closed:
            for err in (await self._detect([i])  # reached at last
                        + await self._run(self._first_contact([i]))):
                log.error("instance refused, its votes never count: %s", err)
            if i in self._core.refused:
                return  # its votes never count: no events either
            if inst.shards is not None:
                try:
                    await inst.shards.read(functools.partial(self._on_event, i))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every shard lost, garbled...
                    log.info("instance %s: event connection lost: %s", inst.url,
                             describe(exc))
                    await asyncio.sleep(0.5)
                continue
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

    async def _renewer(self) -> None:
        """Tick at `Session.renew_at` (woken earlier when a lock with a shorter lease
        appears); each tick renews every instance in its own flow (`_renew_tick`), so one
        stalled instance delays nobody else's leases."""
        while not self._closed:
            if not self._renewal_due():
                self._renew_soon.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._renew_soon.wait(),
                                           self._core.renew_at - self._now())
                continue
            self._renew_tick()
            self._check_lost()  # also when every instance stalls and no reply comes


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("clean-up after a cancellation failed: %s", describe(task.exception()))


async def _logged(fn: Callable[..., Any], coro: Awaitable[Any]) -> None:
    """A coroutine callback's task: what it raises is logged, as for a plain callback."""
    try:
        await coro
    except Exception:  # noqa: BLE001 - a user callback must not kill the client
        log.exception("callback %r raised", fn)


class AsyncRequest(RequestBase):
    """An asynchronous lock request: `await req` or `await req.wait(timeout)`."""

    def __init__(self, dlm: AsyncDLM, lock: AsyncLock,
                 on_granted: Callable[[AsyncLock], Any] | None) -> None:
        super().__init__(dlm, lock, on_granted)
        self._fut: asyncio.Future[AsyncLock] = asyncio.get_running_loop().create_future()

    def _set_done(self, error: DLMError | None) -> None:
        if error is None:
            self._fut.set_result(self.lock)
        else:
            self._fut.set_exception(error)
            self._fut.exception()  # retrieved here: nobody may await a closed client's request

    @property
    def done(self) -> bool:
        return self._fut.done()

    async def wait(self, timeout: float | None = None) -> AsyncLock:
        """Wait until granted (the lock) or failed (its error). `timeout` bounds only this
        wait (StillWaiting, a LockTimeout); the request keeps waiting, with its own
        timeout. Cancelled from outside (`Task.cancel`, `asyncio.wait_for`, ...), the
        request is withdrawn as by `cancel()` (released if it was granted meanwhile)
        before the CancelledError propagates: it is the caller's wait that owns it."""
        if self._fut.done():
            return self._fut.result()
        try:
            return await asyncio.wait_for(asyncio.shield(self._fut), timeout)
        except asyncio.TimeoutError:
            if self._fut.done():  # the request's own LockTimeout (a TimeoutError): as it is
                return self._fut.result()
            raise self._still_waiting(timeout) from None
        except asyncio.CancelledError:
            await self._dlm._clean_up(self._dlm._run(self._dlm._withdraw(self)))
            raise

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.wait().__await__()

    async def cancel(self) -> None:
        """Withdraw the request everywhere (or release the lock if it was granted); it
        completes with LockTimeout("cancelled") if it had not. Runs to its end even if the
        caller is cancelled meanwhile (then re-raises)."""
        await self._dlm._complete(self._dlm._run(self._dlm._withdraw(self)))

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
        """Change the mode; on failure the lock keeps its old mode, a down-conversion its
        new one (as `Lock.convert`, `priority` included). Cancelled before it returns, a
        conversion that may wait (up or sideways) is withdrawn on every instance and the
        lock keeps its old mode; a down-conversion, which never waits (G4) and may already
        have let other locks in beside its new mode, is completed. Either way the
        CancelledError propagates once every instance agrees (bounded by the socket
        timeouts); `mode` tells which."""
        await self._dlm._run(self._dlm._convert(
            self._core, mode, timeout, noqueue=noqueue, quecvt=quecvt, convdeadlk=convdeadlk,
            no_deadlock_wait=no_deadlock_wait, priority=priority))

    async def release(self, *, subtree: bool = False) -> None:
        """Release on every instance (writing the value block if set by a PW/EX holder).
        Cancelled meanwhile, the release still completes before the CancelledError
        propagates (bounded by the socket timeouts)."""
        await self._dlm._run(self._dlm._release(self._core, subtree=subtree))

    async def extend(self, lease_ms: int | None = None) -> None:
        """Renew this lock now on every instance, with `lease_ms` its lease from now on
        (rule L1); same guarantees and errors as `Lock.extend`."""
        await self._dlm._run(self._dlm._extend(self._core, lease_ms))

    async def __aenter__(self) -> AsyncLock:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        lost = self._lost_before_exit()
        await self.release(subtree=True)
        self._raise_lost(lost, exc_type)


class AsyncMutex(MutexBase):
    """One lock as an `asyncio.Lock`-like object (`AsyncDLM.mutex`): `await acquire()`,
    `await release()`, `await locked()`, `owned()`, `async with m:`. Its acquisitions are
    this object's, not a task's: a second `acquire` while held raises AlreadyHeld (or,
    made `reentrant`, counts)."""

    async def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """As `Mutex.acquire`: True once granted; False when not free now
        (`blocking=False`) or after `timeout` seconds (-1: no limit). Cancelled while it
        waits, the request is withdrawn everywhere (as `AsyncDLM.lock`) and the mutex is
        left not held."""
        kw = self._begin(blocking, timeout)
        if kw is None:
            return True
        lock = None
        try:
            lock = await self._dlm.lock(self._resource, self._mode, **kw)
        except (LockTimeout, NotQueued):
            pass
        finally:
            granted = self._end(lock)
        return granted

    async def release(self) -> None:
        """As `Mutex.release`: NotHeld when not held; LockLost (after releasing) when the
        lock was lost while held. Cancelled meanwhile, the release still completes."""
        await self._give_back(None)

    async def _give_back(self, exc_type: object) -> None:
        """`release`, and `__aexit__` (which passes the exception leaving its block)."""
        lock = self._to_release()
        if lock is not None:
            lost = lock._lost_before_exit()
            await lock.release(subtree=True)
            lock._raise_lost(lost, exc_type)

    async def locked(self) -> bool:
        """As `Mutex.locked`: whether some owner holds the resource in a conflicting
        mode, as a quorum of instances answer now."""
        return await self._dlm._run(self._dlm._probe(self._resource, self._mode))

    async def __aenter__(self) -> AsyncMutex:
        if not await self.acquire():  # (no timeout: only a withdrawn request ends so)
            raise LockTimeout("the mutex's request was withdrawn", resource=self.resource)
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        await self._give_back(exc_type)


AsyncDLM._lock_class = AsyncLock
AsyncDLM._request_class = AsyncRequest
