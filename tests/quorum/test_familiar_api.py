"""What users of other lock libraries expect (docs/api-map.md): a `threading.Lock`-style
mutex (`dlm.mutex`: acquire(blocking, timeout) -> bool, release, locked, owned, `with`),
an opt-in reentrant one, a `@dlm.locked(...)` decorator, and `lock.extend(lease_ms)`
changing one lock's lease (rule L1). Misuse gets a typed error and changes no lock state.
Over N=1,3,5 and both clients (the `q` fixture; `q3`: N=3, both clients)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from redlockdlm import Mode
from redlockdlm.errors import (
    AlreadyHeld,
    Deadlock,
    InvalidArgument,
    InvalidType,
    LeaseTooLong,
    LockReleased,
    NotHeld,
    NotQueued,
)

from .conftest import Quorum, wait_until

pytestmark = pytest.mark.timeout(60)

EX, PR = Mode.EX, Mode.PR


def only(q: Quorum, lock_ids: set[str], *path: str) -> None:
    """Every instance has exactly `lock_ids` granted on `path` (nothing queued)."""
    assert q.lock_ids(*path) == [lock_ids] * q.n
    assert all(lk.queue == "G" for locks in q.locks(*path) for lk in locks)


def leases_left(q: Quorum, lock_id: str, *path: str) -> list[int]:
    return [lv.lease_left_ms for locks in q.locks(*path) for lv in locks
            if lv.lock_id == lock_id]


def test_mutex_behaves_as_a_threading_lock(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    m, other = a.mutex("jobs/nightly"), b.mutex("jobs/nightly")
    assert not m.owned() and m.lock is None
    assert not m.locked()  # nobody holds it
    assert m.acquire() is True
    assert m.owned() and m.lock.mode == EX
    assert m.locked() and other.locked()  # held, whoever asks
    assert not other.owned()
    assert other.acquire(blocking=False) is False  # not free now: False, nothing queued
    t0 = time.monotonic()
    assert other.acquire(timeout=0.3) is False  # gave up after the timeout
    assert time.monotonic() - t0 >= 0.25
    only(q, {m.lock.id}, "jobs/nightly")  # neither attempt left anything behind
    m.release()
    assert not m.owned() and m.lock is None
    assert other.acquire(blocking=False) is True
    only(q, {other.lock.id}, "jobs/nightly")
    other.release()
    assert m.acquire(timeout=0) is True  # free: a zero timeout still asks every instance
    m.release()
    assert q.gone("jobs/nightly")


def test_mutex_modes_follow_the_compatibility_table(q3: Quorum) -> None:
    a, b = q3.dlm(), q3.dlm()
    r1, r2 = a.mutex("table", PR), b.mutex("table", PR)
    assert r1.acquire(blocking=False) and r2.acquire(blocking=False)  # readers share
    w = b.mutex("table", EX)
    assert w.locked() and not r1.locked()  # EX conflicts with the readers, PR does not
    r1.release()
    r2.release()
    assert not w.locked()


def test_mutex_with_block_releases_whatever_happens(q: Quorum) -> None:
    d = q.dlm()
    m = d.mutex("R")
    with m:
        assert m.owned()
        held = m.lock.id
        only(q, {held}, "R")
    assert not m.owned() and q.gone("R")
    with pytest.raises(KeyError), m:
        raise KeyError("boom")
    assert not m.owned() and q.gone("R")


def test_mutex_misuse_raises_typed_errors_and_changes_nothing(q: Quorum) -> None:
    d = q.dlm()
    m = d.mutex("R")
    with pytest.raises(NotHeld) as ei:  # releasing what is not held
        m.release()
    assert isinstance(ei.value, RuntimeError)  # as threading.Lock says it
    assert m.acquire()
    held = m.lock.id
    with pytest.raises(AlreadyHeld):  # acquire twice on one (non-reentrant) mutex
        m.acquire()
    with pytest.raises(AlreadyHeld):
        m.acquire(blocking=False)
    with pytest.raises(InvalidArgument):  # threading: no timeout on a non-blocking call
        d.mutex("S").acquire(blocking=False, timeout=1)
    with pytest.raises(InvalidType):
        d.mutex("S").acquire(blocking="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        d.mutex("S").acquire(timeout=-5)
    with pytest.raises(InvalidArgument):  # the wait is acquire's to say
        d.mutex("S", timeout=3)
    with pytest.raises(InvalidArgument):
        d.mutex("S", "XX")
    with pytest.raises(InvalidType):
        d.mutex("S", reentrant=1)  # type: ignore[arg-type]
    assert m.owned() and m.lock.id == held  # still held, as before
    only(q, {held}, "R")
    assert q.gone("S")
    m.release()
    with pytest.raises(NotHeld):  # released twice
        m.release()
    assert q.gone("R")


def test_a_second_mutex_of_the_same_owner_is_a_self_deadlock(q: Quorum) -> None:
    """Two mutexes of one DLM on one resource in conflicting modes: the owner would wait
    for itself, so the second fails at once with Deadlock (G14), not an endless wait."""
    d = q.dlm()
    m1, m2 = d.mutex("R"), d.mutex("R")
    assert m1.acquire()
    t0 = time.monotonic()
    with pytest.raises(Deadlock):
        m2.acquire(timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert not m2.owned()
    only(q, {m1.lock.id}, "R")
    m1.release()
    assert m2.acquire(blocking=False)  # the failed attempt left nothing behind
    m2.release()


def test_reentrant_mutex_counts_its_acquisitions(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    m = a.mutex("R", reentrant=True)
    other = b.mutex("R")
    assert m.acquire() and m.acquire(blocking=False) and m.acquire(timeout=0)
    held = m.lock.id
    only(q, {held}, "R")  # one lock however many acquisitions
    m.release()
    m.release()
    assert m.owned() and m.lock.id == held  # one acquisition still not released
    assert other.acquire(blocking=False) is False
    m.release()
    assert not m.owned()
    assert other.acquire(blocking=False) is True
    other.release()
    with pytest.raises(NotHeld):
        m.release()


def test_locked_decorator_holds_the_lock_for_each_call(q3: Quorum) -> None:
    d, watcher = q3.dlm(), q3.dlm()
    seen: list[set[str]] = []

    def body(x: int) -> int:
        seen.append(q3.lock_ids("jobs/nightly")[0])
        with pytest.raises(NotQueued):  # nobody else gets it during the call
            watcher.lock("jobs/nightly", EX, noqueue=True)
        return x * 2

    if q3.kind == "sync":
        @d.locked("jobs/nightly", EX, timeout=5)
        def job(x: int) -> int:
            """the job"""
            return body(x)

        assert job(21) == 42 and job.__doc__ == "the job"

        async def coro() -> None:
            pass

        with pytest.raises(InvalidType):  # DLM decorates plain functions
            d.locked("R")(coro)
    else:
        adlm = d.adlm

        @adlm.locked("jobs/nightly", EX, timeout=5)
        async def ajob(x: int) -> int:
            """the job"""
            return await asyncio.to_thread(body, x)

        assert d.run(ajob(21)) == 42 and ajob.__doc__ == "the job"
        with pytest.raises(InvalidType):  # AsyncDLM decorates coroutine functions
            adlm.locked("R")(lambda: None)
    assert len(seen) == 1 and len(seen[0]) == 1  # one lock, held during the call
    assert q3.gone("jobs/nightly")  # released after it

    def gen() -> object:
        yield 1

    target = d if q3.kind == "sync" else d.adlm
    with pytest.raises(InvalidType):  # its body would run after the release
        target.locked("R")(gen)
    with pytest.raises(InvalidArgument):  # checked when decorating, not at the call
        target.locked("R", "XX")
    with pytest.raises(InvalidType):
        target.locked("R", timeout="1")


def test_locked_decorator_releases_when_the_function_raises(q3: Quorum) -> None:
    d = q3.dlm()
    if q3.kind == "sync":
        @d.locked("R")
        def boom() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            boom()
    else:
        @d.adlm.locked("R")
        async def aboom() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            d.run(aboom())
    assert q3.gone("R")


def test_extend_gives_one_lock_a_new_lease(q: Quorum) -> None:
    d = q.dlm(lease_ms=1000, rejoin_ms=6000)
    lk = d.lock("R", EX)
    other = d.lock("S", EX)  # keeps the client's lease
    assert max(leases_left(q, lk.id, "R")) <= 1000
    lk.extend(5000)
    assert all(left > 2000 for left in leases_left(q, lk.id, "R"))  # renewed at 5 s
    assert lk.validity_ms > 2000
    time.sleep(1.2)  # beyond the old lease: its renewals use the new one
    assert lk.valid and lk.validity_ms > 2000
    assert all(left > 2000 for left in leases_left(q, lk.id, "R"))
    assert max(leases_left(q, other.id, "S")) <= 1000  # the other lock is unchanged
    lk.extend(500)  # shorter: from now on
    assert all(left <= 500 for left in leases_left(q, lk.id, "R"))
    time.sleep(0.8)
    assert lk.valid  # kept by renewals at the short lease
    lk.extend()  # renewed now, same lease
    assert lk.valid and all(left <= 500 for left in leases_left(q, lk.id, "R"))
    lk.release()
    with pytest.raises(LockReleased):
        lk.extend(1000)


def test_extend_refuses_a_lease_the_instances_do_not_allow(q: Quorum) -> None:
    for i in range(q.n):  # the instances wait 3 s after a restart before granting (E1)
        q.engine(i).init_fresh(rejoin_ms=3000)
    d = q.dlm(lease_ms=1000, rejoin_ms=3000)
    lk = d.lock("R", EX)
    with pytest.raises(LeaseTooLong) as ei:
        lk.extend(5000)  # longer than the instances' rejoin wait
    assert ei.value.lease_ms == 5000 and ei.value.rejoin_ms == 3000
    with pytest.raises(InvalidArgument):
        lk.extend(50)  # below 100 ms
    with pytest.raises(InvalidType):
        lk.extend("5000")  # type: ignore[arg-type]
    assert max(leases_left(q, lk.id, "R")) <= 1000  # nothing changed
    time.sleep(1.2)
    assert lk.valid  # and it is still renewed with its lease
    lk.extend(3000)  # the longest allowed
    assert all(left > 1500 for left in leases_left(q, lk.id, "R"))
    with pytest.raises(LeaseTooLong):
        d.mutex("S", lease_ms=5000)  # the same bound for a mutex's lease
    lk.release()
    wait_until(lambda: q.gone("R"))


def test_a_mutex_being_acquired_elsewhere_is_not_acquired_twice(q3: Quorum) -> None:
    """One Mutex shared by two threads (or tasks): while one waits in acquire, the other's
    acquire raises AlreadyHeld at once; the waiter is granted once the holder lets go."""
    a, b = q3.dlm(), q3.dlm()
    holder = b.lock("R", EX)
    m = a.mutex("R")
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(m.acquire(timeout=10)), daemon=True)
    t.start()
    wait_until(lambda: sum(len(ids) for ids in q3.lock_ids("R")) > q3.n)  # it queued
    with pytest.raises(AlreadyHeld):
        m.acquire(blocking=False)
    holder.release()
    t.join(10)
    assert got == [True] and m.owned()
    only(q3, {m.lock.id}, "R")
    m.release()


def test_an_async_acquire_cancelled_while_waiting_leaves_nothing(ready) -> None:
    q = ready(3, "async")
    a, b = q.dlm(), q.dlm()
    holder = b.lock("R", EX)
    m = a.mutex("R")

    async def give_up() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(m._a.acquire(), 0.5)

    a.run(give_up())
    assert not m.owned()
    only(q, {holder.id}, "R")  # the request was withdrawn everywhere
    holder.release()
    assert m.acquire(blocking=False)  # and the mutex is usable again
    m.release()
