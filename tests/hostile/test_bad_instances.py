"""Malformed URLs and instances that are not Redis (docs/design.md §9, "Bad input").

* Every malformed URL is InvalidArgument (a ValueError), or InvalidType for a non-str,
  raised by DLM(), AsyncDLM() and the `dlm` command (exit 2) before anything connects.
* A TCP server that is not Redis (it answers HTTP, garbage, "+OK" to everything, closes at
  once, or never answers) counts as a failed instance: as a majority, the call raises
  QuorumUnavailable naming the cause, within the socket timeout; as one of three, the other
  two make the quorum and the lock works, with the sync and the asyncio client.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from redis_harness import Instances
from redlockdlm_cli.main import cli

from redlockdlm import DLM, Mode
from redlockdlm.aio import AsyncDLM
from redlockdlm.engine.instance import Engine
from redlockdlm.errors import DLMError, InvalidArgument, InvalidType, QuorumUnavailable

pytestmark = pytest.mark.timeout(60)

NS = "bad"

BAD_URLS = [
    ("", InvalidArgument),
    ("http://x", InvalidArgument),
    ("redis://", InvalidArgument),
    ("redis://127.0.0.1:notaport", InvalidArgument),
    ("redis://127.0.0.1:99999", InvalidArgument),
    ("redis://127.0.0.1:0", InvalidArgument),
    ("redis://:pw@", InvalidArgument),
    ("redis://[::1", InvalidArgument),
    ("redis://127.0.0.1:6379/notadb", InvalidArgument),
    ("rediss://127.0.0.1:6379?ssl_cert_reqs=bogus", InvalidArgument),
    ("unix://", InvalidArgument),
    ("127.0.0.1:6379", InvalidArgument),
    ("redis:/127.0.0.1:6379", InvalidArgument),
    (" ", InvalidArgument),
    (None, InvalidType),
    (6379, InvalidType),
    (b"redis://127.0.0.1:6379", InvalidType),
]


@pytest.mark.parametrize("url, exc", BAD_URLS)
def test_malformed_urls_are_typed_errors(url: object, exc: type) -> None:
    for make in (lambda: DLM([url]), lambda: AsyncDLM([url])):
        with pytest.raises(exc) as ei:
            make()
        assert isinstance(ei.value, DLMError)
        assert isinstance(ei.value, ValueError if exc is InvalidArgument else TypeError)
        assert "\n" not in str(ei.value)
    if isinstance(url, str) and url.strip():
        r = CliRunner().invoke(cli, ["status", "--redis", url], catch_exceptions=False)
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith("dlm: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_password_in_a_bad_url_is_not_shown() -> None:
    with pytest.raises(InvalidArgument) as ei:
        DLM(["redis://user:s3cret@127.0.0.1:notaport"])
    assert "s3cret" not in str(ei.value)


# ----------------------------------------------------------------- not Redis


class NotRedis:
    """A TCP server on 127.0.0.1 that is not Redis. `kind`: 'http' (an HTTP error, then
    close), 'garbage' (binary junk to every read), 'ok' (+OK to everything, even where Redis
    sends an array), 'close' (accepts and closes), 'silent' (accepts, never answers)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.kind == "close":
                conn.close()
                return
            conn.settimeout(30)
            buf = b""
            while not self.stopped:
                data = conn.recv(65536)
                if not data:
                    return
                if self.kind == "http":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    conn.close()
                    return
                if self.kind == "garbage":
                    conn.sendall(b"\x00\xff\x13garbage\r\n")
                elif self.kind == "ok":
                    buf += data
                    n, buf = _complete_commands(buf)
                    conn.sendall(b"+OK\r\n" * n)
                # silent: read and ignore
        except OSError:
            pass

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def _complete_commands(buf: bytes) -> tuple[int, bytes]:
    """How many whole RESP commands (arrays of bulk strings) `buf` starts with, and the rest.

    The '+OK' fake answers once per command, as Redis would, however TCP cut or joined them:
    answering once per recv() gave a pipelined client fewer replies than commands, so its
    cause became a timeout whenever the kernel joined two commands into one read."""
    n, pos = 0, 0
    while True:
        start = pos
        eol = buf.find(b"\r\n", pos)
        if eol < 0 or buf[pos:pos + 1] != b"*":
            return n, buf[start:]
        count, pos = int(buf[pos + 1:eol]), eol + 2
        for _ in range(count):
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return n, buf[start:]
            size = int(buf[pos + 1:eol])
            if len(buf) < eol + 2 + size + 2:
                return n, buf[start:]
            pos = eol + 2 + size + 2
        n += 1


