"""Shard subscriptions on Redis Cluster members (N4, issue 13), for both clients (the sync
DLM and AsyncDLM behind its blocking facade): a slot's shard channel is subscribed only when
the client reads its events. What is checked is what
the nodes and a user see: an uncontended lock and release over many slots makes no
SSUBSCRIBE; a waiter is still granted by its event, also when the grant is published
between its QUEUED reply and its subscription; an `on_blocking` holder still gets its
blocking notification; a conversion that queues is granted by its event; a held lock broken
by an operator learns it by its next renewal; past the limit of subscribed slots, those of
no lock that reads events are unsubscribed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis_harness import RedisClusterServer

from redlockdlm import aio
from redlockdlm import client as sync_client
from redlockdlm.protocol import Vote

from .conftest import NS, Members

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def layout() -> Iterator[list[Any]]:
    """Three members, each a 3-primary cluster."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(RedisClusterServer(3)) for _ in range(3)]


@pytest.fixture(params=["sync", "async"])
def members(layout: list[Any], request: pytest.FixtureRequest) -> Iterator[Members]:
    m = Members(layout, request.param)
    m.reset()
    yield m
    m.close()


def ssubscribes(members: Members) -> int:
    """SSUBSCRIBE commands the primaries of every cluster member have served so far."""
    total = 0
    for cl in members.clusters:
        for node in cl.nodes:
            with contextlib.closing(node.client()) as c:
                total += c.info("commandstats").get("cmdstat_ssubscribe", {}).get("calls", 0)
    return total


def _module(members: Members) -> Any:
    """The module of the client under test (its `_Shards`, its `MAX_SLOT_SUBS`)."""
    return aio if members.kind == "async" else sync_client


def subscribers(members: Members, d: Any, name: str) -> list[int]:
    """Per cluster member: subscribers of client `d`'s shard channel of `name`'s slot."""
    from .conftest import slot_of

    ch = d._core.slot_channel(slot_of(name))
    out = []
    for cl in members.clusters:
        node = cl.nodes[cl.node_of_slot(slot_of(name))]
        with contextlib.closing(node.client()) as c:
            out.append(dict(c.pubsub_shardnumsub(ch)).get(ch, 0))
    return out


def test_uncontended_locks_over_many_slots_make_no_ssubscribe(members: Members) -> None:
    names = [f"u{j}" for j in range(120)]  # 120 trees: ~120 slots, on every primary
    members.fresh(names)
    d = members.dlm(lease_ms=10_000)
    d.lock("warm", "NL").release()  # first contact (the clusters found) before counting
    before = ssubscribes(members)
    for n in names:
        d.lock(n, "EX", timeout=5).release()
    for n in names[:20]:  # and held, renewed, converted down, released
        lk = d.lock(n, "PW", timeout=5)
        lk.convert("PR")
        lk.release()
    assert ssubscribes(members) - before == 0, "an uncontended lock subscribed its slot"


def test_queued_waiter_subscribes_and_is_granted_by_its_event(members: Members) -> None:
    members.fresh(["qw"])
    a, b = members.dlm(lease_ms=10_000), members.dlm(lease_ms=10_000)
    la = a.lock("qw", "EX")
    assert subscribers(members, a, "qw") == [0, 0, 0]  # the holder reads no event
    req = b.enqueue("qw", "EX", timeout=8)
    time.sleep(0.3)  # b is queued on every member, and subscribed there
    assert not req.done
    assert subscribers(members, b, "qw") == [1, 1, 1]
    t0 = time.monotonic()
    la.release()
    lb = req.wait(8)
    took = time.monotonic() - t0
    # polling would wake at a third of the 10 s lease: the grant event must do it
    assert took < 0.3, f"granted {took:.3f} s after the release"
    lb.release()


