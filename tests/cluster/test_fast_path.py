"""The clients' fast path to Redis Cluster members (issue 13), sync and asyncio: a call
goes on a connection of the client's own to its slot's primary, found in the slot map, as
a standalone member's call goes; what that path cannot deliver goes through redis-py's
cluster client. What a user sees: a slot moved while the client's map is stale still gets
its calls (MOVED followed) and the lock stays correct; a map that names an address where
nothing listens falls back to the cluster client; a stalled primary costs a renewal round
one socket timeout, however many of its slots hold locks; the common case does not go
through the cluster client at all; an idle asyncio client does not wake to read its shard
subscriptions, and still gets its events at once."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.cluster import PRIMARY, ClusterNode
from redis_harness import RedisClusterServer

from redlockdlm.errors import NotQueued

from .conftest import Members, slot_of

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def clusters() -> Iterator[list[RedisClusterServer]]:
    # a long node timeout: a primary paused for a few seconds is not failed over
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(RedisClusterServer(3, node_timeout_ms=15_000))
               for _ in range(3)]


@pytest.fixture(params=["sync", "async"])
def m(clusters: list[RedisClusterServer], request: pytest.FixtureRequest) -> Iterator[Members]:
    mm = Members(clusters, request.param)
    mm.reset()
    yield mm
    mm.close()


def _inner(d: Any) -> Any:
    """The DLM, or the AsyncDLM behind the asyncio facade."""
    return getattr(d, "adlm", d)


def _count_cluster_client_calls(d) -> list[int]:
    """Count the commands the client sends through redis-py's cluster clients (the
    asyncio client's count when they are called, before they are awaited)."""
    n = [0]
    for inst in _inner(d)._instances:
        rc = inst.cluster
        orig = rc.execute_command

        def counted(*a, _orig=orig, **kw):
            n[0] += 1
            return _orig(*a, **kw)

        rc.execute_command = counted
    return n


def test_common_case_does_not_go_through_the_cluster_client(m: Members) -> None:
    m.fresh(["c0", "c1", "c2"])
    d = m.dlm()
    for n in ("c0", "c1", "c2"):
        d.lock(n, "EX", timeout=5).release()  # (first calls: slots subscribed)
    calls = _count_cluster_client_calls(d)
    for _ in range(3):
        for n in ("c0", "c1", "c2"):
            with d.lock(n, "EX", timeout=5) as lk:
                assert lk.valid
    assert calls[0] == 0, f"{calls[0]} calls went through redis-py's cluster client"


def test_moved_after_resharding_is_followed_and_the_lock_stays_correct(m: Members) -> None:
    """The slot of a lock moves to another primary on EVERY member while both clients'
    maps still name the old one: their next calls meet MOVED, go through the cluster
    client, and land; exclusion holds; later calls take the fast path to the new primary."""
    n = "moving"
    s = slot_of(n)
    m.fresh([n])
    a = m.dlm(lease_ms=1000, rejoin_ms=1000)
    b = m.dlm(lease_ms=1000, rejoin_ms=1000)
    a.lock(n, "EX", timeout=5).release()
    b.lock(n, "EX", timeout=5).release()  # both maps know the slot's primary now
    moves = [(rc, rc.node_of_slot(s), (rc.node_of_slot(s) + 1) % len(rc))
             for rc in m.clusters]
    try:
        for rc, src, dst in moves:
            rc.migrate_slot(s, src, dst)
        # (the new primaries see epochs of another process: E2, a rejoin window to wait)
        lk = a.lock(n, "EX", timeout=8)
        assert lk.valid
        with pytest.raises(NotQueued):
            b.lock(n, "EX", noqueue=True)
        req = b.enqueue(n, "EX", timeout=8)
        lk.release()
        lb = req.wait(8)
        assert lb.valid
        lb.release()
        calls = _count_cluster_client_calls(a)
        a.lock(n, "EX", timeout=5).release()
        assert calls[0] == 0, "the map did not learn the slot's new primary"
    finally:
        for rc, src, dst in moves:
            rc.migrate_slot(s, dst, src)


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_a_route_to_nowhere_falls_back_to_the_cluster_client(m: Members) -> None:
    """Every member's map names, for the lock's slot, an address where nothing listens
    (a primary gone): the call is refused there, goes through the cluster client (which
    reads the map again), and the lock is granted; the map is right again afterwards."""
    n = "nowhere"
    s = slot_of(n)
    m.fresh([n])
    d = m.dlm()
    d.lock(n, "EX", timeout=5).release()
    for inst in _inner(d)._instances:
        cache = inst.cluster.nodes_manager.slots_cache
        if m.kind == "sync":
            cache[s] = [ClusterNode("127.0.0.1", _free_port(), PRIMARY)]
        else:
            kw = {k: v for k, v in cache[s][0].connection_kwargs.items()
                  if k not in ("host", "port")}
            cache[s] = [AsyncClusterNode("127.0.0.1", _free_port(), PRIMARY, **kw)]
    with d.lock(n, "EX", timeout=3) as lk:
        assert lk.valid
    for inst, rc in zip(_inner(d)._instances, m.clusters):
        node = inst.cluster.nodes_manager.get_node_from_slot(s)
        assert node.port == rc.nodes[rc.node_of_slot(s)].port


