"""A TCP proxy in front of each Redis instance, to inject network faults (tests only).

One :class:`ProxyHub` runs an asyncio loop in a daemon thread of the test process; every
:class:`Proxy` listens on a free port of 127.0.0.1 and forwards to one instance, also on
127.0.0.1 (any other address is refused). A client that should suffer faults alone gets its
own :class:`ProxySet` (one proxy per instance), so "cut client X off from instances 0 and 2"
is ``sets[x].blackhole([0, 2])``.

Faults, per proxy:

* ``latency(up_ms, down_ms)``: every chunk read from one side is delivered to the other
  side that many ms later (order kept; up = client to server, down = server to client).
* ``drop()``: close every current connection at once (the client sees a reset/EOF).
* ``blackhole()``: accept connections but forward nothing either way, and hold them open
  (the client sees a silent peer: its reads time out). ``heal()`` ends it and closes the
  connections that lived through it, since bytes were thrown away in the middle of them
  and they can no longer be trusted; the client reconnects.

Connection state is touched only on the loop thread; the public methods hop onto it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Sequence

LOOPBACK = "127.0.0.1"


class _Pipe:
    """One proxied connection: a client socket and (unless black-holed) its upstream."""

    def __init__(self, proxy: Proxy, c_reader: asyncio.StreamReader,
                 c_writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = c_reader, c_writer
        self.u_reader: asyncio.StreamReader | None = None
        self.u_writer: asyncio.StreamWriter | None = None
        self.tainted = False  #: bytes were thrown away: close it on heal
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    async def run(self) -> None:
        p = self.proxy
        try:
            self.u_reader, self.u_writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, p.target_port), timeout=5)
        except (OSError, asyncio.TimeoutError):
            # the instance is down: behave like it (connection refused -> closed at once),
            # unless we are black-holing, in which case the client just hangs
            if not p.blackholed:
                self.close()
                return
        self.tasks = [asyncio.ensure_future(self._pump(self.c_reader, "up")),
                      asyncio.ensure_future(self._pump(self.u_reader, "down"))
                      if self.u_reader is not None else None]
        self.tasks = [t for t in self.tasks if t is not None]
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.close()

    async def _pump(self, reader: asyncio.StreamReader, direction: str) -> None:
        p = self.proxy
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, direction))
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (OSError, ConnectionError):
                    data = b""
                if not data:
                    break
                if p.blackholed or self.u_writer is None:
                    self.tainted = True
                    p.bytes_dropped += len(data)
                    continue
                delay = (p.up_ms if direction == "up" else p.down_ms) / 1000.0
                queue.put_nowait((time.monotonic() + delay, data))
            queue.put_nowait((0.0, None))  # EOF: deliver what is in flight, then close
            with contextlib.suppress(Exception):
                await sender
        finally:  # (no await here: a cancelled or closed coroutine must just stop)
            if not sender.done():
                sender.cancel()
            self.close()

    async def _send(self, queue: asyncio.Queue, direction: str) -> None:
        p = self.proxy
        while True:
            at, data = await queue.get()
            if data is None:
                return
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if p.blackholed:  # black-holed while in flight: lost
                self.tainted = True
                p.bytes_dropped += len(data)
                continue
            w = self.u_writer if direction == "up" else self.c_writer
            if w is None or self.closed:
                return
            try:
                w.write(data)
                await w.drain()
            except (OSError, ConnectionError):
                self.close()
                return
            p.bytes_forwarded += len(data)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.pipes.discard(self)
        for w in (self.c_writer, self.u_writer):
            if w is None:
                continue
            with contextlib.suppress(Exception):
                if abort:
                    w.transport.abort()
                else:
                    w.close()
        for t in self.tasks:
            t.cancel()


class Proxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port, with fault controls."""

    def __init__(self, hub: ProxyHub, target_port: int, name: str = "") -> None:
        self.hub = hub
        self.target_port = int(target_port)
        self.name = name
        self.up_ms = 0.0
        self.down_ms = 0.0
        self.blackholed = False
        self.pipes: set[_Pipe] = set()
        self.bytes_forwarded = 0
        self.bytes_dropped = 0
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self.port = hub.call(self._start)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pipe = _Pipe(self, reader, writer)
        if self.blackholed:
            pipe.tainted = True
        self.pipes.add(pipe)
        await pipe.run()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}"

    # ------------------------------------------------------------------ controls

    def latency(self, up_ms: float = 0.0, down_ms: float = 0.0) -> None:
        """Delay every chunk by `up_ms` toward the server and `down_ms` toward the client."""
        def set_() -> None:
            self.up_ms, self.down_ms = float(up_ms), float(down_ms)
        self.hub.call_soon(set_)

    def drop(self) -> None:
        """Reset every current connection."""
        async def drop_() -> None:
            for p in list(self.pipes):
                p.close(abort=True)
        self.hub.call(drop_)

    def blackhole(self) -> None:
        """Forward nothing any more (both ways), keep the connections open."""
        async def bh() -> None:
            self.blackholed = True
            for p in self.pipes:
                p.tainted = True
        self.hub.call(bh)

    def heal(self) -> None:
        """No latency, no black hole; close the connections that lost bytes."""
        async def heal_() -> None:
            self.up_ms = self.down_ms = 0.0
            self.blackholed = False
            for p in list(self.pipes):
                if p.tainted:
                    p.close(abort=True)
        self.hub.call(heal_)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in list(self.pipes):
            p.close(abort=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.hub.call(self._close)


class ProxySet:
    """One proxy per instance, for one client."""

    def __init__(self, hub: ProxyHub, target_ports: Sequence[int], name: str = "") -> None:
        self.proxies = [Proxy(hub, p, f"{name}/{i}") for i, p in enumerate(target_ports)]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.proxies]

    def _pick(self, which: Iterable[int] | None) -> list[Proxy]:
        return self.proxies if which is None else [self.proxies[i] for i in which]

    def latency(self, up_ms: float, down_ms: float, which: Iterable[int] | None = None) -> None:
        for p in self._pick(which):
            p.latency(up_ms, down_ms)

    def blackhole(self, which: Iterable[int] | None = None) -> None:
        """Cut this client off from the instances `which` (all if None)."""
        for p in self._pick(which):
            p.blackhole()

    def drop(self, which: Iterable[int] | None = None) -> None:
        for p in self._pick(which):
            p.drop()

    def heal(self, which: Iterable[int] | None = None) -> None:
        for p in self._pick(which):
            p.heal()

    def close(self) -> None:
        for p in self.proxies:
            p.close()


class ProxyHub:
    """The asyncio loop (in a daemon thread) that runs every proxy of a test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._thread.start()
        self.proxies: list[Proxy] = []

    def call(self, fn, timeout: float = 10.0):  # noqa: ANN001, ANN201 - coroutine function
        """Run coroutine function `fn` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def call_soon(self, fn) -> None:  # noqa: ANN001
        """Run plain function `fn` on the loop and wait until it ran."""
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()
        self.loop.call_soon_threadsafe(run)
        done.wait(10)

    def proxy(self, target_port: int, name: str = "") -> Proxy:
        p = Proxy(self, target_port, name)
        self.proxies.append(p)
        return p

    def proxy_set(self, target_ports: Sequence[int], name: str = "") -> ProxySet:
        s = ProxySet(self, target_ports, name)
        self.proxies.extend(s.proxies)
        return s

    def close(self) -> None:
        for p in self.proxies:
            p.close()

        async def drain() -> None:  # let every pipe task finish before the loop stops
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for _ in range(2):  # (a connection accepted during the first round)
            with contextlib.suppress(Exception):
                self.call(drain)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
