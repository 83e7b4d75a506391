"""One quorum member that is a Redis Cluster (rule H2c), on a real cluster of 3 primaries.

Every per-instance name exists once per hash slot there: the epoch hash, the waiter index and
the event channels of a resource are those of its slot, so every script touches ONE slot.
What a user sees must not change: the grant rules' scenarios of test_rules.py run here as
they run on a standalone server. And what the epoch means now holds per slot: a primary
restarted empty starts new epochs, in their rejoin window, for its slots only; a slot that
migrates to another shard carries an epoch made by another process, which is replaced (E2).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from redis_harness import RedisClusterServer, RedisServer

from engine.test_rules import (
    CHILD,
    EX,
    GRANTED,
    LEASE,
    NS,
    OTHER,
    PR,
    QUEUED,
    RECOVERING,
    RELEASED,
    RES,
    ROOT,
    SCENARIOS,
    T0,
    Case,
    R,
    World,
    run,
)
from engine.test_rules import test_scenario as scenario_check
from redlockdlm.engine import codec
from redlockdlm.engine.instance import Engine, call_cluster_script, call_script
from redlockdlm.engine.keys import (
    EPOCH_KEY,
    epoch_key,
    key_slot,
    slot_channel_prefix,
    slot_tag,
    slot_waiters_key,
)
from redlockdlm.errors import BadArgument, InvalidArgument, MissingKeys, NotFresh

pytestmark = pytest.mark.timeout(60)


class ClusterWorld(World):
    """test_rules' World on a cluster member: the clock is frozen on the slots the
    scenarios use (RES, OTHER and the ROOT tree), and a snapshot reads every primary."""

    def __init__(self, rc: RedisClusterServer, e: Engine) -> None:
        super().__init__(e.client, e)
        self.rc = rc
        self.slots = sorted({e.slot_of(e.key(*res)) for res in (RES, OTHER, ROOT)})

    def tick(self, ms: int) -> None:
        self.now += ms
        for s in self.slots:
            self.e.set_clock(frozen_ms=self.now, slot=s)

    def snapshot(self) -> tuple:
        keys = sorted(k for node in self.rc.nodes for k in node.client().keys(b"*"))
        rkeys = [k for k in keys if k.startswith(b"dlm:{")]
        raws = [call_cluster_script(self.r, "inspect", [epoch_key(key_slot(k)), k], [])
                for k in rkeys]
        epochs = [self.r.hgetall(epoch_key(s)) for s in self.slots]
        return keys, raws, sorted(self.e.waiters()), epochs

    def raw(self, script: str, keys: list[bytes], args: list[bytes]) -> Any:
        slot = key_slot(keys[0])
        return call_cluster_script(self.r, script, [epoch_key(slot),
                                                    slot_waiters_key(self.e.ns, slot), *keys],
                                   args)


@pytest.fixture
def cw(redis_cluster: RedisClusterServer) -> ClusterWorld:
    e = Engine(redis_cluster.client(), NS)
    w = ClusterWorld(redis_cluster, e)
    for s in w.slots:
        e.init_fresh(slot=s)
    w.tick(0)
    return w


def other_node_key(rc: RedisClusterServer, e: Engine, key: bytes) -> bytes:
    """A root resource key whose slot another primary serves than `key`'s."""
    node = rc.node_of_slot(e.slot_of(key))
    for i in range(1000):
        k = e.key(f"other-{i}")
        if rc.node_of_slot(e.slot_of(k)) != node:
            return k
    raise AssertionError("no key of another shard")


# ----------------------------------------------------------------- H2c: the rules, unchanged


def test_h2c_the_scenarios_use_slots_of_every_shard(cw: ClusterWorld) -> None:
    assert len({cw.rc.node_of_slot(s) for s in cw.slots}) >= 2


@pytest.mark.parametrize("c", SCENARIOS)
def test_scenario_on_a_cluster_member(cw: ClusterWorld, c: Case) -> None:
    """Every grant-rule scenario (M1, G*, H*, V*, F1, N*, Y1, ...) decides on a cluster
    member exactly as on a standalone server."""
    scenario_check(cw, c)


