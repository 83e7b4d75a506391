"""The deadlock detector and the `dlm` command on quorum members that are Redis Clusters
(issue 13, rule H2c): the members are two 3-primary clusters and one standalone server,
shared by the module and flushed before each test.

What users must see: the detector reads every shard of every member (each shard's waiter
index by that shard's clock, the scan per hash slot) and breaks a deadlock whose resources
live on different shards; `dlm status` lists each member's shards and exits 1 when a shard
cannot grant and that costs the quorum; `dlm ls/show/break/graph/top/namespaces/sweep/
init/run` work on cluster members as on standalone servers, reached by the same URLs.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from deadlocks import LEASE_MS
from redis_harness import RedisClusterServer, RedisServer
from redlockdlm_cli.main import cli

from redlockdlm import admin
from redlockdlm.detector import Detector
from redlockdlm.engine.instance import Engine
from redlockdlm.engine.keys import (
    check_namespace,
    key_slot,
    resource_key,
    slot_channel_prefix,
)
from redlockdlm.engine.modes import Status

pytestmark = pytest.mark.timeout(60)

NS = "t"


class Members:
    """Two cluster members and one standalone server, with an Engine on each (lock state
    built directly with `Engine.request`, as tests/deadlocks.py does for servers)."""

    def __init__(self, clusters: list[RedisClusterServer], server: RedisServer) -> None:
        self.clusters = clusters
        self.server = server
        self.engines: list[Engine] = []

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.clusters] + [self.server.url]

    def reset(self) -> None:
        for c in self.clusters:
            c.reset()
        if not self.server.running:
            self.server.start()
        with contextlib.closing(self.server.client()) as c:
            c.flushall()
        self.engines = [Engine(c.client(), NS) for c in self.clusters]
        self.engines.append(Engine(self.server.client(), NS))

    def fresh(self) -> None:
        for e in self.engines:
            e.init_fresh()

    def request(self, owner: str, lock_id: str, path: Sequence[str], mode: str, *,
                ticket: int, on: Sequence[int] | None = None) -> list[Status]:
        out = []
        for i in range(len(self.engines)) if on is None else on:
            e = self.engines[i]
            out.append(e.request(e.key(*path), owner, lock_id, mode, ticket=ticket,
                                 lease_ms=LEASE_MS, name=e.name(*path)).status)
        return out

    def queues(self, path: Sequence[str], lock_id: str) -> list[str | None]:
        out: list[str | None] = []
        for e in self.engines:
            _, (view,) = e.inspect([e.key(*path)])
            lk = None if view is None else next(
                (x for x in view.locks if x.lock_id == lock_id), None)
            out.append(None if lk is None else lk.queue)
        return out


def slot_of(name: str) -> int:
    return key_slot(resource_key(check_namespace(NS), [name.encode()]))


def on_shards(rc: RedisClusterServer, n: int) -> list[str]:
    """`n` root names whose hash slots are served by `n` different primaries of `rc`."""
    out: list[str] = []
    seen: set[int] = set()
    i = 0
    while len(out) < n:
        name = f"R{i}"
        node = rc.node_of_slot(slot_of(name))
        if node not in seen:
            seen.add(node)
            out.append(name)
        i += 1
    return out


@pytest.fixture(scope="module")
def layout() -> Iterator[tuple[list[RedisClusterServer], RedisServer]]:
    with contextlib.ExitStack() as stack:
        clusters = [stack.enter_context(RedisClusterServer(3)) for _ in range(2)]
        server = RedisServer()
        stack.callback(server.stop)
        yield clusters, server


@pytest.fixture
def m(layout: tuple[list[RedisClusterServer], RedisServer]) -> Iterator[Members]:
    members = Members(*layout)
    members.reset()
    members.fresh()
    yield members
    for e in members.engines:
        with contextlib.suppress(Exception):
            e.client.close()


def dlm(m: Members, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, [args[0], "--namespace", NS, "--redis", ",".join(m.urls),
                                    "--timeout", "2", *args[1:]], input=input)


def deadlock(m: Members) -> tuple[str, str]:
    """a holds r1 and waits for r2, b holds r2 and waits for r1, on every member; r1 and
    r2 are on different shards of each cluster member. Returns (r1, r2)."""
    r1, r2 = on_shards(m.clusters[0], 2)
    assert m.clusters[1].node_of_slot(slot_of(r1)) != m.clusters[1].node_of_slot(slot_of(r2))
    m.request("a", "a1", [r1], "EX", ticket=1)
    m.request("b", "b1", [r2], "EX", ticket=2)
    assert m.request("a", "a2", [r2], "EX", ticket=3) == [Status.QUEUED] * 3
    assert m.request("b", "b2", [r1], "EX", ticket=4) == [Status.QUEUED] * 3
    return r1, r2


class ShardListener:
    """Owner `owner`'s events about root `name` on every member: the shard channel of the
    name's slot on a cluster member (SSUBSCRIBE), the owner's channel on the server."""

    def __init__(self, m: Members, owner: str, name: str) -> None:
        self.subs: list[tuple[Any, bool]] = []
        slot = slot_of(name)
        for c in m.clusters:
            ps = c.client().pubsub()
            ps.ssubscribe(slot_channel_prefix(check_namespace(NS), slot) + owner.encode())
            self._confirm(ps, True)
            self.subs.append((ps, True))
        ps = m.engines[-1].client.pubsub()
        ps.subscribe(slot_channel_prefix(check_namespace(NS)) + owner.encode())
        self._confirm(ps, False)
        self.subs.append((ps, False))
        self.received: list[bytes] = []

    @staticmethod
    def _confirm(ps: Any, sharded: bool) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = (ps.get_sharded_message(timeout=0.2) if sharded
                   else ps.get_message(timeout=0.2))
            if msg is not None and msg["type"] in ("ssubscribe", "subscribe"):
                return
        raise AssertionError("no subscription confirmation")

    def wait_for(self, data: bytes, count: int, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while self.received.count(data) < count and time.monotonic() < deadline:
            for ps, sharded in self.subs:
                msg = (ps.get_sharded_message(timeout=0.05) if sharded
                       else ps.get_message(timeout=0.05))
                if msg is not None and msg["type"] in ("smessage", "message"):
                    self.received.append(msg["data"])
        return self.received

    def close(self) -> None:
        for ps, _ in self.subs:
            ps.close()


# ----------------------------------------------------------------- the detector


def test_detector_by_urls_breaks_a_deadlock_across_shards_of_cluster_members(m):
    """D1, D7, D8 over cluster members reached by their URLs (as `dlm detector` does): the
    cycle's two resources are on different shards of each cluster member; the first scan
    sees it, the second confirms it and cancels one waiting request on every member; its
    owner is told on the shard channel of the resource's slot."""
    r1, _ = deadlock(m)
    ev = ShardListener(m, "b", r1)
    try:
        with Detector(admin.connect(m.urls, NS, timeout_s=2.0), NS, 0.05,
                      reap_every=0) as det:
            first = det.run_once()
            assert [i.error for i in first.snapshot.instances] == [None] * 3
            assert first.snapshot.waiter_count == 2 and len(first.cycles) == 1
            (victim,) = det.run_once().victims
            assert (victim.request.owner, victim.request.lock_id) == ("b", "b2")
            assert victim.cancelled_on == 3
            assert m.queues([r1], "b2") == [None] * 3
            got = ev.wait_for(b"C|b2|deadlock", 3)
            assert got.count(b"C|b2|deadlock") == 3
            after = det.run_once()
            assert after.cycles == () and after.victims == ()
    finally:
        ev.close()


