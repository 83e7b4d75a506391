"""Rule L1 on the protocol core (no I/O): a lock's lease changes (`lock.extend(lease_ms)`)
from one instant on; a vote counts the lease its call carried, never the new one. A
lengthened lease must not stretch a vote renewed at the old one (the lock would look held
while instances may already have expired it), and a shortened one must not cut a vote
renewed at the old one (the lock would be reported lost while every instance holds it)."""

from __future__ import annotations

import pytest

from redlockdlm.engine.codec import RenewEntry
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.errors import InvalidArgument, InvalidType
from redlockdlm.protocol import Session

from .replies import reply

EX = Mode.EX
T = 100.0


def held(s: Session, lease_ms: int | None = None):
    """A lock granted on every instance by a request sent at T."""
    lk = s.new_lock("R", EX, lease_ms=lease_ms)
    lk.pending = set(range(s.n))
    for i, v in enumerate(lk.votes):
        v.sent_at = T
        s.on_reply(lk, i, reply(Status.GRANTED, EX, 10 + i), T, T + 0.001)
    assert s.evaluate_acquire(lk, T + 0.002).done
    return lk


def renewed(s: Session, batches, sent_at: float, now: float) -> None:
    for i, _, lks in batches:
        s.on_renew_reply(i, lks, ("e", [RenewEntry(Status.GRANTED, EX, 10 + i, 0, -1)
                                        for _ in lks]), sent_at, now)


def test_a_renewal_sent_before_a_longer_lease_counts_the_old_one() -> None:
    s = Session(3, "t", lease_ms=1000, rejoin_ms=10_000)
    lk = held(s)
    batches = s.renew_cmds(T + 0.1)  # a renewal tick, carrying 1000 ms
    s.change_lease(lk, 5000, T + 0.2)  # extend(5000) while it is in flight
    renewed(s, batches, T + 0.1, T + 0.3)  # its replies come after the change
    # The instances hold the lock until about T + 1.1: not later, whatever we now ask.
    assert lk.validity(T + 1.2) <= 0
    assert s.holding(lk, T + 1.2) < s.quorum
    assert s.check_held(T + 1.2) == [lk]


def test_a_renewal_sent_after_the_change_counts_the_new_lease() -> None:
    s = Session(3, "t", lease_ms=1000, rejoin_ms=10_000)
    lk = held(s)
    s.change_lease(lk, 5000, T + 0.2)
    cmds = s.renew_lock_cmds(lk)
    assert len(cmds) == 3
    renewed(s, [(i, c, [lk]) for i, c in cmds], T + 0.21, T + 0.25)
    assert 3.5 < lk.validity(T + 1.2) < 4.0  # 5 s from T + 0.21, less the drift


def test_a_shorter_lease_does_not_cut_a_vote_renewed_at_the_longer_one() -> None:
    s = Session(3, "t", lease_ms=5000, rejoin_ms=10_000)
    lk = held(s)
    s.change_lease(lk, 1000, T + 3.0)
    # Granted at T for 5 s on every instance: still held at T + 3.5 (no renewal yet).
    assert 1.0 < lk.validity(T + 3.5) < 1.5
    assert s.check_held(T + 3.5) == []
    assert s.renew_interval() == pytest.approx(1000 / 3000.0)  # renewed at the new pace


def test_a_call_timed_at_the_very_instant_of_a_change_counts_the_shorter_lease() -> None:
    s = Session(3, "t", lease_ms=1000, rejoin_ms=10_000)
    lk = held(s)
    s.change_lease(lk, 5000, T)  # the same clock reading as the grant's request
    assert lk.validity(T + 1.2) <= 0
    s2 = Session(3, "t", lease_ms=5000, rejoin_ms=10_000)
    lk2 = held(s2)
    s2.change_lease(lk2, 1000, T)
    assert lk2.validity(T + 1.2) <= 0


def test_old_changes_are_dropped_without_changing_any_answer() -> None:
    s = Session(3, "t", lease_ms=1000, rejoin_ms=10_000)
    lk = held(s)
    s.change_lease(lk, 2000, T + 0.5)
    s.change_lease(lk, 1500, T + 10.0)  # the first change is older than any lease
    assert lk.lease_changes == [(T + 10.0, 2000)]
    assert lk.validity(T + 10.0) <= 0  # the grant at T ran out long ago


def test_a_lease_the_instances_refuse_is_not_taken() -> None:
    s = Session(3, "t", lease_ms=1000, rejoin_ms=3000)
    with pytest.raises(InvalidArgument):
        s.check_lock_lease(5000)  # beyond the client's rejoin_ms (E1)
    with pytest.raises(InvalidArgument):
        s.check_lock_lease(99)
    with pytest.raises(InvalidType):
        s.check_lock_lease(1500.0)
    assert s.check_lock_lease(3000) == 3000