def test_a_stalled_primary_costs_a_renewal_one_timeout(m: Members) -> None:
    """Six locks on six slots of one primary of member 0, which then stops answering
    (SIGSTOP): a renewal round to member 0 takes about one socket timeout, not one per
    slot, and the locks stay held (the other members renew them)."""
    rc = m.clusters[0]
    names, j = [], 0
    while len(names) < 6:
        if rc.node_of_slot(slot_of(f"st{j}")) == 0:
            names.append(f"st{j}")
        j += 1
    assert len({slot_of(x) for x in names}) == 6
    m.fresh(names)
    timeout = 0.3
    d = m.dlm(lease_ms=3000, socket_timeout=timeout, connect_timeout=timeout)
    locks = [d.lock(x, "EX", timeout=5) for x in names]
    rounds: list[float] = []
    started: list[float] = []
    inner = _inner(d)
    orig = inner._pipeline

    def timed(i, calls):
        t0, stalled = time.monotonic(), rc.nodes[0].paused
        if i == 0 and stalled:
            started.append(t0)
        try:
            return orig(i, calls)
        finally:
            if i == 0 and stalled:
                rounds.append(time.monotonic() - t0)

    async def atimed(i, calls):
        t0, stalled = time.monotonic(), rc.nodes[0].paused
        if i == 0 and stalled:
            started.append(t0)
        try:
            return await orig(i, calls)
        finally:
            if i == 0 and stalled:
                rounds.append(time.monotonic() - t0)

    inner._pipeline = timed if m.kind == "sync" else atimed
    rc.nodes[0].pause()
    try:
        end = time.monotonic() + 3  # a tick each second; the old way took 6 x 0.3 s
        while not rounds and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        rc.nodes[0].resume()
    end = time.monotonic() + 10
    while len(rounds) < len(started) and time.monotonic() < end:
        time.sleep(0.05)  # (a round begun during the stop, still going)
    assert rounds, "no renewal round reached member 0 while its primary was stopped"
    assert max(rounds) < 2.5 * timeout, f"renewal rounds took {rounds} s"
    assert all(lk.valid for lk in locks)
    for lk in locks:
        lk.release()


def test_an_idle_async_client_does_not_wake_for_its_shards(m: Members) -> None:
    """An AsyncDLM whose shard subscriptions are open on three cluster members, idle for a
    second, reads none of them (it waits on their sockets: before, it polled each member's
    shards 20 times a second); a holder's release then still reaches a waiter at once by
    its event (lease 10 s: a missed event would be found only by a re-check seconds
    later)."""
    if m.kind == "sync":
        pytest.skip("the sync client's event thread waits on its sockets (selectors)")
    names = ["idle0", "idle1", "idle2"]
    m.fresh(names)
    a, b = m.dlm(), m.dlm()
    for x in names:  # (b's with on_blocking: their slots subscribed, N4, and left so)
        a.lock(x, "EX", timeout=5).release()
        b.lock(x, "EX", timeout=5, on_blocking=lambda mode: None).release()
    reads = [0]

    def count(ps: Any) -> None:
        orig = ps.get_sharded_message

        def counted(*args: Any, **kw: Any) -> Any:
            reads[0] += 1
            return orig(*args, **kw)

        ps.get_sharded_message = counted

    for inst in _inner(b)._instances:
        assert inst.shards is not None and inst.shards.slots
        count(inst.shards.ps)
    time.sleep(0.2)  # (the reads that were due)
    reads[0] = 0
    time.sleep(1.0)
    assert reads[0] <= 3, f"{reads[0]} reads of idle shard subscriptions in 1 s"
    held = a.lock("idle1", "EX", timeout=5)
    req = b.enqueue("idle1", "EX", timeout=8)
    time.sleep(0.2)
    t0 = time.monotonic()
    held.release()
    got = req.wait(8)
    assert time.monotonic() - t0 < 1.0, "the waiter was not woken by its event"
    got.release()