def test_detector_reads_each_shard_by_its_own_clock(m):
    """Each primary of a cluster member is a server with its own clock: a shard whose
    clock runs ahead past a waiter's lease sees that waiter dead and the others alive.
    The scan reads each shard's index by that shard's clock, so the cycle (whose waiters
    are on shards whose clocks agree) is still seen and the dead waiter is not."""
    r1, r2 = deadlock(m)
    (r3,) = [n for n in (f"S{i}" for i in range(200))
             if m.clusters[0].node_of_slot(slot_of(n)) not in
             {m.clusters[0].node_of_slot(slot_of(r1)), m.clusters[0].node_of_slot(slot_of(r2))}
             and m.clusters[1].node_of_slot(slot_of(n)) ==
             m.clusters[0].node_of_slot(slot_of(n))][:1]
    m.request("c", "c1", [r3], "EX", ticket=5)
    assert m.request("d", "d1", [r3], "EX", ticket=6) == [Status.QUEUED] * 3
    for e in m.engines[:2]:  # the third shard's clock (every slot it serves) runs ahead
        e.set_clock(offset_ms=LEASE_MS + 60_000, slot=slot_of(r3))
    with Detector(admin.connect(m.urls, NS), NS, 0.05, reap_every=0) as det:
        snap = det.run_once().snapshot
    per = [{lock_id for lock_id, _ in i.waiters} for i in snap.instances]
    assert per == [{"a2", "b2"}, {"a2", "b2"}, {"a2", "b2", "d1"}]


