"""The wait-for graph, cycles and victim choice on hand-built snapshots (no Redis).

Case names start with the rule of docs/detector.md they check (D2..D8)."""

from __future__ import annotations

import pytest

from redlockdlm.detector import InstanceScan, Snapshot
from redlockdlm.detector.graph import (
    WaitForGraph,
    _cyclic_core,
    _tarjan,
    choose_victim,
    find_cycles,
    wait_for_graph,
)
from redlockdlm.engine.codec import LockView, ResourceView
from redlockdlm.engine.modes import Flag, Mode


def lk(queue: str, lock_id: str, owner: str, gr: str | None, rq: str | None, ticket: int, *,
       flags: int = 0, lease: int = 10_000, cticket: int = 0) -> LockView:
    return LockView(queue, lock_id, owner, None if gr is None else Mode[gr],
                    None if rq is None else Mode[rq], flags, ticket, cticket, lease, "", 0,
                    None, ())


def res(name: str, *locks: LockView) -> ResourceView:
    return ResourceView(b"k:" + name.encode(), name.encode(), 0, None, 0, True, tuple(locks))


def snap(*instances: list[ResourceView]) -> Snapshot:
    return Snapshot(tuple(InstanceScan(f"i{n}", 0, (), {r.key: r for r in views})
                          for n, views in enumerate(instances)))


def edges(g: WaitForGraph) -> set[tuple[str, str]]:
    return {(e.waiter, e.holder) for e in g.edges}


def lock_edges(g: WaitForGraph) -> set[tuple[str, str]]:
    return {(e.lock_id, e.blocker_id) for e in g.edges}


# ----------------------------------------------------------------- edges of one resource


@pytest.mark.parametrize("held, wanted, blocked", [
    ("EX", "NL", False), ("PR", "PR", False), ("PR", "CR", False), ("CR", "PW", False),
    ("PR", "EX", True), ("CW", "PR", True), ("CR", "EX", True), ("PW", "CW", True),
])
def test_D2_a_held_mode_blocks_an_incompatible_request(held, wanted, blocked):
    g = wait_for_graph(snap([res("R", lk("G", "h1", "h", held, None, 1),
                                     lk("W", "w1", "w", None, wanted, 2))]))
    assert edges(g) == ({("w", "h")} if blocked else set())


def test_D2_a_conversion_waits_for_other_holders_not_itself():
    g = wait_for_graph(snap([res("R", lk("G", "h1", "h", "PR", None, 1),
                                     lk("C", "c1", "c", "PR", "EX", 2, cticket=3))]))
    assert lock_edges(g) == {("c1", "h1")}


def test_D3_an_earlier_incompatible_waiter_blocks():
    g = wait_for_graph(snap([res("R", lk("G", "h1", "h", "PR", None, 1),
                                     lk("W", "x1", "x", None, "EX", 2),
                                     lk("W", "w1", "w", None, "PR", 3))]))
    # w's PR is compatible with h's PR but may not pass x's EX (no barging, G8)
    assert lock_edges(g) == {("x1", "h1"), ("w1", "x1")}


def test_D3_a_compatible_earlier_waiter_passes_on_what_it_waits_for():
    # h holds CW; x waits for PR (blocked by h); w waits for CR, compatible with both, but
    # queued behind x: w waits for h (through x), and x's owner is not accused.
    g = wait_for_graph(snap([res("R", lk("G", "h1", "h", "CW", None, 1),
                                     lk("W", "x1", "x", None, "PR", 2),
                                     lk("W", "w1", "w", None, "CR", 3))]))
    assert lock_edges(g) == {("x1", "h1"), ("w1", "h1")}


def test_D3_a_queued_conversion_blocks_every_new_request():
    g = wait_for_graph(snap([res("R", lk("G", "h1", "h", "PR", None, 1),
                                     lk("C", "c1", "c", "NL", "EX", 2, cticket=5),
                                     lk("W", "w1", "w", None, "CR", 3))]))
    # CR is compatible with h's PR and c's NL, but not with c's requested EX
    assert lock_edges(g) == {("c1", "h1"), ("w1", "c1")}


def test_D4_a_quecvt_conversion_waits_for_conversions_ahead():
    g = wait_for_graph(snap([res("R", lk("G", "h1", "h", "CR", None, 1),
                                     lk("C", "c1", "c", "NL", "PW", 2, cticket=5),
                                     lk("C", "q1", "q", "NL", "PR", 3, cticket=6,
                                        flags=Flag.QUECVT))]))
    assert lock_edges(g) == {("q1", "c1")}  # c1 itself is compatible with h's CR


def test_D5_expired_locks_are_ignored():
    g = wait_for_graph(snap([res("R", lk("G", "h1", "h", "EX", None, 1, lease=-5),
                                     lk("W", "w1", "w", None, "EX", 2)),
                             res("S", lk("G", "h2", "h", "EX", None, 1),
                                 lk("W", "w2", "w", None, "EX", 2, lease=0))]))
    assert g.edges == ()


