"""A failed conversion on the protocol core (no I/O): what the holder believes afterwards
must be what the instances hold (docs/rules.md G4; docs/verification.md, simulator seed 20).

Found by the deterministic simulator: a down-conversion CW -> CR that missed a quorum (one
instance paused) was rolled back by converting UP to CW where CR had been granted, and the
rollback counted that instance as CW whatever it answered, so the holder believed CW while
another client held PR there.
"""

from __future__ import annotations

import redis

from redlockdlm.engine.modes import COMPAT, Mode, Status
from redlockdlm.errors import LockStateError, LockTimeout
from redlockdlm.protocol import Phase, Session, Vote

from .replies import reply

CR, CW, PR, PW, EX = Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX


def held(s: Session, mode: Mode, t: float):
    lk = s.new_lock("r", mode)
    lk.pending = set(range(s.n))
    for i, v in enumerate(lk.votes):
        v.sent_at = t
        s.on_reply(lk, i, reply(Status.GRANTED, mode, 10), t, t + 0.001)
    assert s.evaluate_acquire(lk, t + 0.002).done
    return lk


def test_a_down_conversion_that_misses_a_quorum_is_not_taken_back() -> None:
    """CW -> CR reaches instance 0 only (1 and 2 paused) before its timeout. Instance 0 now
    holds CR, and may have granted PR beside it. The holder must not believe CW any more,
    nor send a conversion back up (which could queue behind that PR): it holds CR, covered
    everywhere (CW or CR), and is told the conversion did not reach a quorum."""
    s = Session(3, "t", lease_ms=10_000)
    t = 100.0
    lk = held(s, CW, t)
    m, flags, down = s.start_convert(lk, CR)
    assert down
    lk.deadline = t + 1.0
    lk.pending = set(range(3))
    for v in lk.votes:
        v.sent_at = t + 0.5
    s.on_reply(lk, 0, reply(Status.GRANTED, CR, 10), t + 0.5, t + 0.501)
    out = s.evaluate_convert(lk, CW, t + 1.1, timed_out=True)
    assert isinstance(out.error, LockTimeout)
    assert out.cleanup == []  # nothing converts back up
    assert lk.mode == CR and lk.phase is Phase.HELD
    assert COMPAT[lk.mode][PR]  # the PR instance 0 may have granted beside it is fine
    assert s.holding(lk, t + 1.2) == 3  # CR where it arrived, CW (covers CR) elsewhere


def test_a_way_back_that_queues_is_not_counted_as_held() -> None:
    """PR -> CW (sideways) granted on instance 0 only, then refused by its timeout. The way
    back to PR queues on instance 0 (a CW lock got in beside ours there): instance 0 holds
    CW for us, which does not cover PR; only the instances that answered PR count."""
    s = Session(3, "t", lease_ms=10_000)
    t = 100.0
    lk = held(s, PR, t)
    s.start_convert(lk, CW)
    lk.deadline = t + 1.0
    lk.pending = set(range(3))
    for v in lk.votes:
        v.sent_at = t + 0.5
    s.on_reply(lk, 0, reply(Status.GRANTED, CW, 10), t + 0.5, t + 0.501)
    for i in (1, 2):
        s.on_reply(lk, i, reply(Status.QUEUED, PR, 10), t + 0.5, t + 0.501)
    out = s.evaluate_convert(lk, PR, t + 1.1, timed_out=True)
    assert isinstance(out.error, LockTimeout)
    sent = dict(out.cleanup)
    assert set(sent) == {0, 1, 2}  # back to PR on 0, cancel the queued ones
    s.rollback_convert(lk, PR, {0: reply(Status.QUEUED, CW, 10),
                                1: reply(Status.CANCELLED, PR, 10),
                                2: reply(Status.CANCELLED, PR, 10)})
    assert lk.mode == PR
    assert s.holding(lk, t + 1.2) == 2  # not instance 0: it holds CW there, not PR


def test_a_conversion_that_did_not_take_somewhere_is_sent_there_again() -> None:
    """Sim `jobs` seed 11: PW -> EX without a timeout. Instance 1 refused it (the lock still
    waited there: DLM_STATE) and was then granted PW by its queue; the conversion to
    instance 0 got no answer (lost), a renewal found PW granted there; instance 2 granted
    EX. No event can come from 0 or 1: at the re-check the conversion itself is sent to
    both again (a request would only report the old grant), and their grants complete it."""
    s = Session(3, "t", lease_ms=10_000)
    t = 100.0
    lk = held(s, PW, t)
    m, flags, down = s.start_convert(lk, EX)
    lk.cargs = (m, flags, None, 0)  # (as the flow records what it sent)
    lk.pending = set(range(3))
    s.on_reply(lk, 1, LockStateError("lock is not granted yet"), t + 0.1, t + 0.101)
    s.on_reply(lk, 2, reply(Status.GRANTED, EX, 20), t + 0.1, t + 0.101)
    s.on_reply(lk, 0, redis.TimeoutError("no reply"), t + 0.1, t + 1.1)
    for i in (0, 1):  # what later renewals report there: PW granted, no conversion
        lk.votes[i].vote, lk.votes[i].mode = Vote.GRANTED, PW
    out = s.evaluate_convert(lk, PW, t + 1.2)
    assert not out.done and out.error is None
    assert out.wake_at is not None and out.wake_at <= t + 1.2 + 0.6  # soon, not a tick
    cmds = dict(s.recheck_cmds(lk, t + 1.8))  # (2: its split-vote yield is re-asked too)
    assert cmds[0][0] == cmds[1][0] == "convert", cmds
    for i in (0, 1, 2):
        s.on_reply(lk, i, reply(Status.GRANTED, EX, 21 + i), t + 1.8, t + 1.801)
    assert s.evaluate_convert(lk, PW, t + 1.802).done and lk.mode == EX
