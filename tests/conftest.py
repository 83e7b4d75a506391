"""Shared pytest fixtures: real redis-server processes on free loopback ports.

See ``redis_harness.py`` for the harness itself. Fixtures:

- ``redis_server``: a fresh RedisServer per test.
- ``redis_session`` + ``r``: one server for the whole session; ``r`` FLUSHALLs it and
  returns a client.
- ``instances3`` / ``instances5``: 3 or 5 servers per module; ``cluster3`` / ``cluster5``
  heal (resume / restart) and FLUSHALL them before each test and return the Instances.
- ``make_instances``: factory ``make_instances(n, extra_args=())`` torn down after the test.
- ``cluster_member``: one Redis Cluster of 3 primaries (a quorum member that is a cluster)
  per module; ``redis_cluster`` restarts any node a test killed, FLUSHALLs it before each
  test and returns the RedisClusterServer. ``make_cluster``: factory
  ``make_cluster(n_primaries=3)`` torn down after the test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from redis_harness import Instances, RedisClusterServer, RedisServer  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """The fixtures of redlockdlm.testing (tests/test_testing.py) come from the `pytest11`
    entry point of an installed redlockdlm; a checkout whose .venv predates that entry point
    (setup.sh not run again) gets them here instead."""
    if not config.pluginmanager.has_plugin("redlockdlm"):
        from redlockdlm import pytest_plugin

        config.pluginmanager.register(pytest_plugin, "redlockdlm-fixtures")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def r(redis_session: RedisServer) -> Iterator[redis.Redis]:
    redis_session.heal()
    redis_session.flushall()
    client = redis_session.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def instances3() -> Iterator[Instances]:
    with Instances(3) as inst:
        yield inst


@pytest.fixture
def cluster3(instances3: Instances) -> Instances:
    instances3.reset()
    return instances3


@pytest.fixture(scope="module")
def instances5() -> Iterator[Instances]:
    with Instances(5) as inst:
        yield inst


@pytest.fixture
def cluster5(instances5: Instances) -> Instances:
    instances5.reset()
    return instances5


@pytest.fixture
def make_instances() -> Iterator[Callable[..., Instances]]:
    created: list[Instances] = []

    def _make(n: int, extra_args: Sequence[str] = (), **kwargs: object) -> Instances:
        inst = Instances(n, extra_args, **kwargs)
        created.append(inst)
        return inst

    yield _make
    for inst in created:
        inst.stop()


@pytest.fixture(scope="module")
def cluster_member() -> Iterator[RedisClusterServer]:
    with RedisClusterServer(3) as rc:
        yield rc


@pytest.fixture
def redis_cluster(cluster_member: RedisClusterServer) -> RedisClusterServer:
    cluster_member.reset()
    return cluster_member


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., RedisClusterServer]]:
    created: list[RedisClusterServer] = []

    def _make(n: int = 3, **kwargs: object) -> RedisClusterServer:
        rc = RedisClusterServer(n, **kwargs)  # type: ignore[arg-type]
        created.append(rc)
        return rc

    yield _make
    for rc in created:
        rc.stop()