def test_detector_process_leads_and_breaks_a_cross_shard_deadlock(m):
    """`dlm detector` with leader election (the lock __leader__/detector taken through the
    quorum client on the cluster members) resolves the cross-shard deadlock."""
    r1, _ = deadlock(m)
    r = dlm(m, "detector", "--interval", "0.2", "--rounds", "4", "--lease", "3000")
    assert r.exit_code == 0, r.output
    assert m.queues([r1], "b2") == [None] * 3
    assert "event=victim" in r.output and "cancelled=3/3" in r.output, r.output


def test_dlm_graph_on_cluster_members(m):
    deadlock(m)
    r = dlm(m, "graph", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["cycles"]) == 1
    assert sorted(out["cycles"][0]["owners"]) == ["a", "b"]
    r = dlm(m, "graph", "--format", "dot")
    assert r.exit_code == 0 and "digraph" in r.output


# ----------------------------------------------------------------- dlm status


def test_dlm_status_lists_every_shard_of_each_cluster_member(m):
    r = dlm(m, "status")
    assert r.exit_code == 0, r.output
    for c in m.clusters:
        for node in c.nodes:
            assert f"{c.url} shard 127.0.0.1:{node.port}: slots " in r.output, r.output
    assert "3 of 3 instances reachable, 3 can grant, quorum 2: OK" in r.output
    r = dlm(m, "status", "--json")
    assert r.exit_code == 0, r.output
    inst = json.loads(r.output)["instances"]
    assert [len(i["shards"]) for i in inst] == [3, 3, 0]
    for i, c in zip(inst, m.clusters):
        assert sorted(sh["node"] for sh in i["shards"]) == sorted(
            f"127.0.0.1:{n.port}" for n in c.nodes)
        assert sorted(tuple(r) for sh in i["shards"] for r in sh["slots"]) == sorted(c.ranges)
        assert all(sh["epoch"] and sh["recovering_ms"] == 0 for sh in i["shards"])


def test_dlm_status_fails_when_a_restarted_shard_costs_the_quorum(m):
    """A shard primary restarted empty has lost its slots' epochs: its first call opens
    their rejoin window (E1). With the standalone member down, that cluster member's vote
    is needed: `dlm status` exits 1 naming the shard; with the window over, 0 again."""
    m.server.kill()
    assert dlm(m, "status").exit_code == 0
    c = m.clusters[0]
    c.restart_node_empty(1)
    lo = c.ranges[1][0]
    m.engines[0].client.close()
    m.engines[0] = Engine(c.client(), NS, rejoin_ms=1500)
    m.engines[0].status(lo)
    m.engines[0].raise_rejoin(1500, slot=lo)
    name = next(n for n in (f"W{i}" for i in range(500)) if c.node_of_slot(slot_of(n)) == 1)
    m.engines[0].request(m.engines[0].key(name), "z", "z1", "EX", ticket=1, lease_ms=1000,
                         name=m.engines[0].name(name))  # (opens that slot's window)
    r = dlm(m, "status")
    assert r.exit_code == 1, r.output
    node = f"127.0.0.1:{c.nodes[1].port}"
    assert f"shard {node}" in r.output and "NO GRANT POSSIBLE NOW" in r.output, r.output
    assert "1 of 3 instances can grant" in r.output or "can grant (quorum 2)" in r.output