def test_D6_an_owner_waiting_for_its_own_held_lock_is_a_one_owner_cycle():
    # (this case used to assert no edge at all: a self-deadlock went unseen for ever)
    s = snap([res("R", lk("G", "a1", "a", "EX", None, 1), lk("W", "a2", "a", None, "EX", 2))])
    g = wait_for_graph(s)
    assert edges(g) == {("a", "a")} and lock_edges(g) == {("a2", "a1")}
    (cycle,) = find_cycles(g)
    assert cycle.owners == ("a",) and cycle.path == ("a",)
    assert choose_victim(cycle, s).lock_id == "a2"


def test_D6_a_conversion_blocked_by_the_owners_other_granted_lock_is_a_cycle():
    s = snap([res("R", lk("G", "a1", "a", "PR", None, 1),
                  lk("C", "a2", "a", "CR", "EX", 2, cticket=3))])
    (cycle,) = find_cycles(wait_for_graph(s))
    assert cycle.owners == ("a",) and choose_victim(cycle, s).lock_id == "a2"


def test_D6_an_owners_own_earlier_queued_request_is_no_cycle():
    # a2 queues behind a's own a1, which waits for b: a waits for b only (D3 inheritance)
    g = wait_for_graph(snap([res("R", lk("G", "b1", "b", "EX", None, 1),
                                     lk("W", "a1", "a", None, "EX", 2),
                                     lk("W", "a2", "a", None, "PR", 3))]))
    assert edges(g) == {("a", "b")}
    assert find_cycles(g) == []


def test_D6_waiting_behind_another_owner_who_waits_for_ones_own_lock():
    # b waits for a's EX; a's new PR request may not barge past b (D3): a waits for itself
    s = snap([res("R", lk("G", "a1", "a", "EX", None, 1), lk("W", "b1", "b", None, "PR", 2),
                  lk("W", "a2", "a", None, "PR", 3))])
    g = wait_for_graph(s)
    assert edges(g) == {("b", "a"), ("a", "a")}
    (cycle,) = find_cycles(g)
    assert cycle.owners == ("a",) and choose_victim(cycle, s).lock_id == "a2"


def test_D5_edges_merge_over_instances():
    i0 = [res("R1", lk("G", "b1", "b", "EX", None, 1), lk("W", "a2", "a", None, "EX", 3))]
    i1 = [res("R2", lk("G", "a1", "a", "EX", None, 2), lk("W", "b2", "b", None, "EX", 4))]
    g = wait_for_graph(snap(i0, i1, []))
    assert edges(g) == {("a", "b"), ("b", "a")}
    assert {e.lock_id: e.instances for e in g.edges} == {"a2": (0,), "b2": (1,)}
    assert [c.owners for c in find_cycles(g)] == [("a", "b")]


def test_D5_a_request_granted_on_a_quorum_waits_for_nobody():
    # a's R1 lock is granted on instances 0 and 1 (a quorum of 3): a holds it. On instance
    # 2 it still queues behind b, who waits for a: no deadlock, a will release.
    held = res("R1", lk("G", "a1", "a", "EX", None, 1))
    minority = res("R1", lk("G", "b9", "b", "EX", None, 0), lk("W", "a1", "a", None, "EX", 1))
    r2 = res("R2", lk("G", "a2", "a", "EX", None, 2), lk("W", "b2", "b", None, "EX", 3))
    g = wait_for_graph(snap([held, r2], [held, r2], [minority, r2]))
    assert edges(g) == {("b", "a")}
    assert find_cycles(g) == []


# ----------------------------------------------------------------- cycles


def test_D6_tarjan_finds_each_component():
    adj = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"},
           "g": set()}
    comps = sorted(sorted(c) for c in _tarjan(adj))
    assert comps == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]


