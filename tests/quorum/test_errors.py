"""Typed errors: too few instances answering, and bad input (docs/design.md §9).

Every error is a DLMError and, for bad input, also a ValueError or TypeError; after bad
input the lock database is untouched and the same client keeps working.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from redlockdlm import Mode
from redlockdlm.errors import (
    DLMError,
    InvalidArgument,
    InvalidType,
    QuorumUnavailable,
)

from .clients import make_client
from .conftest import Quorum, closed_port

EX = Mode.EX

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- quorum


def test_quorum_unavailable_when_too_few_answer(q: Quorum) -> None:
    """Q - 1 live instances and the rest closed ports: QuorumUnavailable (a
    ConnectionError) naming the instances that did not answer; without a timeout at once,
    with one at that timeout (R3: a refused connection may be an instance restarting, so a
    wait goes on until its timeout), and nothing left on the live ones."""
    live = q.quorum - 1
    urls = q.urls[:live] + [f"redis://127.0.0.1:{closed_port()}" for _ in range(q.n - live)]
    d = q.dlm(urls=urls)
    t0 = time.monotonic()
    with pytest.raises(QuorumUnavailable):
        d.lock("res", EX)
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    with pytest.raises(QuorumUnavailable) as ei:
        d.lock("res", EX, timeout=1)
    assert 1 <= time.monotonic() - t0 < 5
    assert all(u in str(ei.value) for u in urls[live:]), str(ei.value)
    assert isinstance(ei.value, ConnectionError) and isinstance(ei.value, DLMError)
    assert ei.value.resource == "res"
    if live:
        assert q.gone("res", only=list(range(live)))


def test_quorum_is_enough(q: Quorum) -> None:
    """Q live instances out of N (the others closed ports) still grant."""
    urls = q.urls[: q.quorum] + [f"redis://127.0.0.1:{closed_port()}"
                                 for _ in range(q.n - q.quorum)]
    d = q.dlm(urls=urls)
    lk = d.lock("res", EX, timeout=10)
    assert lk.valid and lk.mode == EX
    lk.release()
    assert q.gone("res", only=list(range(q.quorum)))


def test_all_ports_closed(q: Quorum) -> None:
    d = q.dlm(urls=[f"redis://127.0.0.1:{closed_port()}" for _ in range(q.n)])
    with pytest.raises(QuorumUnavailable):
        d.lock("res", EX)
    with pytest.raises(QuorumUnavailable):
        d.enqueue("res", EX).wait(5)


class NotRedis:
    """A TCP server on loopback that answers every connection with an HTTP response."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(1)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.stop = True
        self.sock.close()


def test_an_instance_that_is_not_redis(q3: Quorum) -> None:
    """One of three 'instances' is an HTTP server: it counts as a failed instance, the two
    real ones make the quorum, and nothing but typed errors ever escapes."""
    fake = NotRedis()
    try:
        d = q3.dlm(urls=q3.urls[:2] + [f"redis://127.0.0.1:{fake.port}"])
        lk = d.lock("res", EX, timeout=10)
        assert lk.valid
        lk.release()
        # With two of three fake, the error is QuorumUnavailable, not a redis-py error.
        d2 = q3.dlm(urls=q3.urls[:1] + [f"redis://127.0.0.1:{fake.port}"] * 2)
        with pytest.raises(QuorumUnavailable):
            d2.lock("res", EX, timeout=10)
    finally:
        fake.close()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mode, exc", [
    ("ZZ", ValueError), (9, ValueError), (-1, ValueError), (None, TypeError),
    (1.5, TypeError), (True, TypeError), (b"EX", TypeError),
])
def test_bad_mode(q3: Quorum, mode: object, exc: type) -> None:
    d = q3.dlm()
    with pytest.raises(exc) as ei:
        d.lock("res", mode)
    assert isinstance(ei.value, DLMError)
    assert q3.gone("res") and not d._core.locks
    assert d.lock("res", "pw").mode == Mode.PW  # names are case-insensitive; still works


def test_bad_convert_mode(q3: Quorum) -> None:
    lk = q3.dlm().lock("res", Mode.PR)
    with pytest.raises(InvalidArgument):
        lk.convert("XX")
    with pytest.raises(InvalidType):
        lk.convert(None)
    assert lk.mode == Mode.PR and lk.valid
    assert all([lv.mode for lv in ls] == [Mode.PR] for ls in q3.locks("res"))


