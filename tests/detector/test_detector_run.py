"""The detector job on three real redis-servers (docs/detector.md D1, D5, D7-D9).

Deadlocks are built with `Engine.request` on each instance (tests/deadlocks.py): owners
a, b, c; the same lock id on every instance it is sent to; tickets give the queue order and
the victim's age. Every scenario asserts exactly one victim per cycle: its waiting request
is gone on every instance and its owner's channel got ``C|<id>|deadlock``.
"""

from __future__ import annotations

import logging
import threading

import pytest
import redis
from deadlocks import Cluster

from redlockdlm.admin import Target
from redlockdlm.detector import Detector, ScannedLock, reap, scan
from redlockdlm.detector.scanning import _read_resources
from redlockdlm.engine.modes import Flag, Status

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def c(cluster3) -> Cluster:
    return Cluster(cluster3)


def detector(c: Cluster, **kw) -> Detector:
    kw.setdefault("reap_every", 0)
    return Detector(c.engines, c.namespace, 0.05, **kw)


def resolve(det: Detector, rounds: int = 2) -> list:
    """Run `rounds` rounds; return every victim."""
    victims = []
    for _ in range(rounds):
        victims.extend(det.run_once().victims)
    return victims


def assert_one_victim(c: Cluster, det: Detector, owner: str, lock_id: str, path: tuple,
                      others: list[tuple[tuple, str]]) -> None:
    """Two rounds cancel exactly `lock_id`, everywhere, and tell only its owner; a third
    round finds nothing left to do; the other waiting requests are untouched."""
    with c.listen(owner) as ev:
        first = det.run_once()
        assert len(first.cycles) == 1 and first.victims == ()  # D7: seen once
        (victim,) = det.run_once().victims
        assert (victim.request.owner, victim.request.lock_id) == (owner, lock_id)
        present = [q for q in c.queues(path, lock_id) if q is not None]
        assert present == [], "the victim's waiting request must be gone everywhere"
        got = ev.wait_for(f"C|{lock_id}|deadlock".encode(), count=victim.cancelled_on)
        assert got.count(f"C|{lock_id}|deadlock".encode()) == victim.cancelled_on >= 1
    for opath, olock in others:
        assert "W" in c.queues(opath, olock) or "C" in c.queues(opath, olock)
    after = det.run_once()
    assert after.cycles == () and after.victims == ()


