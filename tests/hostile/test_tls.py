"""TLS: a DLM session (sync and asyncio) over rediss:// to redis-servers that speak TLS only.

The test makes its own CA and a server certificate for 127.0.0.1 with the `openssl` command
(the `cryptography` package is not a dependency), starts redis-server with
``--tls-port P --port 0 --tls-cert-file ... --tls-key-file ... --tls-ca-cert-file ...
--tls-auth-clients no`` and connects with ``DLM(["rediss://127.0.0.1:P"],
ssl_ca_certs=ca.pem)``: the keyword goes through to redis-py. A client that does not trust
the CA gets a typed QuorumUnavailable naming the certificate problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from redis_harness import find_redis_server, free_port
from redlockdlm_cli.main import cli

from redlockdlm import DLM, Mode
from redlockdlm.aio import AsyncDLM
from redlockdlm.engine.instance import Engine
from redlockdlm.errors import QuorumUnavailable

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

NS = "tls"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signed for IP 127.0.0.1 (EC keys: fast)."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=redlockdlm test CA", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
             cwd=d)
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


class TlsRedis:
    """One redis-server listening on a TLS port only (no plain port)."""

    def __init__(self, certs: dict[str, Path], d: Path) -> None:
        self.port = free_port()
        self.dir = d
        self.log = d / f"redis-{self.port}.log"
        cmd = [find_redis_server(), "--port", "0", "--tls-port", str(self.port),
               "--bind", "127.0.0.1", "--tls-cert-file", str(certs["cert"]),
               "--tls-key-file", str(certs["key"]), "--tls-ca-cert-file", str(certs["ca"]),
               "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
               "--dir", str(d), "--protected-mode", "no", "--loglevel", "warning"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=d)
        self.url = f"rediss://127.0.0.1:{self.port}"
        self.ca = str(certs["ca"])
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
            try:
                if self.client().ping():
                    return
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"no TLS PING: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, ssl_ca_certs=self.ca, socket_timeout=2,
                                    socket_connect_timeout=2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def tls3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TlsRedis]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    certs = make_certs(d)
    servers: list[TlsRedis] = []
    try:
        for _ in range(3):
            try:
                servers.append(TlsRedis(certs, d))
            except RuntimeError as exc:
                if "tls" in str(exc).lower() and not servers:
                    pytest.skip(f"redis-server without TLS support: {exc}")
                raise
        for s in servers:
            c = s.client()
            Engine(c, NS).init_fresh()
            c.close()
        yield servers
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()


def test_a_session_over_tls(tls3: list[TlsRedis]) -> None:
    urls, ca = [s.url for s in tls3], tls3[0].ca
    blocked: list[Mode] = []
    with DLM(urls, NS, lease_ms=1_000, ssl_ca_certs=ca) as a, \
            DLM(urls, NS, lease_ms=1_000, ssl_ca_certs=ca) as b:
        lk = a.lock("orders", Mode.EX, timeout=5, on_blocking=blocked.append)
        lk.value = b"over tls"
        req = b.enqueue("orders", Mode.PR, timeout=10)  # waits; a is told (pub/sub)
        deadline = time.monotonic() + 5
        while not blocked and time.monotonic() < deadline:
            time.sleep(0.02)
        assert blocked == [Mode.PR]
        time.sleep(1.2)  # leases of 1 s: renewed over TLS
        assert lk.valid and not req.done
        lk.release()
        got = req.wait(5)
        assert got.value == b"over tls" and got.valid
        child = got.lock("row", Mode.EX, timeout=5)
        assert child.valid
        got.release(subtree=True)


def test_an_asyncio_session_over_tls(tls3: list[TlsRedis]) -> None:
    urls, ca = [s.url for s in tls3], tls3[0].ca

    async def session() -> None:
        async with AsyncDLM(urls, NS, ssl_ca_certs=ca) as a, \
                AsyncDLM(urls, NS, ssl_ca_certs=ca) as b:
            lk = await a.lock("orders", Mode.EX, timeout=5)
            lk.value = b"async tls"
            req = await b.enqueue("orders", Mode.EX, timeout=10)
            await asyncio.sleep(0.2)
            assert not req.done
            await lk.release()
            got = await req.wait(5)
            assert got.value == b"async tls"
            await got.release()

    asyncio.run(session())


def test_an_untrusted_certificate_is_a_clear_typed_error(tls3: list[TlsRedis]) -> None:
    urls = [s.url for s in tls3]
    with DLM(urls, NS) as d, pytest.raises(QuorumUnavailable) as ei:  # system CAs only
        d.lock("orders", Mode.EX, timeout=5)
    assert "certificate verify failed" in str(ei.value), str(ei.value)
    plain = [u.replace("rediss://", "redis://") for u in urls]  # plain text to a TLS port
    with DLM(plain, NS, socket_timeout=0.5) as d, pytest.raises(QuorumUnavailable):
        d.lock("orders", Mode.EX, timeout=5)


def test_the_dlm_command_over_tls(tls3: list[TlsRedis], monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA as a URL option (redis-py passes unknown query names through), or through
    OpenSSL's SSL_CERT_FILE."""
    ca = tls3[0].ca
    with_ca = ",".join(f"{s.url}?ssl_ca_certs={ca}" for s in tls3)
    r = CliRunner().invoke(cli, ["status", "--namespace", NS, "--redis", with_ca],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    plain = ",".join(s.url for s in tls3)
    r = CliRunner().invoke(cli, ["status", "--namespace", NS, "--redis", plain],
                           catch_exceptions=False)
    assert r.exit_code == 1 and "certificate verify failed" in r.stderr, r.output
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    r = CliRunner().invoke(cli, ["ls", "--namespace", NS, "--redis", plain],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
