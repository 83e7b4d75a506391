"""Every wait is bounded by the caller's timeout, and only by it (docs/rules.md R3, R4).

- a NOQUEUE request without a timeout returns (NotQueued, QuorumUnavailable or
  InstancesRecovering) when no quorum can decide, instead of blocking;
- a waiter with a timeout waits through a short failure of a majority (SIGSTOP) and is
  granted when the instances come back, instead of failing on one bad round;
- one stalled instance costs nothing once a quorum decided, and a late reply of a request
  that failed meanwhile leaves nothing behind;
- an error says why a wait failed: the instances in their rejoin window (E1), and for
  how long; the instances that did not answer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from redlockdlm import Mode
from redlockdlm.errors import InstancesRecovering, LockTimeout, NotQueued, QuorumUnavailable

from .conftest import Quorum, wait_until

EX = Mode.EX

pytestmark = [pytest.mark.timeout(60), pytest.mark.faults]


def bounded(fn: Any, limit: float) -> tuple[Any, float]:
    """Run `fn` on a thread; (its result or exception, seconds) or fail after `limit` s
    (a call that blocks for good must fail the test, not hang it)."""
    box: list[Any] = []

    def run() -> None:
        t0 = time.monotonic()
        try:
            box.append((fn(), time.monotonic() - t0))
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            box.append((exc, time.monotonic() - t0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert box, f"still blocked after {limit} s"
    return box[0]


def recovering(q: Quorum, which: list[int]) -> None:
    """Instances `which` forget everything, epoch included: the next request starts a new
    epoch there, in its rejoin window (E1) as after a restart."""
    for i in which:
        q.servers[i].flushall()


# --------------------------------------------------------------------------- NOQUEUE


def test_noqueue_without_timeout_returns_while_instances_recover(q3: Quorum) -> None:
    """Two of three instances in their rejoin window: a NOQUEUE request with no timeout
    returns at once with InstancesRecovering naming them and how long each has left."""
    d = q3.dlm(lease_ms=3000, socket_timeout=0.5)
    recovering(q3, [1, 2])
    err, took = bounded(lambda: d.lock("res", EX, noqueue=True), 5)
    assert isinstance(err, InstancesRecovering), repr(err)
    assert isinstance(err, QuorumUnavailable)
    assert took < 2, took
    msg = str(err)
    assert q3.urls[1] in msg and q3.urls[2] in msg and q3.urls[0] not in msg, msg
    assert "rejoin" in msg, msg
    assert sorted(err.recovering) == sorted([q3.urls[1], q3.urls[2]]), err.recovering
    assert all(0 < left <= 3.0 for left in err.recovering.values()), err.recovering
    wait_until(lambda: q3.gone("res"), 3)  # nothing left behind


def test_noqueue_without_timeout_returns_with_one_down_and_a_split_vote(q3: Quorum) -> None:
    """One instance stalled, one granting, one refusing (another lock there only): no
    quorum can decide. The NOQUEUE request returns QuorumUnavailable naming the stalled
    instance, within about its socket timeout, and leaves nothing behind."""
    other = q3.dlm(urls=[q3.urls[1]])  # a lock on instance 1 alone
    held = other.lock("res", EX)
    d = q3.dlm(socket_timeout=0.5)
    q3.servers[2].pause()
    try:
        err, took = bounded(lambda: d.lock("res", EX, noqueue=True), 8)
    finally:
        q3.servers[2].resume()
    assert isinstance(err, QuorumUnavailable), repr(err)
    assert took < 3, took
    assert q3.urls[2] in str(err), str(err)
    assert q3.lock_ids("res", only=[0]) == [set()]
    held.release()


# --------------------------------------------------------------------------- riding out


def test_waiter_with_timeout_rides_out_a_paused_majority(q3: Quorum) -> None:
    """Two of three instances paused for 3 s: a request with timeout=30 waits (re-asking
    them), and is granted once they are resumed, not failed on the first bad round."""
    d = q3.dlm(socket_timeout=0.3, connect_timeout=0.3)
    for i in (1, 2):
        q3.servers[i].pause()
    try:
        req = d.enqueue("res", EX, timeout=30)
        time.sleep(3)
        assert not req.done
    finally:
        for i in (1, 2):
            q3.servers[i].resume()
    lk = req.wait(10)
    assert lk.valid and lk.mode == EX
    wait_until(lambda: q3.granted_on(lk.id, "res") >= 2, 3)
    lk.release()


def test_timeout_during_a_paused_majority_names_the_silent_instances(q3: Quorum) -> None:
    """Paused for longer than the timeout: QuorumUnavailable at the caller's timeout (not
    before), naming the instances that did not answer."""
    d = q3.dlm(socket_timeout=0.3, connect_timeout=0.3)
    for i in (1, 2):
        q3.servers[i].pause()
    try:
        err, took = bounded(lambda: d.lock("res", EX, timeout=1.5), 10)
    finally:
        for i in (1, 2):
            q3.servers[i].resume()
    assert isinstance(err, QuorumUnavailable), repr(err)
    assert 1.5 <= took < 4, took
    assert q3.urls[1] in str(err) and q3.urls[2] in str(err), str(err)


def test_timeout_bounds_a_wait_on_instances_that_answer_nothing(q3: Quorum) -> None:
    """Every instance paused, a socket timeout of 5 s and a request with timeout=0.3: the
    caller gets QuorumUnavailable naming them well before one socket timeout (the round
    and its clean-up are cut at the deadline, plus `ROUND_FLOOR_S`), not after the request
    round and the clean-up round each waited 5 s. Resumed, the instances run the request
    and its withdrawal, and nothing stays behind."""
    d = q3.dlm(socket_timeout=5, connect_timeout=5)
    d.lock("warm", EX, timeout=5).release()  # (connections open: no connect to time out)
    for s in q3.servers:
        s.pause()
    try:
        err, took = bounded(lambda: d.lock("res", EX, timeout=0.3), 20)
    finally:
        for s in q3.servers:
            s.resume()
    assert isinstance(err, QuorumUnavailable), repr(err)
    assert 0.3 <= took < 2.0, took
    assert all(u in str(err) for u in q3.urls), str(err)
    wait_until(lambda: q3.gone("res"), 8)
    lk = d.lock("res", EX, timeout=5)  # (and the client goes on working)
    assert lk.valid
    lk.release()


def test_timeout_bounds_a_conversion_on_instances_that_answer_nothing(q3: Quorum) -> None:
    """The same for a conversion: NL -> EX with timeout=0.3 while every instance is
    paused fails (LockTimeout) well before one socket timeout, not after the
    conversion round and its rollback each waited 5 s; resumed, the lock is not EX on
    any instance and can be converted again."""
    d = q3.dlm(socket_timeout=5, connect_timeout=5)
    lk = d.lock("res", Mode.NL, timeout=5)
    for s in q3.servers:
        s.pause()
    try:
        err, took = bounded(lambda: lk.convert(EX, timeout=0.3), 20)
    finally:
        for s in q3.servers:
            s.resume()
    assert isinstance(err, LockTimeout), repr(err)
    assert 0.3 <= took < 2.0, took
    assert lk.mode is Mode.NL
    other = q3.dlm()
    held = other.lock("res", EX, timeout=5)  # (no EX left behind by the conversion)
    held.release()


def test_timeout_while_instances_recover_names_them(q3: Quorum) -> None:
    """A request whose timeout ends inside the rejoin window of two instances fails with
    InstancesRecovering naming them and the time their window still has, not a bare
    LockTimeout."""
    d = q3.dlm(lease_ms=5000, socket_timeout=0.5)
    recovering(q3, [0, 2])
    err, took = bounded(lambda: d.lock("res", EX, timeout=0.5), 8)
    assert isinstance(err, InstancesRecovering), repr(err)
    assert 0.5 <= took < 3, took
    assert sorted(err.recovering) == sorted([q3.urls[0], q3.urls[2]]), err.recovering
    assert all(3.0 < left <= 5.0 for left in err.recovering.values()), err.recovering
    assert "rejoin window" in str(err) and q3.urls[1] not in str(err), str(err)


# --------------------------------------------------------------------------- one stalled


def test_one_paused_instance_costs_nothing_once_a_quorum_decided(q3: Quorum) -> None:
    """With one instance of three paused, lock/release pairs and NOQUEUE refusals complete
    in a small fraction of the socket timeout (2 s): the two others decided."""
    d = q3.dlm(socket_timeout=2, connect_timeout=2)
    holder = q3.dlm(socket_timeout=2, connect_timeout=2)
    q3.servers[2].pause()
    try:
        for k in range(3):
            _, took = bounded(lambda k=k: d.lock(f"r{k}", EX, timeout=10).release(), 10)
            assert took < 0.5, took
        held = holder.lock("busy", EX, timeout=10)
        err, took = bounded(lambda: d.lock("busy", EX, noqueue=True), 10)
        assert isinstance(err, NotQueued) and took < 0.5, (repr(err), took)
        held.release()
    finally:
        q3.servers[2].resume()
    # the requests and releases the paused instance got meanwhile leave nothing there
    wait_until(lambda: all(q3.gone(f"r{k}") for k in range(3)) and q3.gone("busy"), 5)


def test_a_late_grant_of_a_failed_request_is_withdrawn(q3: Quorum) -> None:
    """Instance 2 paused (for less than the socket timeout) while A takes the lock on the
    two others: B's NOQUEUE request fails at once on their refusals. B's request reaches
    instance 2 when it resumes, maybe before A's: whatever it got there is released, long
    before its lease (10 s) could end it."""
    a = q3.dlm(socket_timeout=2, connect_timeout=2)
    b = q3.dlm(socket_timeout=2, connect_timeout=2)
    q3.servers[2].pause()
    try:
        la = a.lock("res", EX, timeout=10)
        err, took = bounded(lambda: b.lock("res", EX, noqueue=True), 10)
        assert isinstance(err, NotQueued) and took < 0.5, (repr(err), took)
        time.sleep(0.5)
    finally:
        q3.servers[2].resume()
    wait_until(lambda: q3.lock_ids("res", only=[2])[0] <= {la.id}, 5)
    assert q3.lock_ids("res", only=[0, 1]) == [{la.id}] * 2
    la.release()
    wait_until(lambda: q3.gone("res"), 5)