def test_two_cycle_across_resources(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    assert c.request("a", "a2", ["R2"], "EX", ticket=3) == [Status.QUEUED] * 3
    assert c.request("b", "b2", ["R1"], "EX", ticket=4) == [Status.QUEUED] * 3
    with detector(c) as det, c.listen("a") as a_events:
        assert_one_victim(c, det, "b", "b2", ("R1",), [(("R2",), "a2")])
        assert not any(m.startswith(b"C|") for m in a_events.poll())


def test_one_owner_cycle_is_resolved_like_any_other(c):
    """An owner whose request waits for a lock it holds itself (two sessions sharing one
    owner id, say: a client refuses the case it can see itself) is deadlocked: the
    detector confirms it and cancels the waiting request, as for any cycle."""
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    assert c.request("a", "a2", ["R1"], "EX", ticket=2) == [Status.QUEUED] * 3
    with detector(c) as det:
        assert_one_victim(c, det, "a", "a2", ("R1",), [])
    assert c.queues(["R1"], "a1") == ["G"] * 3  # the held lock stays


def test_three_cycle_across_resources(c):
    for owner, t, res in (("a", 1, "R1"), ("b", 2, "R2"), ("c", 3, "R3")):
        c.request(owner, f"{owner}1", [res], "EX", ticket=t)
    c.request("a", "a2", ["R2"], "PR", ticket=4)
    c.request("b", "b2", ["R3"], "PW", ticket=5)
    c.request("c", "c2", ["R1"], "CW", ticket=6)
    with detector(c) as det:
        assert_one_victim(c, det, "c", "c2", ("R1",), [(("R2",), "a2"), (("R3",), "b2")])


def test_two_cycle_across_instances(c):
    # instance 0 alone: b waits for a; instance 1 alone: a waits for b. Only the merged
    # graph has the cycle.
    c.request("a", "a1", ["R1"], "EX", ticket=1, on=[0])
    c.request("b", "b2", ["R1"], "EX", ticket=4, on=[0])
    c.request("b", "b1", ["R2"], "EX", ticket=2, on=[1])
    c.request("a", "a2", ["R2"], "EX", ticket=3, on=[1])
    with detector(c) as det:
        assert_one_victim(c, det, "b", "b2", ("R1",), [(("R2",), "a2")])


def test_three_cycle_across_instances(c):
    # each edge of a -> b -> c -> a lives on a different instance
    c.request("b", "b1", ["R1"], "EX", ticket=1, on=[0])
    c.request("a", "a2", ["R1"], "EX", ticket=4, on=[0])
    c.request("c", "c1", ["R2"], "EX", ticket=2, on=[1])
    c.request("b", "b2", ["R2"], "EX", ticket=5, on=[1])
    c.request("a", "a1", ["R3"], "EX", ticket=3, on=[2])
    c.request("c", "c2", ["R3"], "EX", ticket=6, on=[2])
    with detector(c) as det:
        assert_one_victim(c, det, "c", "c2", ("R3",), [(("R1",), "a2"), (("R2",), "b2")])


def test_a_split_vote_that_survives_is_a_cycle(c):
    # R granted to a on instance 0 and to b on instance 1: neither has a quorum, each waits
    # behind the other. Cancelling the younger request (b's) everywhere breaks it; where b's
    # lock is granted the cancel changes nothing (CANCELGRANT).
    c.request("a", "a1", ["R"], "EX", ticket=1, on=[0])
    c.request("b", "b1", ["R"], "EX", ticket=2, on=[1])
    c.request("b", "b1", ["R"], "EX", ticket=2, on=[0])
    c.request("a", "a1", ["R"], "EX", ticket=1, on=[1])
    with detector(c) as det, c.listen("b") as ev:
        resolve(det, 1)
        (victim,) = resolve(det, 1)
        assert victim.request.lock_id == "b1"
        statuses = [o.value for o in victim.outcomes]
        assert statuses == [Status.CANCELLED, Status.CANCELGRANT, Status.NOTFOUND]
        assert c.queues(("R",), "b1") == [None, "G", None]
        ev.wait_for(b"C|b1|deadlock")
        assert ev.received.count(b"C|b1|deadlock") == 1
        assert resolve(det, 2) == []


def test_a_conversion_victim_keeps_its_granted_mode(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "PR", ticket=2)
    c.request("a", "a2", ["R2"], "NL", ticket=3)
    assert c.convert("a", "a2", ["R2"], "EX", ticket=10) == [Status.QUEUED] * 3
    c.request("b", "b2", ["R1"], "EX", ticket=5)
    with detector(c) as det, c.listen("a") as ev:
        (victim,) = resolve(det)
        assert (victim.request.lock_id, victim.request.queue) == ("a2", "C")
        assert c.queues(("R2",), "a2") == ["G"] * 3
        assert c.lock(0, ("R2",), "a2").mode.name == "NL"
        ev.wait_for(b"C|a2|deadlock", count=3)
    assert c.queues(("R1",), "b2") == ["W"] * 3


def test_a_long_wait_behind_a_live_holder_is_no_deadlock(c):
    c.request("a", "a1", ["R"], "EX", ticket=1)
    c.request("b", "b1", ["R"], "EX", ticket=2)
    c.request("c", "c1", ["R"], "PR", ticket=3)
    with detector(c) as det:
        for _ in range(4):
            rnd = det.run_once()
            assert rnd.cycles == () and rnd.victims == ()
            # two waiting requests (b1, c1), each in the index of 3 instances
            assert (rnd.snapshot.waiter_count, rnd.snapshot.index_entries) == (2, 6)
            assert rnd.snapshot.longest_queue == 2  # (both wait on R)
    assert c.queues(("R",), "b1") == ["W"] * 3


def test_a_cycle_seen_once_is_not_punished(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("b", "b2", ["R1"], "EX", ticket=4)
    with detector(c) as det:
        assert len(det.run_once().cycles) == 1
        # a gives up its wait by itself before the second scan: the cycle is gone
        for e in c.engines:
            e.cancel(c.key(["R2"]), "a", "a2")
        assert det.run_once().cycles == ()
        # a deadlock with new locks between the same owners must be confirmed afresh
        c.request("a", "a3", ["R2"], "EX", ticket=5)
        rnd = det.run_once()
        assert len(rnd.cycles) == 1 and rnd.victims == ()
        (victim,) = det.run_once().victims
        assert victim.request.lock_id == "a3"  # younger than b2 now
    assert c.queues(("R1",), "b2") == ["W"] * 3


def test_nodlckwt_requests_are_never_victims(c, caplog):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("b", "b2", ["R1"], "EX", ticket=4, flags=Flag.NODLCKWT)
    with detector(c) as det:
        (victim,) = resolve(det)
        assert victim.request.lock_id == "a2"  # older, but b2 opted out
    assert c.queues(("R1",), "b2") == ["W"] * 3


def test_a_cycle_of_nodlckwt_requests_is_left_alone_and_logged_once(c, caplog):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3, flags=Flag.NODLCKWT)
    c.request("b", "b2", ["R1"], "EX", ticket=4, flags=Flag.NODLCKWT)
    caplog.set_level(logging.INFO, logger="redlockdlm.detector")
    with detector(c) as det:
        rounds = [det.run_once() for _ in range(4)]
    assert all(r.victims == () for r in rounds)
    assert [len(r.unresolved) for r in rounds] == [0, 1, 1, 1]
    assert sum("event=no-victim" in r.message for r in caplog.records) == 1
    assert c.queues(("R1",), "b2") == ["W"] * 3 and c.queues(("R2",), "a2") == ["W"] * 3


def test_a_child_victim_is_cancelled_with_its_parent_key(c):
    c.request("a", "a1", ["db"], "CR", ticket=1)
    c.request("b", "b1", ["db"], "CR", ticket=2)
    c.request("a", "a2", ["db", "row:1"], "EX", ticket=3, parent=(["db"], "a1"))
    c.request("b", "b2", ["db", "row:2"], "EX", ticket=4, parent=(["db"], "b1"))
    c.request("a", "a3", ["db", "row:2"], "EX", ticket=5, parent=(["db"], "a1"))
    c.request("b", "b3", ["db", "row:1"], "EX", ticket=6, parent=(["db"], "b1"))
    with detector(c) as det:
        (victim,) = resolve(det)
    assert victim.request.lock_id == "b3" and victim.cancelled_on == 3
    assert c.queues(("db", "row:1"), "b3") == [None] * 3
    kids = c.lock(0, ("db",), "b1").kids
    assert (c.key(["db", "row:1"]), "b3") not in kids  # unlinked from its parent
    assert (c.key(["db", "row:2"]), "b2") in kids


def test_the_leader_hook_gates_every_round(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("b", "b2", ["R1"], "EX", ticket=4)
    leading = [True, False, True, True]
    with detector(c, leader=lambda: leading.pop(0)) as det:
        r1, r2, r3, r4 = (det.run_once() for _ in range(4))
    assert r1.leader and len(r1.cycles) == 1
    assert not r2.leader and r2.snapshot is None
    assert r3.victims == ()  # a new term: what was seen before standing by is forgotten
    assert len(r4.victims) == 1


def test_an_unreachable_instance_does_not_stop_the_others(c, caplog):
    c.request("a", "a1", ["R1"], "EX", ticket=1, on=[0, 1])
    c.request("b", "b1", ["R2"], "EX", ticket=2, on=[0, 1])
    c.request("a", "a2", ["R2"], "EX", ticket=3, on=[0, 1])
    c.request("b", "b2", ["R1"], "EX", ticket=4, on=[0, 1])
    from redis_harness import free_port, no_retry
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5,
                       retry=no_retry())
    from redlockdlm.engine.instance import Engine
    targets = [Target(f"i{i}", e) for i, e in enumerate(c.engines[:2])]
    targets.append(Target("dead", Engine(dead, c.namespace)))
    caplog.set_level(logging.INFO, logger="redlockdlm.detector")
    with Detector(targets, c.namespace, 0.05, reap_every=0) as det:
        (victim,) = resolve(det)
    assert victim.cancelled_on == 2
    assert [o.ok for o in victim.outcomes] == [True, True, False]
    assert any("event=unreachable" in r.message and "instance=dead" in r.message
               for r in caplog.records)


def test_run_forever_resolves_and_stops_when_asked(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    stop = threading.Event()
    with Detector(c.urls, c.namespace, 0.05, reap_every=0) as det, c.listen("b") as ev:
        t = threading.Thread(target=det.run_forever, args=(stop,))
        t.start()
        try:
            c.request("b", "b2", ["R1"], "EX", ticket=4)
            ev.wait_for(b"C|b2|deadlock", count=3)
        finally:
            stop.set()
            t.join(timeout=5)
        assert not t.is_alive()
        assert ev.received.count(b"C|b2|deadlock") == 3


def test_D7_the_confirming_scan_comes_sooner_than_the_interval(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("b", "b2", ["R1"], "EX", ticket=4)
    stop = threading.Event()
    with Detector(c.engines, c.namespace, 30.0, confirm_after_s=0.05, reap_every=0) as det, \
            c.listen("b") as ev:
        t = threading.Thread(target=det.run_forever, args=(stop,))
        t.start()
        try:
            ev.wait_for(b"C|b2|deadlock", count=3)  # long before the 30 s interval
        finally:
            stop.set()
            t.join(timeout=5)
        assert ev.received.count(b"C|b2|deadlock") == 3 and det.rounds == 2


def test_D7_a_confirming_round_reads_only_the_cycle(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("x", "x1", ["busy"], "EX", ticket=4)
    c.request("y", "y1", ["busy"], "EX", ticket=5)  # an unrelated waiter
    with detector(c) as det:
        assert det.confirm_pending().cycles == ()  # nothing pending: nothing read
        c.request("b", "b2", ["R1"], "EX", ticket=6)
        assert len(det.run_once().pending) == 1
        rnd = det.confirm_pending()
        assert {k for i in rnd.snapshot.instances for k in i.resources} == {
            c.key(["R1"]), c.key(["R2"])}
        (victim,) = rnd.victims
        assert victim.request.lock_id == "b2" and victim.cancelled_on == 3
        assert det.confirm_pending().victims == ()


def test_D7_a_confirming_round_spares_a_cycle_that_cleared(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("b", "b2", ["R1"], "EX", ticket=4)
    with detector(c) as det:
        assert len(det.run_once().pending) == 1
        for e in c.engines:
            e.release(c.key(["R2"]), "b", "b1")  # b gives up R2: a2 is granted
        rnd = det.confirm_pending()
        assert rnd.cycles == () and rnd.victims == ()
    assert c.queues(["R1"], "b2") == ["W"] * 3


def test_D1_the_scan_reads_only_the_index_and_its_resources(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b2", ["R1"], "EX", ticket=2)
    c.request("z", "z1", ["lonely"], "EX", ticket=3)  # no waiter: never inspected
    snap = scan(c.engines)
    assert snap.reachable == 3 and (snap.waiter_count, snap.index_entries) == (1, 3)
    for inst in snap.instances:
        assert inst.waiters == (("b2", c.key(["R1"])),)
        assert list(inst.resources) == [c.key(["R1"])]


def test_D1_the_lean_read_agrees_with_the_codec(c):
    """The scan reads resources with lua/scan.lua and parses the reply itself (for speed);
    it must read what inspect and codec read, less the locks whose lease ran out."""
    c.request("a", "a1", ["R"], "PR", ticket=1)
    c.request("a", "a0", ["R", "kid"], "EX", ticket=2, parent=(["R"], "a1"))
    c.request("b", "b1", ["R"], "NL", ticket=3)
    c.convert("b", "b1", ["R"], "EX", ticket=9, flags=Flag.QUECVT)
    c.request("c", "c1", ["R"], "CW", ticket=4, flags=Flag.NODLCKWT)
    c.request("d", "d1", ["other"], "EX", ticket=5, lease_ms=1)
    keys = [c.key(["R"]), c.key(["R", "kid"]), c.key(["other"]), c.key(["absent"])]
    e = c.engines[0]
    e.set_clock(frozen_ms=e.status().now_ms + 5)  # the same lease left in both reads
    _, views = e.inspect(keys)
    lean = _read_resources(e, keys)
    e.set_clock()
    assert list(lean) == [v.key for v in views if v is not None]
    for v in views:
        if v is None:
            continue
        r = lean[v.key]
        assert (r.key, r.name, r.path) == (v.key, v.name, v.path)
        assert r.locks == tuple(ScannedLock(*(getattr(lk, f) for f in ScannedLock._fields))
                                for lk in v.locks if lk.lease_left_ms > 0)
    assert lean[c.key(["other"])].locks == ()  # d1's lease ran out


# ----------------------------------------------------------------- D9: reaping


def test_D9_reap_purges_dead_waiters_and_clears_stale_entries(c):
    e = c.engines[0]
    wkey = e.wkey
    c.request("a", "a1", ["R"], "EX", ticket=1, on=[0])
    c.request("b", "b1", ["R"], "EX", ticket=2, on=[0], lease_ms=1_000)   # dies
    c.request("c", "c1", ["S"], "EX", ticket=3, on=[0], lease_ms=60_000)
    c.request("d", "d1", ["S"], "EX", ticket=4, on=[0], lease_ms=60_000)  # lives
    gone = b"x1|" + c.key(["gone"])  # an entry whose resource no longer exists
    e.client.zadd(wkey, {gone: 1})
    assert reap(e, grace_ms=0).stale == 1  # only the ghost is stale yet
    assert e.client.zscore(wkey, gone) is None
    st = e.status()
    e.set_clock(offset_ms=10_000)  # b1's lease ran out 9 s ago (instance clock)
    assert e.status().now_ms >= st.now_ms + 10_000
    assert c.lock(0, ("R",), "b1").lease_left_ms < 0
    result = reap(e, grace_ms=5_000)
    assert (result.stale, result.purged, result.live) == (1, 1, 0)
    assert c.lock(0, ("R",), "b1") is None  # purged (G10)
    assert c.lock(0, ("R",), "a1").lease_left_ms > 0  # a's lease: 30 s, 20 s left
    members = {m for m, _ in e.waiters()}
    assert members == {b"d1|" + c.key(["S"])}
    assert reap(e, grace_ms=0) == reap(e, grace_ms=0)  # nothing more to do
    e.set_clock(offset_ms=0)


def test_D9_reap_never_touches_a_live_lock_even_with_a_stale_score(c):
    e = c.engines[0]
    c.request("a", "a1", ["R"], "EX", ticket=1, on=[0])
    c.request("b", "b1", ["R"], "EX", ticket=2, on=[0])
    member = b"b1|" + c.key(["R"])
    e.client.zadd(e.wkey, {member: 1})  # a score that lies
    result = reap(e, grace_ms=0)
    assert (result.stale, result.live, result.removed) == (1, 1, 0)
    assert c.lock(0, ("R",), "b1").queue == "W"
    assert e.client.zscore(e.wkey, member) == 1


def test_D9_the_detector_reaps_every_n_rounds(c):
    e = c.engines[1]
    e.client.zadd(e.wkey, {b"x1|" + c.key(["gone"]): 1})
    with detector(c, reap_every=2, reap_grace_ms=0) as det:
        assert det.run_once().reaped == ()
        reaped = det.run_once().reaped
    assert [o.value.removed for o in reaped] == [0, 1, 0]
    assert e.client.zcard(e.wkey) == 0


def test_D8_a_lower_priority_is_cancelled_before_a_younger_request(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3, priority=-2)
    c.request("b", "b2", ["R1"], "EX", ticket=4, priority=-1)
    with detector(c) as det:
        assert_one_victim(c, det, "a", "a2", ("R2",), [(("R1",), "b2")])


def test_D7_a_watch_round_sees_a_cycle_that_formed_after_the_scan_and_only_pends_it(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("x", "x1", ["busy"], "EX", ticket=4)
    c.request("y", "y1", ["busy"], "EX", ticket=5)  # an unrelated waiter
    with detector(c) as det:
        assert det.watch().snapshot is None  # no full round yet: nothing to build on
        assert det.run_once().cycles == ()
        idle = det.watch()
        assert idle.snapshot is None and idle.pending == ()  # nothing new: indexes only
        c.request("b", "b2", ["R1"], "EX", ticket=6)
        rnd = det.watch()
        (cyc,) = rnd.pending
        assert cyc.owners == ("a", "b") and rnd.victims == () and rnd.confirmed == ()
        assert c.queues(["R1"], "b2") == ["W"] * 3  # a watch never cancels
        assert det.watch().pending == ()  # already pending; nothing new read
        (victim,) = det.confirm_pending().victims  # D7: fresh reads confirm it
        assert victim.request.lock_id == "b2" and victim.cancelled_on == 3


def test_D7_a_cycle_pended_by_a_watch_that_cleared_is_spared(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    with detector(c) as det:
        det.run_once()
        c.request("b", "b2", ["R1"], "EX", ticket=4)
        assert len(det.watch().pending) == 1
        for e in c.engines:
            e.release(c.key(["R2"]), "b", "b1")
        rnd = det.confirm_pending()
        assert rnd.cycles == () and rnd.victims == ()
    assert c.queues(["R1"], "b2") == ["W"] * 3


def test_D7_watch_rounds_find_a_cycle_long_before_the_next_full_round(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    stop = threading.Event()
    with Detector(c.engines, c.namespace, 30.0, confirm_after_s=0.05, watch_every_s=0.05,
                  reap_every=0) as det, c.listen("b") as ev:
        t = threading.Thread(target=det.run_forever, args=(stop,))
        t.start()
        try:
            while det._base is None:  # the first full scan is done: the cycle forms after
                threading.Event().wait(0.01)
            c.request("b", "b2", ["R1"], "EX", ticket=4)
            ev.wait_for(b"C|b2|deadlock", count=3)  # long before the 30 s interval
        finally:
            stop.set()
            t.join(timeout=5)
        assert ev.received.count(b"C|b2|deadlock") == 3 and det.rounds == 2


def test_detector_refuses_a_negative_watch_period(c):
    with pytest.raises(ValueError):
        Detector(c.engines, c.namespace, 1.0, watch_every_s=-1)