@pytest.mark.parametrize("urls, exc", [
    (["http://x"], ValueError),
    (["redis://127.0.0.1:notaport"], ValueError),
    (["127.0.0.1:6379"], ValueError),
    ([42], TypeError),
    ([], ValueError),
])
def test_bad_urls(kind: str, urls: list, exc: type) -> None:
    with pytest.raises(exc) as ei:
        make_client(kind, urls, "qt")
    assert isinstance(ei.value, DLMError)


def test_even_number_of_instances(q3: Quorum) -> None:
    with pytest.raises(ValueError) as ei:
        make_client(q3.kind, q3.urls[:2], "qt")
    assert isinstance(ei.value, DLMError)


@pytest.mark.parametrize("lease, exc", [
    (-1, ValueError), (0, ValueError), (10**12, ValueError), ("1000", TypeError),
    (1.5, TypeError),
])
def test_bad_lease(q3: Quorum, lease: object, exc: type) -> None:
    with pytest.raises(exc) as ei:
        make_client(q3.kind, q3.urls, "qt", lease_ms=lease)
    assert isinstance(ei.value, DLMError)
    d = q3.dlm()
    with pytest.raises(exc) as ei:
        d.lock("res", EX, lease_ms=lease)
    assert isinstance(ei.value, DLMError)
    assert q3.gone("res") and not d._core.locks


@pytest.mark.parametrize("timeout, exc", [(-1, ValueError), ("1", TypeError)])
def test_bad_timeout(q3: Quorum, timeout: object, exc: type) -> None:
    d = q3.dlm()
    with pytest.raises(exc) as ei:
        d.lock("res", EX, timeout=timeout)
    assert isinstance(ei.value, DLMError)
    assert q3.gone("res")


@pytest.mark.parametrize("name, exc", [
    ("", ValueError), ("x" * 1025, ValueError), ("a\x00b", ValueError), (None, TypeError),
    (42, TypeError),
])
def test_bad_resource_name(q3: Quorum, name: object, exc: type) -> None:
    d = q3.dlm()
    with pytest.raises(exc) as ei:
        d.lock(name, EX)
    assert isinstance(ei.value, DLMError)
    assert not d._core.locks


def test_bad_namespace(kind: str, cluster3) -> None:
    for ns, exc in [("a b", ValueError), ("", ValueError), (None, TypeError)]:
        with pytest.raises(exc) as ei:
            make_client(kind, cluster3.urls, ns)
        assert isinstance(ei.value, DLMError)


def test_oversized_value_block(q3: Quorum) -> None:
    keeper = q3.dlm().lock("res", Mode.NL)
    d = q3.dlm()
    lk = d.lock("res", EX)
    lk.value = b"x" * 64  # the limit itself is fine
    with pytest.raises(ValueError) as ei:
        lk.value = b"x" * 65
    assert isinstance(ei.value, DLMError)
    with pytest.raises(TypeError) as ei:
        lk.value = "text"
    assert isinstance(ei.value, DLMError)
    token = lk.token
    lk.release()  # the accepted 64 bytes are written, never truncated
    r = q3.dlm().lock("res", Mode.PR)
    assert r.value == b"x" * 64 and r.version == token * 4  # protocol.next_version
    r.release()
    keeper.release()


def test_configured_value_block_limit(q3: Quorum) -> None:
    keeper = q3.dlm().lock("res", Mode.NL)
    d = q3.dlm(vbmax=8)
    lk = d.lock("res", EX)
    with pytest.raises(InvalidArgument):
        lk.value = b"123456789"
    lk.value = b"12345678"
    lk.release()
    assert q3.dlm().lock("res", Mode.PR).value == b"12345678"
    keeper.release()


def test_bad_parent(q3: Quorum) -> None:
    d = q3.dlm()
    with pytest.raises(TypeError) as ei:
        d.lock("row", EX, parent="db/orders")
    assert isinstance(ei.value, DLMError)


def test_expedite_only_for_nl(q3: Quorum) -> None:
    d = q3.dlm()
    with pytest.raises(ValueError):
        d.lock("res", EX, expedite=True)
    blocker = q3.dlm().lock("res", EX)
    waiter = q3.dlm().enqueue("res", EX)
    nl = d.lock("res", Mode.NL, expedite=True, timeout=5)  # past the queue (G3)
    assert nl.mode == Mode.NL
    assert not waiter.done
    blocker.release()
    waiter.wait(5)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    from .clients import aio_available

    if request.param == "async" and not aio_available():
        pytest.skip("redlockdlm.aio is not there yet")
    return request.param
