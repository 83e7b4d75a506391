"""How AsyncDLM reads a quorum's replies, seen from outside (docs/rules.md R4).

A reply that arrives in pieces, its end late, costs the caller no more than a silent
instance does: the call returns on the quorum and the grace, the late reply is recorded
when it is all there (the connection then serves the next commands), and a release
leaves nothing on any instance. The same holds with
redis-py's pure-Python parser (no hiredis), which reads a reply in its own way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis._parsers import _AsyncRESP3Parser

from redlockdlm.aio import AsyncDLM
from redlockdlm.engine.modes import Mode

from .conftest import NS, Quorum

EX = Mode.EX
LATE_S = 1.0  # how long the end of a split reply is held back (below the socket timeout)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def until(pred: Callable[[], Any], timeout: float = 5.0) -> None:
    """`wait_until` that lets the loop run (the client's late reads, the proxy)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.02)


class SplitProxy:
    """A TCP proxy before one instance (in the test's own loop) that, once `armed`, sends
    every reply's first bytes at once and the rest `LATE_S` later."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        for t in (self._pump(cr, uw, False), self._pump(ur, cw, True)):
            task = asyncio.ensure_future(t)
            self.tasks.add(task)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    down: bool) -> None:
        while data := await r.read(65536):
            if down and self.armed and len(data) > 1:
                w.write(data[:len(data) // 2])
                await asyncio.sleep(LATE_S)
                data = data[len(data) // 2:]
            w.write(data)
        w.close()

    async def close(self) -> None:
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.timeout(60)
def test_a_reply_split_with_its_end_late_costs_only_the_grace(ready) -> None:
    q: Quorum = ready(3, "async")

    async def body() -> None:
        proxy = SplitProxy(q.servers[0].port)
        urls = [await proxy.start(), *q.urls[1:]]
        dlm = AsyncDLM(urls, NS, socket_timeout=3.0, connect_timeout=3.0)
        try:
            async with dlm:
                await (await dlm.lock("warm", EX)).release()  # connections open
                proxy.armed = True
                t0 = time.monotonic()
                lk = await dlm.lock("res", EX)
                took = time.monotonic() - t0
                assert took < LATE_S / 2, f"the split reply held the caller {took:.2f} s"
                proxy.armed = False
                await asyncio.sleep(LATE_S * 1.5)  # its end came, and was read
                await lk.release()
                q.servers[2].pause()  # now instance 0 is needed for a quorum
                try:  # and its connections still answer their own commands
                    for _ in range(5):
                        await (await dlm.lock("res", EX, timeout=2)).release()
                        await (await dlm.lock("other", EX, timeout=2)).release()
                finally:
                    q.servers[2].resume()
                await until(lambda: q.gone("res") and q.gone("other"))
        finally:
            await proxy.close()

    run(body())


@pytest.mark.timeout(60)
def test_pure_python_parser_quorum_and_a_paused_instance(ready) -> None:
    q: Quorum = ready(3, "async")

    async def body() -> None:
        async with AsyncDLM(q.urls, NS, socket_timeout=2.0, connect_timeout=2.0,
                            parser_class=_AsyncRESP3Parser) as dlm:
            for _ in range(3):
                await (await dlm.lock("res", EX)).release()
            assert q.gone("res")
            q.servers[2].pause()
            try:
                t0 = time.monotonic()
                lk = await dlm.lock("res", EX)
                assert time.monotonic() - t0 < 0.5  # R4: the two others and the grace
                await lk.release()
            finally:
                q.servers[2].resume()
            await until(lambda: q.gone("res"))

    run(body())
