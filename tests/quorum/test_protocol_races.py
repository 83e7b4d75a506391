"""Races between replies, events and renewals, replayed on the protocol core (no I/O).

Both were found by tests/quorum/test_faults.py::test_split_votes_resolve_without_detector
(a lock reported lost, or invalid, while held, under split votes); here each interleaving
is written out so it is checked deterministically.
"""

from __future__ import annotations

import redis

from redlockdlm.engine.codec import Event, RenewEntry
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.protocol import Phase, Session, Vote

from .replies import reply

EX = Mode.EX


def acquiring(s: Session, now: float):
    lk = s.new_lock("hot", EX)
    lk.pending = set(range(s.n))
    for v in lk.votes:
        v.sent_at = now
    return lk


def test_stale_renewal_reply_does_not_lose_a_fresh_grant() -> None:
    """A renewal sent while the lock waited everywhere comes back after the grant events:
    its 'queued' answers describe the past, the lock is held, nothing is lost."""
    s = Session(3, "t", lease_ms=2000)
    t = 100.0
    lk = acquiring(s, t)
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED), t, t + 0.001)
    assert not s.evaluate_acquire(lk, t + 0.002).done
    batches = s.renew_cmds(t + 0.010)  # the renewal tick: sent while queued everywhere
    renew_sent = t + 0.010
    for i in range(3):  # the grant events overtake the renewal's replies
        s.on_event(i, Event("G", lk.id, EX, token=10 + i), t + 0.011)
    assert s.evaluate_acquire(lk, t + 0.012).done and lk.phase is Phase.HELD
    for i, _, lks in batches:
        s.on_renew_reply(i, lks, ("e", [RenewEntry(Status.QUEUED, None, 0, 0, 5)]),
                         renew_sent, t + 0.013)
    assert s.check_held(t + 0.014) == []
    assert lk.phase is Phase.HELD
    assert s.holding(lk, t + 0.014) == 3


def test_a_renewal_sent_after_the_grant_still_counts() -> None:
    """The staleness rule only skips replies older than the grant: a renewal sent after it
    that finds the lock gone (broken, expired) is believed."""
    s = Session(3, "t", lease_ms=2000)
    t = 100.0
    lk = acquiring(s, t)
    for i in range(3):
        s.on_reply(lk, i, reply(Status.GRANTED, EX, 10 + i), t, t + 0.001)
    assert s.evaluate_acquire(lk, t + 0.002).done
    batches = s.renew_cmds(t + 1.0)
    for i, _, lks in batches[:2]:
        s.on_renew_reply(i, lks, ("e", [RenewEntry(Status.NOTFOUND, None, 0, -1, -1)]),
                         t + 1.0, t + 1.001)
    assert s.check_held(t + 1.002) == [lk]


def test_a_yield_in_flight_does_not_count_towards_a_quorum() -> None:
    """Granted on instance 0 only; an older ticket queues behind us there, so we give
    instance 0 back (yield). Until that yield's reply, instance 0 must not count: a grant
    event from instance 1 alone is not a quorum (the older waiter may be getting instance 0
    and instance 2 meanwhile)."""
    s = Session(3, "t", lease_ms=2000)
    t = 100.0
    lk = acquiring(s, t)
    s.on_reply(lk, 0, reply(Status.GRANTED, EX, 10), t, t + 0.001)
    s.on_reply(lk, 1, reply(Status.QUEUED), t, t + 0.001)
    s.on_reply(lk, 2, reply(Status.QUEUED), t, t + 0.001)
    lk.round_done = True  # the split-vote yield of this round is not what we look at here
    notes = s.on_event(0, Event("B", lk.id, EX, ticket=lk.ticket - 1, other="older"),
                       t + 0.002)
    assert [(k, a) for k, _, a in notes] == [("yield", 0)]
    s.yield_cmd_for(lk, 0)  # what both clients do with the note, at once
    s.on_event(1, Event("G", lk.id, EX, token=11), t + 0.003)
    out = s.evaluate_acquire(lk, t + 0.004)
    assert not out.done and lk.phase is Phase.ACQUIRING
    assert lk.votes[0].vote is not Vote.GRANTED
    # ...and once instance 0 grants us again (the yield's reply or a newer event), we hold.
    s.on_event(0, Event("G", lk.id, EX, token=12), t + 0.005)
    assert s.evaluate_acquire(lk, t + 0.006).done


PW = Mode.PW


def held(s: Session, mode: Mode, now: float):
    lk = acquiring(s, now)
    lk.rq = mode
    for i in range(s.n):
        s.on_reply(lk, i, reply(Status.GRANTED, mode, 10 + i), now, now + 0.001)
    assert s.evaluate_acquire(lk, now + 0.002).done
    return lk


