"""Fixtures for the quorum clients over Redis Cluster members (issue 13).

- ``layout``: the quorum's members, module-scoped and parametrized: ``clusters`` (three
  members, each a Redis Cluster of 3 primaries) and ``mixed`` (two standalone servers and one
  3-primary cluster). Reset before each test (dead nodes restarted, everything flushed).
- ``kind``: the client, the sync ``DLM`` or ``AsyncDLM`` behind the blocking facade of
  ``tests/quorum/clients.py``.
- ``members``: the reset layout with helpers: ``dlm(**kw)`` (a client closed at teardown),
  ``fresh(names)`` (E1: the epochs of the hash slots of these root resources created safe on
  every member, as ``init_fresh`` does for a brand-new standalone server).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from quorum.clients import make_client
from redis_harness import RedisClusterServer, RedisServer

from redlockdlm.engine.keys import check_namespace, epoch_key, key_slot, resource_key
from redlockdlm.engine.scripts import command, load_command

NS = "ct"


def slot_of(name: str) -> int:
    return key_slot(resource_key(check_namespace(NS), (name.encode(),)))


class Members:
    """The quorum's members of one test: standalone servers and clusters, in URL order."""

    def __init__(self, members: list[Any], kind: str) -> None:
        self.members = members
        self.kind = kind
        self.dlms: list[Any] = []

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def clusters(self) -> list[RedisClusterServer]:
        return [m for m in self.members if isinstance(m, RedisClusterServer)]

    def reset(self) -> None:
        for m in self.members:
            if isinstance(m, RedisClusterServer):
                m.reset()
            else:
                if not m.running:
                    m.start()
                with contextlib.closing(m.client()) as c:
                    c.flushall()

    def fresh(self, names: list[str]) -> None:
        """E1: mark the epochs of these resources' slots safe at once on every member (a
        brand-new member), as `Engine.init_fresh` does for a whole standalone server."""
        for m in self.members:
            if isinstance(m, RedisClusterServer):
                c = m.client()
                c.execute_command(*load_command(), target_nodes=c.PRIMARIES)
                for s in sorted({slot_of(n) for n in names}):
                    c.execute_command(*command("init", [epoch_key(s)], [b"fresh", b""]))
            else:
                with contextlib.closing(m.client()) as c:
                    c.execute_command(*load_command())
                    c.execute_command(*command("init", [epoch_key()], [b"fresh", b""]))

    def need_cluster_votes(self) -> None:
        """Stop one standalone member, if any: a quorum then needs a cluster member's vote
        (with 2 standalone + 1 cluster, the two standalone servers alone are a quorum)."""
        for m in self.members:
            if not isinstance(m, RedisClusterServer):
                m.kill()
                return

    def raw(self, i: int) -> Any:
        """A raw client of member i (redis.RedisCluster for a cluster member)."""
        m = self.members[i]
        return m.client() if isinstance(m, RedisClusterServer) else m.client()

    def dlm(self, **kw: Any) -> Any:
        kw.setdefault("socket_timeout", 1.0)
        kw.setdefault("connect_timeout", 1.0)
        d = make_client(self.kind, self.urls, NS, **kw)
        self.dlms.append(d)
        return d

    def close(self) -> None:
        for d in self.dlms:
            with contextlib.suppress(Exception):
                d.close()
        self.dlms.clear()


@pytest.fixture(scope="module", params=["clusters", "mixed"])
def layout(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    with contextlib.ExitStack() as stack:
        if request.param == "clusters":
            members: list[Any] = [stack.enter_context(RedisClusterServer(3))
                                  for _ in range(3)]
        else:
            members = []
            for _ in range(2):
                s = RedisServer()
                stack.callback(s.stop)
                members.append(s)
            members.append(stack.enter_context(RedisClusterServer(3)))
        yield members


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def members(layout: list[Any], kind: str) -> Iterator[Members]:
    m = Members(layout, kind)
    m.reset()
    yield m
    m.close()