def test_h2c_hierarchy_break_and_fencing_on_a_cluster(cw: ClusterWorld) -> None:
    run(cw, [R("p", EX, 1, res=ROOT, owner="o1"), R("c", EX, 2, res=CHILD, parent="p",
                                                    owner="o1")])
    tok = cw.lock("c").token
    rep = cw.e.break_(cw.key(ROOT), lock_id="p")
    assert sorted(b.lock_id for b in rep.broken) == ["c", "p"]
    assert cw.view(CHILD) is None or not cw.view(CHILD).locks
    got = R("c2", EX, 3, res=CHILD, owner="o2")(cw)
    assert got.status == GRANTED and got.token > tok  # F1 across the break


# ----------------------------------------------------------------- events: sharded pub/sub


def test_n2_grant_event_reaches_the_waiter_by_sharded_pubsub(cw: ClusterWorld) -> None:
    e, k = cw.e, cw.key(RES)
    chan = slot_channel_prefix(e.ns, e.slot_of(k))
    ps = cw.r.pubsub()
    ps.ssubscribe(chan + b"o2")
    deadline = time.monotonic() + 5
    while (m := ps.get_sharded_message(timeout=1.0)) is None or m["type"] != "ssubscribe":
        assert time.monotonic() < deadline
    assert e.request(k, "o1", "a", EX, ticket=1, lease_ms=LEASE).status == GRANTED
    assert e.request(k, "o2", "b", EX, ticket=2, lease_ms=LEASE).status == QUEUED
    assert e.release(k, "o1", "a").status == RELEASED
    while (m := ps.get_sharded_message(timeout=1.0)) is None:
        assert time.monotonic() < deadline, "no grant event"
    ev = codec.parse_event(m["data"])
    assert (m["channel"], ev.lock_id) == (chan + b"o2", "b")
    ps.close()


# ----------------------------------------------------------------- renew: one call per slot


def test_renew_of_locks_in_two_slots_is_refused_whole(redis_cluster: RedisClusterServer) -> None:
    e = Engine(redis_cluster.client(), NS)
    k1 = e.key("a")
    k2 = other_node_key(redis_cluster, e, k1)
    e.init_fresh()
    e.set_clock(frozen_ms=T0)
    e.request(k1, "o", "l1", EX, ticket=1, lease_ms=1000)
    e.request(k2, "o", "l2", EX, ticket=2, lease_ms=1000)
    with pytest.raises(InvalidArgument):
        e.renew("o", 50_000, [(k1, "l1", 0), (k2, "l2", 0)])
    assert [lk.lease_left_ms for k in (k1, k2) for lk in e.inspect([k])[1][0].locks] == [1000] * 2
    got = e.renew_slots("o", 50_000, [(k1, "l1", 0), (k2, "l2", 0)])
    assert set(got) == {e.slot_of(k1), e.slot_of(k2)}
    for slot, (epoch, entries) in got.items():
        assert epoch == e.status(slot).epoch
        assert [(n, en.status) for n, en in entries] == [
            (0 if slot == e.slot_of(k1) else 1, GRANTED)]
    assert [lk.lease_left_ms for k in (k1, k2) for lk in e.inspect([k])[1][0].locks] == [50_000] * 2


# ----------------------------------------------------------------- E1, E2 per slot


def test_e1_each_slot_recovers_until_init_fresh(redis_cluster: RedisClusterServer) -> None:
    e = Engine(redis_cluster.client(), NS, rejoin_ms=5_000)
    k1 = e.key("a")
    k2 = other_node_key(redis_cluster, e, k1)
    assert e.request(k1, "o", "l", EX, ticket=1, lease_ms=LEASE).status == RECOVERING
    with pytest.raises(NotFresh):  # that slot's epoch was created by use: left recovering,
        e.init_fresh()             # every other slot marked fresh
    assert e.status(e.slot_of(k1)).recovering_ms > 0
    st = e.status(e.slot_of(k2))
    assert st.epoch is not None and st.recovering_ms == 0
    assert e.request(k2, "o", "l", EX, ticket=1, lease_ms=LEASE).status == GRANTED
    for slot in (0, 5000, 16383):  # every slot, on every shard
        assert e.status(slot).recovering_ms == 0 and e.status(slot).epoch