def test_D6_owners_that_cannot_be_on_a_cycle_are_peeled_first():
    adj = {"in1": {"in2"}, "in2": {"a"}, "a": {"b"}, "b": {"a", "out1"}, "out1": {"out2"},
           "out2": set(), "x": {"y"}, "y": {"x"}}
    assert _cyclic_core(adj) == {"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"x"}}
    assert _cyclic_core({"h": set(), "w": {"h"}}) == {}


def test_D6_tarjan_has_no_recursion_limit():
    n = 20_000
    adj = {f"o{i}": {f"o{(i + 1) % n}"} for i in range(n)}
    (comp,) = _tarjan(adj)
    assert len(comp) == n


def test_D6_a_three_cycle_is_one_cycle_with_its_path():
    views = [res("R1", lk("G", "a1", "a", "EX", None, 1), lk("W", "c3", "c", None, "EX", 6)),
             res("R2", lk("G", "b1", "b", "EX", None, 2), lk("W", "a3", "a", None, "EX", 4)),
             res("R3", lk("G", "c1", "c", "EX", None, 3), lk("W", "b3", "b", None, "EX", 5))]
    (cyc,) = find_cycles(wait_for_graph(snap(views)))
    assert cyc.owners == ("a", "b", "c")
    assert cyc.path == ("a", "b", "c")
    assert {r.lock_id for r in cyc.requests} == {"a3", "b3", "c3"}
    assert len(cyc.signature) == 3


def test_D6_a_tail_outside_the_cycle_is_left_out():
    views = [res("R1", lk("G", "a1", "a", "EX", None, 1), lk("W", "b2", "b", None, "EX", 4),
                 lk("W", "d2", "d", None, "EX", 9)),
             res("R2", lk("G", "b1", "b", "EX", None, 2), lk("W", "a2", "a", None, "EX", 3))]
    (cyc,) = find_cycles(wait_for_graph(snap(views)))
    assert cyc.owners == ("a", "b")
    assert all(r.owner != "d" for r in cyc.requests)


# ----------------------------------------------------------------- victims


def two_cycle(a_flags: int = 0, b_flags: int = 0) -> Snapshot:
    return snap([res("R1", lk("G", "a1", "a", "EX", None, 1),
                     lk("W", "b2", "b", None, "EX", 4, flags=b_flags)),
                 res("R2", lk("G", "b1", "b", "EX", None, 2),
                     lk("W", "a2", "a", None, "EX", 3, flags=a_flags))])


def test_D8_the_youngest_ticket_is_the_victim():
    s = two_cycle()
    (cyc,) = find_cycles(wait_for_graph(s))
    assert choose_victim(cyc, s).lock_id == "b2"


def test_D8_nodlckwt_is_never_the_victim():
    s = two_cycle(b_flags=Flag.NODLCKWT)
    (cyc,) = find_cycles(wait_for_graph(s))
    assert choose_victim(cyc, s).lock_id == "a2"


def test_D8_no_victim_when_every_request_is_nodlckwt():
    s = two_cycle(Flag.NODLCKWT, Flag.NODLCKWT)
    (cyc,) = find_cycles(wait_for_graph(s))
    assert choose_victim(cyc, s) is None


def test_D8_nodlckwt_seen_on_any_instance_counts():
    plain = two_cycle()
    flagged = two_cycle(b_flags=Flag.NODLCKWT)
    s = Snapshot(plain.instances + flagged.instances[:1])
    (cyc,) = find_cycles(wait_for_graph(Snapshot(plain.instances)))
    assert choose_victim(cyc, s).lock_id == "a2"


def test_D8_eligible_narrows_the_choice():
    s = two_cycle()
    (cyc,) = find_cycles(wait_for_graph(s))
    assert choose_victim(cyc, s, eligible={(b"k:R2", "a2")}).lock_id == "a2"
    assert choose_victim(cyc, s, eligible=set()) is None


def test_D8_a_conversion_is_aged_by_its_conversion_ticket():
    s = snap([res("R1", lk("G", "a1", "a", "EX", None, 1), lk("W", "b2", "b", None, "EX", 50)),
              res("R2", lk("G", "b1", "b", "PR", None, 2),
                  lk("C", "a2", "a", "NL", "EX", 3, cticket=99))])
    (cyc,) = find_cycles(wait_for_graph(s))
    victim = choose_victim(cyc, s)
    assert (victim.lock_id, victim.queue, victim.ticket) == ("a2", "C", 99)


def test_D8_the_lowest_priority_is_the_victim_before_the_youngest():
    s = snap([res("R1", lk("G", "a1", "a", "EX", None, 1),
                  lk("W", "b2", "b", None, "EX", 4)),
              res("R2", lk("G", "b1", "b", "EX", None, 2),
                  LockView("W", "a2", "a", None, Mode.EX, 0, 3, 0, 10_000, "", 0, None, (),
                           -1))])
    (cyc,) = find_cycles(wait_for_graph(s))
    victim = choose_victim(cyc, s)
    assert (victim.lock_id, victim.priority) == ("a2", -1)  # older, but of lower priority


@pytest.mark.parametrize("a_prio, b_prio, victim", [
    (5, 5, "b2"),  # equal: the youngest
    (0, 1, "a2"),
    (2**31 - 1, -(2**31), "b2"),
])
def test_D8_priorities_then_tickets(a_prio, b_prio, victim):
    def w(lid, owner, ticket, prio):
        return LockView("W", lid, owner, None, Mode.EX, 0, ticket, 0, 10_000, "", 0, None, (),
                        prio)
    s = snap([res("R1", lk("G", "a1", "a", "EX", None, 1), w("b2", "b", 4, b_prio)),
              res("R2", lk("G", "b1", "b", "EX", None, 2), w("a2", "a", 3, a_prio))])
    (cyc,) = find_cycles(wait_for_graph(s))
    assert choose_victim(cyc, s).lock_id == victim


def test_D8_nodlckwt_is_never_the_victim_whatever_its_priority():
    s = snap([res("R1", lk("G", "a1", "a", "EX", None, 1),
                  LockView("W", "b2", "b", None, Mode.EX, Flag.NODLCKWT, 4, 0, 10_000, "", 0,
                           None, (), -100)),
              res("R2", lk("G", "b1", "b", "EX", None, 2), lk("W", "a2", "a", None, "EX", 3))])
    (cyc,) = find_cycles(wait_for_graph(s))
    assert choose_victim(cyc, s).lock_id == "a2"