def test_a_conversion_that_cannot_queue_never_gives_its_grant_back() -> None:
    """G4: a conversion to the same mode (or down) is granted at once wherever the lock is
    granted, never split between instances. An older conversion queued behind the lock
    (its blocking event) is no split vote: the holder keeps its grant. A yield there
    would be applied by the instance to the lock's own grant (Y1: back to the wait queue,
    the lock lost on that instance) while the conversion's replies still say granted:
    two holders (the simulator's seed 80)."""
    t = 100.0
    for old, new in ((PW, PW), (EX, EX), (EX, Mode.PR), (PW, Mode.CR)):
        s = Session(3, "t", lease_ms=2000)
        lk = held(s, old, t)
        s.start_convert(lk, new)
        lk.pending = set(range(3))
        for i in range(3):
            if new != old:  # the down-conversion's grant, in the new mode
                s.on_reply(lk, i, reply(Status.GRANTED, new, 10 + i), t, t + 0.003)
                lk.pending = set(range(i + 1, 3))
            notes = s.on_event(i, Event("B", lk.id, PW, ticket=lk.cticket - 1,
                                        other="older"), t + 0.004)
            assert all(k != "yield" for k, _, _ in notes), (old, new, notes)
        assert all(v.vote is Vote.GRANTED for v in lk.votes)


def test_a_same_mode_conversion_short_of_a_quorum_keeps_its_grant() -> None:
    """The split-vote round of a conversion (every instance answered, no quorum) gives
    back grants only for a conversion that can queue: a same-mode one with a timeout,
    two instances unreachable for now (R3: it waits through failures), keeps the grant
    it holds on the third."""
    t = 100.0
    s = Session(3, "t", lease_ms=2000)
    lk = held(s, PW, t)
    s.start_convert(lk, PW)
    lk.deadline = t + 5.0
    s.on_reply(lk, 0, reply(Status.GRANTED, PW, 10), t, t + 0.003)
    for i in (1, 2):
        s.on_reply(lk, i, redis.TimeoutError("Timeout reading"), t, t + 1.0)
    lk.pending = set()
    out = s.evaluate_convert(lk, PW, t + 1.001)
    assert out.error is None and not out.actions, out
    assert lk.votes[0].vote is Vote.GRANTED


def test_a_reply_that_overtakes_our_yield_does_not_count_the_yielded_grant() -> None:
    """An up-conversion granted on instance 0 only gives it back (Y1) when an older
    conversion waits behind it there. A re-check sent meanwhile on another connection
    may reach instance 0 before the yield and answer 'granted' with the very grant we
    gave back: it is gone once the yield lands, so it must not count (as a grant event
    not newer than our yield does not); a grant after the yield (a newer token) does."""
    s = Session(3, "t", lease_ms=2000)
    t = 100.0
    lk = held(s, Mode.CR, t)
    s.start_convert(lk, EX)
    s.on_reply(lk, 0, reply(Status.GRANTED, EX, 20), t, t + 0.003)
    s.on_reply(lk, 1, reply(Status.QUEUED, Mode.CR, 11), t, t + 0.003)
    s.on_reply(lk, 2, reply(Status.QUEUED, Mode.CR, 12), t, t + 0.003)
    lk.round_done = True
    notes = s.on_event(0, Event("B", lk.id, EX, ticket=lk.cticket - 1, other="older"),
                       t + 0.004)
    assert [(k, a) for k, _, a in notes] == [("yield", 0)]
    s.yield_cmd_for(lk, 0)
    s.on_reply(lk, 0, reply(Status.GRANTED, EX, 20), t + 0.005, t + 0.006)  # the re-check
    s.on_event(1, Event("G", lk.id, EX, token=21), t + 0.007)
    assert lk.votes[0].vote is not Vote.GRANTED
    assert not s.evaluate_convert(lk, Mode.CR, t + 0.008).done
    s.on_reply(lk, 0, reply(Status.GRANTED, EX, 22), t + 0.009, t + 0.010)  # granted again
    assert s.evaluate_convert(lk, Mode.CR, t + 0.011).done


def test_a_grant_event_older_than_a_queued_reply_does_not_count() -> None:
    """Sim deadlock seed 14: granted on instances 0 and 1 (token 50) while our messages
    were slow; the grant expired there, our re-sent request was queued again (behind a
    holder granted meanwhile, the sequence now 60), then the grant events sent before
    arrived. In either order the QUEUED reply wins over an event whose token is not above
    the sequence it reports; a grant after the reply (token 61) counts."""
    s = Session(3, "t", lease_ms=2000)
    t = 100.0
    lk = acquiring(s, t)
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED, extra=40), t, t + 0.001)
    # instance 0: the reply first, then the stale event
    s.on_reply(lk, 0, reply(Status.QUEUED, extra=60), t + 1.0, t + 1.001)
    s.on_event(0, Event("G", lk.id, EX, token=50), t + 1.002)
    # instance 1: the stale event first, then the reply that says queued
    s.on_event(1, Event("G", lk.id, EX, token=50), t + 1.0)
    s.on_reply(lk, 1, reply(Status.QUEUED, extra=60), t + 1.0, t + 1.003)
    assert [v.vote for v in lk.votes[:2]] == [Vote.QUEUED, Vote.QUEUED]
    assert not s.evaluate_acquire(lk, t + 1.004).done and lk.phase is Phase.ACQUIRING
    # later grants (tokens above 60) count, by event before or after a queued reply
    s.on_event(0, Event("G", lk.id, EX, token=61), t + 1.5)
    s.on_event(1, Event("G", lk.id, EX, token=62), t + 1.5)
    s.on_reply(lk, 1, reply(Status.QUEUED, extra=60), t + 1.4, t + 1.501)
    assert s.evaluate_acquire(lk, t + 1.502).done and lk.token == 62