def test_grant_published_before_the_subscription_is_not_missed(
        members: Members, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder releases after the waiter's QUEUED replies but before its subscriptions:
    the grant events go to nobody; the re-check after the subscription finds the grant."""
    members.fresh(["gap"])
    a, b = members.dlm(lease_ms=10_000), members.dlm(lease_ms=10_000)
    la = a.lock("gap", "EX")
    released: list[float] = []
    queued_first: list[bool] = []  # (b's request queued when it first subscribes)
    shards = _module(members)._Shards
    real = shards.subscribe

    def first_subscription() -> None:
        if not released:  # (only b subscribes: a's lock never waits)
            queued_first.append(any(v.vote is Vote.QUEUED for lk in list(b._core.locks.values())
                                    for v in lk.votes))
            la.release()
            released.append(time.monotonic())

    def late_subscribe(self: Any, *args: Any, **kw: Any) -> None:
        if not released:
            first_subscription()
            time.sleep(0.1)  # the grant events are published now, unsubscribed
        real(self, *args, **kw)

    async def alate_subscribe(self: Any, *args: Any, **kw: Any) -> None:
        if not released:
            first_subscription()  # (a's facade: its own loop; b's loop waits meanwhile)
            await asyncio.sleep(0.1)  # the grant events are published now, unsubscribed
        await real(self, *args, **kw)

    monkeypatch.setattr(shards, "subscribe",
                        alate_subscribe if members.kind == "async" else late_subscribe)
    req = b.enqueue("gap", "EX", timeout=8)
    lb = req.wait(8)
    assert released, "the waiter never subscribed"
    assert queued_first == [True], "the waiter subscribed before its request was queued"
    took = time.monotonic() - released[0]
    # without the re-check, the lease's third (3.3 s) would be the first look
    assert took < 1.0, f"granted {took:.3f} s after the release"
    lb.release()


def test_on_blocking_fires_on_cluster_members(members: Members) -> None:
    members.fresh(["blk"])
    a, b = members.dlm(lease_ms=10_000), members.dlm(lease_ms=10_000)
    got = threading.Event()
    la = a.lock("blk", "EX", on_blocking=lambda mode: got.set())
    assert subscribers(members, a, "blk") == [1, 1, 1]  # BLKAST: from its first call
    req = b.enqueue("blk", "PR", timeout=8)
    assert got.wait(1.0), "the holder's on_blocking never ran"
    la.release()
    req.wait(8).release()


def test_queued_conversion_granted_by_its_event(members: Members) -> None:
    members.fresh(["cq"])
    a, b = members.dlm(lease_ms=10_000), members.dlm(lease_ms=10_000)
    la = a.lock("cq", "PR")
    lb = b.lock("cq", "PR")
    assert subscribers(members, b, "cq") == [0, 0, 0]  # granted at once: reads no event
    done: list[float] = []
    errors: list[BaseException] = []

    def up() -> None:
        try:
            lb.convert("EX", timeout=8)
            done.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=up)
    t.start()
    time.sleep(0.3)  # the conversion waits behind a's PR on every member
    assert not done and not errors
    assert subscribers(members, b, "cq") == [1, 1, 1]
    t0 = time.monotonic()
    la.release()
    t.join(9)
    assert not errors, errors
    assert done and done[0] - t0 < 0.3, "the conversion was not granted by its event"
    lb.release()


def test_broken_holder_learns_it_by_its_next_renewal(members: Members) -> None:
    """A held lock without on_blocking reads no event (N4): an operator's break reaches it
    by the next renewal, within a third of its lease, and it is reported lost then."""
    from redlockdlm import admin

    members.fresh(["brk"])
    d = members.dlm(lease_ms=3_000)
    lost = threading.Event()
    lk = d.lock("brk", "EX", on_lost=lambda _lock: lost.set())
    assert subscribers(members, d, "brk") == [0, 0, 0]  # held, without on_blocking
    t0 = time.monotonic()
    admin.break_locks(admin.connect(members.urls, NS), ["brk"], lock_id=lk.id)
    assert lost.wait(1.0 + 0.5), "the broken holder was not reported lost by its renewal"
    assert time.monotonic() - t0 < 1.5
    assert not lk.valid


def test_unused_slots_unsubscribed_past_the_limit(members: Members,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot stays subscribed after its lock is released, up to the limit of subscribed
    slots per member; the next slot subscribed past it unsubscribes those of no lock that
    reads events now, and keeps the slot of an `on_blocking` lock still held."""
    from .conftest import slot_of

    names = ["p0", "p1", "p2", "p3"]
    assert len({slot_of(n) for n in names}) == 4
    members.fresh(names)
    monkeypatch.setattr(_module(members), "MAX_SLOT_SUBS", 3)
    d = members.dlm(lease_ms=10_000)
    keep = d.lock("p0", "EX", on_blocking=lambda mode: None)  # reads events while held
    for n in ("p1", "p2"):
        d.lock(n, "EX", on_blocking=lambda mode: None).release()
    assert subscribers(members, d, "p1") == [1, 1, 1]  # (under the limit: kept)
    last = d.lock("p3", "EX", on_blocking=lambda mode: None)  # the 4th slot: past it
    end = time.monotonic() + 2.0
    while time.monotonic() < end and (subscribers(members, d, "p1") != [0, 0, 0]
                                      or subscribers(members, d, "p2") != [0, 0, 0]):
        time.sleep(0.05)  # (the SUNSUBSCRIBE is not waited for)
    assert subscribers(members, d, "p1") == [0, 0, 0]
    assert subscribers(members, d, "p2") == [0, 0, 0]
    assert subscribers(members, d, "p0") == [1, 1, 1]
    assert subscribers(members, d, "p3") == [1, 1, 1]
    keep.release()
    last.release()