KINDS = ["http", "garbage", "ok", "close", "silent"]


@pytest.fixture
def fresh3(cluster3: Instances) -> Instances:
    for s in cluster3:
        c = s.client()
        Engine(c, NS).init_fresh()
        c.close()
    return cluster3


@pytest.fixture(params=KINDS)
def fake(request: pytest.FixtureRequest) -> Iterator[NotRedis]:
    srv = NotRedis(request.param)
    yield srv
    srv.close()


def test_one_instance_of_three_not_redis_the_lock_still_works(fresh3, fake) -> None:
    urls = fresh3.urls[:2] + [fake.url]
    with DLM(urls, NS, socket_timeout=0.5, connect_timeout=0.5) as d:
        lk = d.lock("res", Mode.EX, timeout=10)
        assert lk.valid and lk.mode == Mode.EX
        lk.value = b"two of three"
        lk.release()

    async def session() -> None:
        async with AsyncDLM(urls, NS, socket_timeout=0.5, connect_timeout=0.5) as a:
            lk = await a.lock("res", Mode.EX, timeout=10)
            assert lk.valid
            await lk.release()

    asyncio.run(session())


CAUSE = {"http": "not a Redis server", "garbage": "not a Redis server",
         "ok": "not a Redis server", "close": "unreachable", "silent": "timed out"}


def test_a_majority_not_redis_is_quorum_unavailable_naming_the_cause(fresh3, fake) -> None:
    urls = fresh3.urls[:1] + [fake.url, fake.url]
    # a fake that answers must be given time to answer on a loaded machine; a silent one
    # is only ever a timeout, so keep its test short
    to = 0.5 if fake.kind == "silent" else 2.0
    # R3: an instance that is not Redis fails the wait at once; one that closes the
    # connection or stays silent may be restarting or paused, so the wait goes on until
    # the caller's timeout, and the error names the cause then
    short = fake.kind in ("close", "silent")
    limit = 2.0 if short else 10
    t0 = time.monotonic()
    with DLM(urls, NS, socket_timeout=to, connect_timeout=to) as d:
        with pytest.raises(QuorumUnavailable) as ei:
            d.lock("res", Mode.EX, timeout=limit)
        took = time.monotonic() - t0
        assert (limit <= took < limit + 4) if short else took < 10, took
        msg = str(ei.value)
        assert msg.count(CAUSE[fake.kind]) == 2 and "\n" not in msg, msg
        assert not d._core.locks  # nothing left behind in the client ...
    for e in (Engine(fresh3[0].client(), NS),):  # ... nor on the real instance
        assert e.inspect([e.key("res")])[1][0] is None or not [
            lk for lk in e.inspect([e.key("res")])[1][0].locks if lk.lease_left_ms > 0]

    async def attempt() -> None:
        async with AsyncDLM(urls, NS, socket_timeout=to, connect_timeout=to) as a:
            await a.lock("res", Mode.EX, timeout=limit)

    t0 = time.monotonic()
    with pytest.raises(QuorumUnavailable) as ei:
        asyncio.run(attempt())
    assert time.monotonic() - t0 < (limit + 4 if short else 10)
    assert CAUSE[fake.kind] in str(ei.value), str(ei.value)


def test_the_dlm_command_with_instances_that_are_not_redis(fresh3) -> None:
    fakes = [NotRedis("http"), NotRedis("ok")]
    try:
        one_bad = ",".join(fresh3.urls[:2] + [fakes[0].url])
        r = CliRunner().invoke(cli, ["status", "--namespace", NS, "--redis", one_bad,
                                     "--timeout", "0.5"], catch_exceptions=False)
        assert r.exit_code == 0, r.output  # a quorum answered
        two_bad = ",".join(fresh3.urls[:1] + [f.url for f in fakes])
        for cmd in (["status"], ["ls"], ["show", "res"], ["graph"]):
            r = CliRunner().invoke(cli, [*cmd, "--namespace", NS, "--redis", two_bad,
                                         "--timeout", "0.5"], catch_exceptions=False)
            assert r.exit_code == 1, (cmd, r.output)
            assert "internal error" not in r.stderr, (cmd, r.stderr)
    finally:
        for f in fakes:
            f.close()
