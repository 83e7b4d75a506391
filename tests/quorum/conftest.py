"""Fixtures for the quorum client tests: N real redis-servers, fresh and ready.

- ``instances1``/``cluster1``: the N = 1 counterpart of the root conftest's
  ``cluster3``/``cluster5`` (module-scoped servers, healed and flushed per test).
- ``ready(n)``: the module's ``cluster<n>`` healed, flushed and ``init_fresh``'ed (E1: a
  brand-new instance may grant at once), wrapped in a :class:`Quorum` helper that creates
  DLM clients (closed at teardown) and inspects every instance's lock database.
- ``q``: ``ready`` parametrized over N = 1, 3, 5 and over the two clients, the sync
  ``DLM`` and ``AsyncDLM`` (behind the blocking facade of ``clients.py``).
- ``closed_port()``: a loopback port nobody listens on.

A test about E1 or a restart does NOT use ``init_fresh`` on the restarted instance.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis_harness import HOST, Instances, RedisServer

from redlockdlm.engine.codec import LockView, ResourceView
from redlockdlm.engine.instance import Engine

from .clients import KINDS, aio_available, make_client

NS = "qt"


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, every: float = 0.01) -> Any:
    """Poll `pred` until it returns something truthy (returned) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {pred}")
        time.sleep(every)


class Quorum:
    """N fresh instances of one test, plus the DLM clients the test made."""

    def __init__(self, inst: Instances, ns: str = NS, kind: str = "sync") -> None:
        self.inst = inst
        self.ns = ns
        self.kind = kind
        self.dlms: list[Any] = []
        self._raw: list[redis.Redis] = []

    # ----------------------------------------------------------------- instances

    @property
    def n(self) -> int:
        return len(self.inst)

    @property
    def quorum(self) -> int:
        return self.n // 2 + 1

    @property
    def servers(self) -> list[RedisServer]:
        return list(self.inst)

    @property
    def urls(self) -> list[str]:
        return self.inst.urls

    def engine(self, i: int) -> Engine:
        c = self.inst[i].client(socket_timeout=3.0)
        self._raw.append(c)
        return Engine(c, self.ns)

    def init_fresh(self, i: int | None = None) -> None:
        for j in range(self.n) if i is None else [i]:
            self.engine(j).init_fresh()

    # ----------------------------------------------------------------- clients

    def dlm(self, urls: list[str] | None = None, **kw: Any) -> Any:
        """A client of this test's kind (sync DLM or the AsyncDLM facade), closed at
        teardown."""
        kw.setdefault("socket_timeout", 0.5)
        kw.setdefault("connect_timeout", 0.5)
        d = make_client(self.kind, self.urls if urls is None else urls, self.ns, **kw)
        self.dlms.append(d)
        return d

    def close(self) -> None:
        for d in self.dlms:
            with contextlib.suppress(Exception):
                getattr(d, "shutdown", d.close)()
        self.dlms.clear()
        for c in self._raw:
            with contextlib.suppress(Exception):
                c.close()
        self._raw.clear()

    # ----------------------------------------------------------------- inspection

    def key(self, *path: str) -> bytes:
        return Engine(None, self.ns).key(*path)  # type: ignore[arg-type]

    def views(self, *path: str, only: list[int] | None = None) -> list[ResourceView | None]:
        """The resource at `path` on each (running, unpaused) instance."""
        key = self.key(*path)
        out = []
        for i in range(self.n) if only is None else only:
            _, (view,) = self.engine(i).inspect([key])
            out.append(view)
        return out

    def locks(self, *path: str, only: list[int] | None = None) -> list[tuple[LockView, ...]]:
        return [v.locks if v is not None else () for v in self.views(*path, only=only)]

    def lock_ids(self, *path: str, only: list[int] | None = None) -> list[set[str]]:
        return [{lv.lock_id for lv in locks} for locks in self.locks(*path, only=only)]

    def gone(self, *path: str, only: list[int] | None = None) -> bool:
        """True when the resource holds no lock on any instance."""
        return all(not locks for locks in self.locks(*path, only=only))

    def granted_on(self, lock_id: str, *path: str) -> int:
        """On how many instances `lock_id` is in the granted queue."""
        return sum(1 for locks in self.locks(*path)
                   if any(lv.lock_id == lock_id and lv.queue == "G" for lv in locks))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def instances1() -> Iterator[Instances]:
    with Instances(1) as inst:
        yield inst


@pytest.fixture
def cluster1(instances1: Instances) -> Instances:
    instances1.reset()
    return instances1


@pytest.fixture
def ready(request: pytest.FixtureRequest) -> Iterator[Callable[..., Quorum]]:
    """``ready(n, kind="sync")``: n fresh instances (healed, flushed, init_fresh'ed) as a
    Quorum whose clients are of `kind`."""
    made: list[Quorum] = []

    def _ready(n: int, kind: str = "sync") -> Quorum:
        if kind == "async" and not aio_available():
            pytest.skip("redlockdlm.aio is not there yet")
        inst = request.getfixturevalue(f"cluster{n}")
        qu = Quorum(inst, kind=kind)
        qu.init_fresh()
        made.append(qu)
        return qu

    yield _ready
    for qu in made:
        qu.close()
        for s in qu.servers:  # leave no paused server behind for the next test
            with contextlib.suppress(Exception):
                s.heal()


@pytest.fixture(params=[(k, n) for k in KINDS for n in (1, 3, 5)],
                ids=lambda p: f"{p[0]}-N{p[1]}")
def q(request: pytest.FixtureRequest, ready: Callable[..., Quorum]) -> Quorum:
    kind, n = request.param
    return ready(n, kind)


@pytest.fixture(params=KINDS)
def q3(request: pytest.FixtureRequest, ready: Callable[..., Quorum]) -> Quorum:
    return ready(3, request.param)


def closed_port() -> int:
    """A loopback port with no listener (bound then closed; nobody takes it meanwhile in
    practice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]
