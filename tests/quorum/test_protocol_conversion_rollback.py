"""A failed conversion on the protocol core (no I/O): what the holder believes afterwards
must be what the instances hold (docs/rules.md G4; docs/verification.md, simulator seed 20).

Found by the deterministic simulator: a down-conversion CW -> CR that missed a quorum (one
instance paused) was rolled back by converting UP to CW where CR had been granted, and the
rollback counted that instance as CW whatever it answered, so the holder believed CW while
another client held PR there.
"""

from __future__ import annotations

import redis

from redlockdlm.engine.codec import RenewEntry
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


def test_a_conversion_learnt_from_renewals_is_not_counted_as_the_old_mode() -> None:
    """Simulator, profile cut seed 50: CW -> PR, granted on every instance; only instance
    2's reply came, the renewals found PR granted on 0 and 1. A renewal carries no value,
    so it does not complete the conversion, but those instances no longer hold CW: when
    the conversion times out, the lock must not count CW held there (it was recorded as
    "queued in the old mode", so the holder believed CW beside another client's PR)."""
    s = Session(3, "t", lease_ms=10_000)
    t = 100.0
    lk = held(s, CW, t)
    m, flags, down = s.start_convert(lk, PR)
    lk.cargs = (m, flags, None, 0)
    lk.deadline = t + 0.5
    lk.pending = {0, 1}
    s.on_reply(lk, 2, reply(Status.GRANTED, PR, 20), t, t + 0.001)
    batches = [b for b in s.renew_cmds(t + 0.2) if b[0] in (0, 1)]
    for i, _, lks in batches:
        s.on_renew_reply(i, lks, ("e", [RenewEntry(Status.GRANTED, PR, 20 + i, 0, -1)]),
                         t + 0.2, t + 0.201)
    assert not s.evaluate_convert(lk, CW, t + 0.202).done  # (no value yet: not complete)
    assert s.holding(lk, t + 0.202) == 3  # PR held there, which the conversion asks
    out = s.evaluate_convert(lk, CW, t + 0.6, timed_out=True)
    assert isinstance(out.error, LockTimeout)
    # Until the clean-up's answers, the lock claims only what CW and PR both protect (CR),
    # which PR covers: never CW where PR is granted
    assert lk.mode == CR and lk.validity(t + 0.6) > 0
    assert not any(v.vote is Vote.QUEUED and v.mode == CW for v in lk.votes)
    assert sorted(i for i, _ in out.cleanup) == [0, 1, 2]  # converted back everywhere
    s.rollback_convert(lk, CW, {0: reply(Status.GRANTED, CW, 30), 1: reply(Status.DEADLOCK),
                                2: reply(Status.GRANTED, CW, 32)})
    assert lk.mode == CW and s.holding(lk, t + 0.7) == 2  # CW again where it answered so


def test_a_sideways_conversion_claims_only_what_both_modes_protect() -> None:
    """Simulator seed 2327: CW -> PR timed out, queued on instances 0 and 2 and granted on
    1. While its cancels were on their way, 0 and 2 granted the conversion (PR) and then
    another client PR beside it; the holder had gone back to CW at once, its queued votes
    counting for CW (G6): two holders. Neither of CW and PR covers the other, so from the
    start of such a conversion until the clean-up's answers the lock claims CR, which
    every instance keeps whatever it did with the conversion."""
    s = Session(3, "t", lease_ms=10_000)
    t = 100.0
    lk = held(s, CW, t)
    m, flags, down = s.start_convert(lk, PR)
    lk.cargs, lk.deadline = (m, flags, None, 0), t + 0.5
    assert lk.mode == CR and lk.rq == PR  # (what the holder may rely on meanwhile)
    lk.pending = set(range(3))
    for i in (0, 2):
        s.on_reply(lk, i, reply(Status.QUEUED, CW, 10, extra=10), t, t + 0.001)
    s.on_reply(lk, 1, reply(Status.GRANTED, PR, 20), t, t + 0.001)
    out = s.evaluate_convert(lk, CW, t + 0.6, timed_out=True)
    assert isinstance(out.error, LockTimeout)
    assert lk.mode == CR  # not CW while the cancels are on their way
    assert COMPAT[lk.mode][PR]
    # the answers: 0 and 2 had granted PR before the cancel (CANCELGRANT), 1 went back
    s.rollback_convert(lk, CW, {0: reply(Status.CANCELGRANT, PR, 21),
                                1: reply(Status.GRANTED, CW, 22),
                                2: reply(Status.CANCELGRANT, PR, 23)})
    assert lk.mode == CW and s.holding(lk, t + 0.7) == 1  # CW on one instance only: lost


def test_no_repair_takes_a_failed_sideways_conversion_down_to_its_claim() -> None:
    """Simulator, profile cut seed 1261: PR -> CW timed out, queued on instances 0 and 1,
    granted CW on 2. While its clean-up (cancels, a conversion back to PR) was in flight the
    lock was back in phase HELD claiming CR (the mode both protect), and a renewal found PR
    granted on 0 and 1 (the cancels had landed): R1 took that for a down-conversion to CR
    that had not arrived and sent it there. The instances then held CR, another client got
    PW beside it, and the clean-up's answers (PR, from before the repair) made the holder
    count PR again: two holders. CR is a claim, not a mode the lock was converted to: no
    repair is sent until the clean-up's answers are in, and the lock keeps PR."""
    s = Session(3, "t", lease_ms=10_000)
    t = 100.0
    lk = held(s, PR, t)
    m, flags, down = s.start_convert(lk, CW)
    lk.cargs, lk.deadline = (m, flags, None, 0), t + 0.5
    lk.pending = set(range(3))
    for i in (0, 1):
        s.on_reply(lk, i, reply(Status.QUEUED, PR, 10, extra=10), t, t + 0.001)
    s.on_reply(lk, 2, reply(Status.GRANTED, CW, 20), t, t + 0.001)
    out = s.evaluate_convert(lk, PR, t + 0.6, timed_out=True)
    assert isinstance(out.error, LockTimeout)
    assert lk.mode == CR and lk.phase is Phase.HELD  # the claim while the clean-up runs
    batches = [b for b in s.renew_cmds(t + 0.7) if b[0] in (0, 1)]
    assert batches
    for i, _, lks in batches:  # the cancels landed: PR granted there again
        s.on_renew_reply(i, lks, ("e", [RenewEntry(Status.GRANTED, PR, 10, 0, -1)]),
                         t + 0.7, t + 0.701)
        assert s.repair_cmds(i, t + 0.701) == []  # not a conversion down to CR
    assert not lk.repairing
    s.rollback_convert(lk, PR, {0: reply(Status.CANCELLED, PR, 10),
                                1: reply(Status.CANCELLED, PR, 10),
                                2: reply(Status.GRANTED, PR, 30)})
    assert lk.mode == PR and s.holding(lk, t + 0.8) == 3
    assert not lk.unwinding
    # from here on R1 repairs as before: a stronger grant than PR is taken down to it
    lk.votes[0].mode = EX
    assert [c[1][0] for c in s.repair_cmds(0, t + 0.8)] == ["convert"]