def test_e1_a_primary_restarted_empty_recovers_its_slots_only(
        redis_cluster: RedisClusterServer) -> None:
    """A shard primary restarted empty while locks are held: its slots' epochs are new and
    in their rejoin window (nothing granted there until it ends), the other shards' slots
    keep their epochs and their locks."""
    rc = redis_cluster
    e = Engine(rc.client(), NS, rejoin_ms=60_000)
    e.init_fresh()
    a = e.key("a")
    b = other_node_key(rc, e, a)
    before = {k: e.status(e.slot_of(k)).epoch for k in (a, b)}
    for k in (a, b):
        assert e.request(k, "o1", "held", EX, ticket=1, lease_ms=LEASE).status == GRANTED
    rc.restart_node_empty(rc.node_of_slot(e.slot_of(a)))
    e2 = Engine(rc.client(), NS, rejoin_ms=60_000)
    rep = e2.request(a, "o2", "x", EX, ticket=2, lease_ms=LEASE)
    assert rep.status == RECOVERING and rep.extra > 0
    assert rep.epoch != before[a]
    st = e2.status(e2.slot_of(a))
    assert st.epoch == rep.epoch and st.recovering_ms > 0
    rep = e2.request(b, "o2", "x", EX, ticket=2, lease_ms=LEASE)
    assert rep.status == QUEUED and rep.epoch == before[b]  # the lock held there stands




def test_e2_a_slot_migrated_to_another_shard_gets_a_new_epoch(
        redis_cluster: RedisClusterServer) -> None:
    """Resharding while a lock is held loses it visibly: the slot's epoch was made by the
    process it left, so the shard it reaches replaces it by a new one in its rejoin window
    (E2), even though that shard's library already serves epochs of its own."""
    rc = redis_cluster
    e = Engine(rc.client(), NS, rejoin_ms=60_000)
    e.init_fresh()
    a = e.key("a")
    b = other_node_key(rc, e, a)
    src, dst = rc.node_of_slot(e.slot_of(a)), rc.node_of_slot(e.slot_of(b))
    assert e.request(a, "o1", "held", EX, ticket=1, lease_ms=LEASE).status == GRANTED
    assert e.request(b, "o1", "warm", PR, ticket=1, lease_ms=LEASE).status == GRANTED
    old = e.status(e.slot_of(a)).epoch
    try:
        rc.migrate_slot(e.slot_of(a), src, dst)
        e2 = Engine(rc.client(), NS, rejoin_ms=60_000)
        assert e2.client.get_node_from_key(a).port == rc.nodes[dst].port
        rep = e2.request(a, "o2", "x", EX, ticket=2, lease_ms=LEASE)
        assert rep.status == RECOVERING and rep.epoch != old
        assert e2.inspect([a])[1][0].locks[0].lock_id == "held"  # kept, but not trusted
        # the destination's own slots are untouched
        assert e2.request(b, "o2", "y", PR, ticket=3, lease_ms=LEASE).status == GRANTED
    finally:
        rc.migrate_slot(e.slot_of(a), dst, src)  # (the module's cluster as created)


# ----------------------------------------------------------------- K1: each server its layout


def test_k1_a_standalone_server_refuses_the_cluster_layout(redis_server: RedisServer) -> None:
    r = redis_server.client()
    e = Engine(r, NS)
    e.init_fresh()
    k = e.key("a")
    s = key_slot(k)
    args = codec.request_args(30_000, slot_channel_prefix(e.ns, s), "o", "l", EX, 0, 1, LEASE,
                              "", b"", 0)
    keys_before = sorted(r.keys(b"*"))
    with pytest.raises(MissingKeys):
        call_script(r, "request", [epoch_key(s), slot_waiters_key(e.ns, s), k, k], args)
    for script, extra in (("init", [b"status"]), ("inspect", [])):
        with pytest.raises(MissingKeys):
            call_script(r, script, [epoch_key(s)], extra)
    assert sorted(r.keys(b"*")) == keys_before
    assert e.request(k, "o", "l", EX, ticket=1, lease_ms=LEASE).status == GRANTED


def _same_slot_tag(slot: int) -> bytes:
    """A tag of `slot` other than its canonical one."""
    canon = slot_tag(slot)
    for j in range(int(canon) + 1, 10_000_000):
        t = b"%d" % j
        if key_slot(t) == slot:
            return t
    raise AssertionError("unreachable")


