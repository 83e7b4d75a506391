"""The stored resource holds every change a call made, however few of its locks changed.

A commit packs only the locks its call changed or added and reuses the bytes of the others
(core.lua `enc`, docs/design.md "Storage"). Each test changes one lock in the middle of a
long queue, one field at a time, with calls that follow one another on the same key (the
case where the previous call's table and bytes are reused), and reads the stored bytes
back with `inspect`, which decodes them afresh.
"""

from __future__ import annotations

import pytest
import redis

from redlockdlm.engine.instance import Engine
from redlockdlm.engine.modes import Mode, Status

T0 = 1_700_000_000_000
WAITERS = 20


@pytest.fixture
def e(r: redis.Redis) -> Engine:
    eng = Engine(r, "enc", rejoin_ms=1000)
    eng.init_fresh()
    eng.set_clock(frozen_ms=T0)
    return eng


def locks(e: Engine, key: bytes) -> dict:
    _, (view,) = e.inspect([key])
    return {lk.lock_id: lk for lk in view.locks}


def queue(e: Engine, key: bytes, holder_mode: Mode = Mode.EX) -> None:
    assert e.request(key, "h", "h", holder_mode, ticket=0, lease_ms=5000).status == Status.GRANTED
    for j in range(WAITERS):
        assert e.request(key, f"o{j}", f"w{j}", Mode.EX, ticket=1 + j,
                         lease_ms=5000).status == Status.QUEUED


@pytest.mark.timeout(30)
def test_a_renewed_waiter_is_stored_with_its_new_lease(e: Engine) -> None:
    key = e.key("lease")
    queue(e, key)
    e.renew("o10", 9000, [(key, "w10", 0)])
    e.renew("o11", 7000, [(key, "w11", 0)])
    got = locks(e, key)
    assert got["w10"].lease_left_ms == 9000
    assert got["w11"].lease_left_ms == 7000
    assert got["w9"].lease_left_ms == got["w12"].lease_left_ms == 5000


@pytest.mark.timeout(30)
def test_a_granted_head_is_stored_granted(e: Engine) -> None:
    key = e.key("grant")
    queue(e, key)
    assert e.release(key, "h", "h").status == Status.RELEASED
    got = locks(e, key)
    assert "h" not in got
    assert (got["w0"].queue, got["w0"].mode, got["w0"].requested) == ("G", Mode.EX, None)
    assert got["w0"].token > 0
    assert [lk.queue for lk in got.values()].count("W") == WAITERS - 1


@pytest.mark.timeout(30)
def test_a_queued_conversion_and_its_cancel_are_stored(e: Engine) -> None:
    key = e.key("conv")
    assert e.request(key, "p", "p", Mode.PR, ticket=0, lease_ms=5000).status == Status.GRANTED
    queue(e, key, holder_mode=Mode.PR)
    rep = e.convert(key, "p", "p", Mode.EX, ticket=100, lease_ms=5000, priority=7)
    assert rep.status == Status.QUEUED
    got = locks(e, key)["p"]
    assert (got.queue, got.mode, got.requested, got.cticket, got.priority) == (
        "C", Mode.PR, Mode.EX, 100, 7)
    assert e.cancel(key, "p", "p").status == Status.CANCELLED
    got = locks(e, key)["p"]
    assert (got.queue, got.mode, got.requested) == ("G", Mode.PR, None)


@pytest.mark.timeout(30)
def test_a_child_of_a_lock_with_waiters_is_stored_on_its_parent(e: Engine) -> None:
    key, ckey = e.key("parent"), e.key("parent", "child")
    queue(e, key)
    assert e.request(ckey, "h", "c", Mode.EX, ticket=50, lease_ms=5000, parent_key=key,
                     parent_id="h").status == Status.GRANTED
    assert locks(e, key)["h"].kids == ((ckey, "c"),)
    assert e.release(ckey, "h", "c", parent_key=key).status == Status.RELEASED
    e.renew("o3", 6000, [(key, "w3", 0)])  # (a call on the parent's key alone)
    assert locks(e, key)["h"].kids == ()


@pytest.mark.timeout(30)
def test_a_down_conversion_in_place_is_stored(e: Engine) -> None:
    key = e.key("down")
    queue(e, key)
    e.renew("h", 5000, [(key, "h", 0)])  # (a call that changes nothing of it)
    rep = e.convert(key, "h", "h", Mode.PR, ticket=100, lease_ms=5000)
    assert (rep.status, rep.mode) == (Status.GRANTED, Mode.PR)
    got = locks(e, key)["h"]
    assert (got.queue, got.mode, got.requested) == ("G", Mode.PR, None)