def test_dlm_status_with_standalone_and_cluster_members_counts_each_member_once(m):
    deadlock(m)
    r = dlm(m, "status", "--json")
    assert r.exit_code == 0, r.output
    inst = json.loads(r.output)["instances"]
    # two waiters and two holders per member: a cluster member's are on two shards
    assert [(i["locks"], i["waiters"]) for i in inst] == [(4, 2)] * 3
    assert [sum(sh["waiters"] for sh in i["shards"]) for i in inst[:2]] == [2, 2]
    assert [sorted(sh["waiters"] for sh in i["shards"]) for i in inst[:2]] == [[0, 1, 1]] * 2


def test_dlm_init_fresh_marks_every_slot_of_a_cluster_member(m):
    """A brand-new cluster member (flushed: no epoch on any slot) is marked fresh by
    `dlm init --fresh`: every slot of every shard grants at once afterwards."""
    for c in m.clusters:
        c.flushall()
    r = dlm(m, "status")
    assert r.exit_code == 1 and "no epoch yet" in r.output, r.output
    r = dlm(m, "init", "--fresh", "--yes")
    assert r.exit_code == 0, r.output
    for e in m.engines[:2]:
        for slot in (0, 5460, 5461, 10922, 16383):
            st = e.status(slot)
            assert st.epoch and st.recovering_ms == 0
    assert dlm(m, "status").exit_code == 0


# ----------------------------------------------------------------- ls, show, break, ...


def test_dlm_ls_show_top_namespaces_on_cluster_members(m):
    r1, r2 = deadlock(m)
    r = dlm(m, "ls", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)["resources"]
    assert sorted(x["path"][0] for x in res) == sorted([r1, r2])
    assert all(not x["divergent"] and x["on"] == 3 for x in res), res
    r = dlm(m, "show", r1, "--json")
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert [lk["lock_id"] for lk in shown["granted"]] == ["a1"]
    assert [lk["lock_id"] for lk in shown["waiting"]] == ["b2"]
    r = dlm(m, "top", "--once", "--json")
    assert r.exit_code == 0, r.output
    r = dlm(m, "namespaces", "--json")
    assert r.exit_code == 0, r.output
    (ns,) = json.loads(r.output)["namespaces"]
    assert ns["namespace"] == NS
    assert sorted(ns["keys"].values()) == [2, 2, 2], ns  # (a cluster's: on two shards)


def test_dlm_break_on_cluster_members_tells_the_owner_on_the_shard_channel(m):
    r1, _ = deadlock(m)
    ev = ShardListener(m, "a", r1)
    try:
        r = dlm(m, "break", r1, "--lock", "a1", "--yes")
        assert r.exit_code == 0, r.output
        assert m.queues([r1], "a1") == [None] * 3
        assert m.queues([r1], "b2") == ["G"] * 3  # the waiter is granted in its place
        assert ev.wait_for(b"C|a1|broken", 3).count(b"C|a1|broken") == 3
    finally:
        ev.close()


def test_dlm_sweep_purges_dead_locks_on_every_shard(m):
    names = on_shards(m.clusters[0], 3)
    for i, n in enumerate(names):
        for e in m.engines:
            e.request(e.key(n), "gone", f"g{i}", "EX", ticket=i + 1, lease_ms=200,
                      name=e.name(n))
    time.sleep(0.3)
    r = dlm(m, "sweep", "--json")
    assert r.exit_code == 0, r.output
    for e in m.engines:
        assert [v for v in e.inspect([e.key(n) for n in names])[1] if v and v.locks] == []


def test_dlm_run_on_cluster_members(m):
    (name,) = on_shards(m.clusters[0], 1)
    r = dlm(m, "run", name, "--", "true")
    assert r.exit_code == 0, r.output


def test_a_cluster_member_down_is_one_instance_error_not_a_failure(m):
    """A cluster member none of whose nodes answers is that member's error; the others
    answer (quorum 2 of 3): dlm ls exits 0 with a warning."""
    for node in m.clusters[1].nodes:
        node.kill()
    with pytest.raises(redis.RedisError):
        redis.Redis.from_url(m.clusters[1].url, socket_connect_timeout=0.5).ping()
    r = dlm(m, "ls")
    assert r.exit_code == 0, r.output
    assert m.clusters[1].url in r.output