def test_k1_a_cluster_member_refuses_the_standalone_layout(
        redis_cluster: RedisClusterServer) -> None:
    c = redis_cluster.client()
    e = Engine(c, NS)
    k = e.key("a")
    s = key_slot(k)
    ep, wk = epoch_key(s), slot_waiters_key(e.ns, s)

    def req(keys: list[bytes], chan: bytes) -> None:
        call_cluster_script(c, "request", [*keys, k, k], codec.request_args(
            30_000, chan, "o", "l", EX, 0, 1, LEASE, "", b"", 0))

    for script, extra in (("init", [b"status"]), ("inspect", [])):
        with pytest.raises(MissingKeys):
            call_cluster_script(c, script, [EPOCH_KEY], extra)
    # a waiter index with another tag of the same slot: a second epoch would be possible
    other = _same_slot_tag(s)
    with pytest.raises(MissingKeys):
        req([ep, slot_waiters_key(e.ns) + b":{" + other + b"}"], slot_channel_prefix(e.ns, s))
    with pytest.raises(MissingKeys):
        req([b"dlm:epoch:{" + other + b"}", wk], slot_channel_prefix(e.ns, s))
    with pytest.raises(BadArgument):  # the standalone channel prefix
        req([ep, wk], b"dlm:" + e.ns + b":ch:")
    # a plain client on one node sends the standalone layout: Redis refuses its keys of
    # three slots (CROSSSLOT) before the script runs
    with pytest.raises(redis.exceptions.ResponseError, match="same slot"):
        node = redis_cluster.node_of_slot(s)
        Engine(redis_cluster.nodes[node].client(), NS).request(k, "o", "l", EX, ticket=1,
                                                               lease_ms=LEASE)
    assert [n.client().dbsize() for n in redis_cluster.nodes] == [0, 0, 0]
    assert e.request(k, "o", "l", EX, ticket=1, lease_ms=LEASE).status in (GRANTED, RECOVERING)


def test_standalone_calls_take_no_slot_and_cluster_calls_need_one(
        redis_server: RedisServer, redis_cluster: RedisClusterServer) -> None:
    with pytest.raises(InvalidArgument):
        Engine(redis_server.client(), NS).status(slot=3)
    with pytest.raises(InvalidArgument):
        Engine(redis_cluster.client(), NS).status()


# ----------------------------------------------------------------- waiter index over shards


def test_d1_waiters_of_every_shard_are_read(redis_cluster: RedisClusterServer) -> None:
    rc = redis_cluster
    e = Engine(rc.client(), NS)
    e.init_fresh()
    keys = [e.key(f"w{i}") for i in range(12)]
    assert len({rc.node_of_slot(e.slot_of(k)) for k in keys}) == 3
    for i, k in enumerate(keys):
        e.request(k, "holder", f"h{i}", EX, ticket=1, lease_ms=LEASE)
        assert e.request(k, "waiter", f"w{i}", EX, ticket=2, lease_ms=LEASE).status == QUEUED
    want = sorted(b"w%d|" % i + k for i, k in enumerate(keys))
    assert sorted(m for m, _ in e.waiters()) == want
    now = e.status(0).now_ms
    assert sorted(e.live_waiters(now)) == want
    assert e.stale_waiters(now + LEASE + 1000, 100) and len(e.stale_waiters(now, 100)) == 0
    m, score = e.waiters()[0]
    assert e.drop_waiter(m, score) and m not in [x for x, _ in e.waiters()]
    assert sorted(e.resource_keys()) == sorted(keys)


# ----------------------------------------------------------------- dlm status: the shards


def test_status_shows_each_shard_of_a_cluster_member(redis_cluster: RedisClusterServer) -> None:
    from redlockdlm import admin

    rc = redis_cluster
    e = Engine(rc.client(), NS)
    e.init_fresh()
    keys = [e.key(f"s{i}") for i in range(12)]
    for i, k in enumerate(keys):
        e.request(k, "holder", f"h{i}", EX, ticket=1, lease_ms=LEASE)
        e.request(k, "waiter", f"w{i}", EX, ticket=2, lease_ms=LEASE)
    (out,) = admin.health([admin.Target(rc.url, e)])
    h = out.value
    assert out.ok and h is not None, out.error
    assert sorted(sh.node for sh in h.shards) == sorted(f"127.0.0.1:{n.port}"
                                                         for n in rc.nodes)
    by_node = {sh.node: sh for sh in h.shards}
    for node, (lo, hi) in zip(rc.nodes, rc.ranges):
        sh = by_node[f"127.0.0.1:{node.port}"]
        assert sh.slots == ((lo, hi),)
        mine = [k for k in keys if rc.node_of_slot(e.slot_of(k)) == rc.nodes.index(node)]
        assert sh.waiters == len(mine)
        assert sh.keys >= len(mine)
    assert (h.locks, h.waiters, h.resources) == (24, 12, 12)
    assert h.epoch == e.status(0).epoch and h.recovering_ms == 0
    assert h.redis_version.startswith("7.")
