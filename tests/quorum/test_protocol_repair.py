"""What the client repairs after a renewal (R1, R2) and how it reads a forgotten value block
(V5), replayed on the protocol core (no I/O).

Rule R1 (docs/rules.md): a renewal that finds a held lock granted in a *stronger* mode than
it holds (a down-conversion that did not arrive there) makes the client send that
down-conversion again, with the value block it wrote. And a grant in a mode that does not
cover the held one (an up-conversion that did not arrive) does not count as holding the
lock. Found by the long fault run (`tests/faults/test_stale_mode_after_conversion.py`).
"""

from __future__ import annotations

import pytest

from redlockdlm.engine.codec import LockReply, RenewEntry
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.errors import QuorumUnavailable
from redlockdlm.protocol import Phase, Session, Vote, covers

from .replies import reply

NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX


def held(s: Session, mode: Mode, t: float):
    lk = s.new_lock("r", mode)
    lk.pending = set(range(s.n))
    for i in range(s.n):
        lk.votes[i].sent_at = t
        s.on_reply(lk, i, reply(Status.GRANTED, mode, 10), t, t)
    assert s.evaluate_acquire(lk, t).done
    return lk


def convert_missing_one(s: Session, lk, mode: Mode, t: float, value: bytes | None = None):
    """Convert `lk` to `mode`; instance 2's reply is lost (a timeout)."""
    old = lk.mode
    if value is not None:
        lk.new_value = value
    m, _, down = s.start_convert(lk, mode)
    s.convert_value(lk, down)
    lk.pending = set(range(s.n))
    s.on_reply(lk, 0, reply(Status.GRANTED, m, 10), t, t)
    s.on_reply(lk, 1, reply(Status.GRANTED, m, 10), t, t)
    s.on_reply(lk, 2, QuorumUnavailable("timed out"), t, t)
    assert s.evaluate_convert(lk, old, t).done
    return lk


def renew_says(s: Session, lk, i: int, mode: Mode | None, t: float) -> None:
    status = Status.GRANTED if mode is not None else Status.NOTFOUND
    s.on_renew_reply(i, [lk], ("e", [RenewEntry(status, mode, 10, 0, -1)]), t, t)


@pytest.mark.parametrize("held_mode,stale,repair", [
    pytest.param(EX, EX, False, id="R1-same-mode-no-repair"),
    pytest.param(NL, EX, True, id="R1-EX-left-where-NL-is-held-repaired"),
    pytest.param(CR, PW, True, id="R1-PW-left-where-CR-is-held-repaired"),
    pytest.param(CW, PR, False, id="R1-PR-to-CW-is-a-middle-conversion-not-repaired"),
    pytest.param(EX, NL, False, id="R1-weaker-mode-not-repaired"),
])
def test_r1_repair_only_a_stronger_stale_mode(held_mode: Mode, stale: Mode,
                                              repair: bool) -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, held_mode, 100.0)
    renew_says(s, lk, 2, stale, 101.0)
    cmds = s.repair_cmds(2, 200.0)
    assert bool(cmds) == repair
    if repair:
        (rlk, cmd), = cmds
        assert rlk is lk and cmd.name == "convert"
        assert cmd[2][4] == str(int(held_mode)).encode()  # ARGV[5]: the mode held


def test_r1_missed_down_conversion_is_sent_again_once_with_its_value() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5, value=b"v2")
    assert lk.written is not None and lk.written[0] == b"v2"
    renew_says(s, lk, 2, EX, 101.0)  # instance 2 is back, still EX there
    assert s.holding(lk, 101.0) == 3  # a stronger grant protects the weaker mode
    (rlk, cmd), = s.repair_cmds(2, 200.0)
    assert cmd[2][4] == b"0" and cmd[2][8] == b"1" and cmd[2][9] == b"v2"  # NL, writes v2
    assert lk.repairing == {2}
    assert s.repair_cmds(2, 200.0) == []  # in flight: not twice
    s.on_repair_reply(lk, 2, reply(Status.GRANTED, NL, 10), 101.0, 101.01)
    assert lk.repairing == set() and lk.votes[2].mode == NL
    renew_says(s, lk, 2, NL, 102.0)
    assert s.repair_cmds(2, 200.0) == []


def test_r1_failed_repair_is_retried_on_the_next_renewal() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5)
    renew_says(s, lk, 2, EX, 101.0)
    (_, cmd), = s.repair_cmds(2, 200.0)
    assert cmd[2][8] == b"0"  # nothing written by that conversion: no value to carry
    s.on_repair_reply(lk, 2, QuorumUnavailable("timed out"), 101.0, 101.3)
    assert lk.repairing == set() and lk.votes[2].mode == EX
    renew_says(s, lk, 2, EX, 102.0)
    assert len(s.repair_cmds(2, 200.0)) == 1


def test_r1_no_repair_while_converting_or_released() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5)
    renew_says(s, lk, 2, EX, 101.0)
    s.start_convert(lk, PR)
    assert s.repair_cmds(2, 200.0) == []
    lk.phase = Phase.RELEASED
    assert s.repair_cmds(2, 200.0) == []


def test_r1_a_repair_reply_after_release_changes_nothing() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5)
    renew_says(s, lk, 2, EX, 101.0)
    s.repair_cmds(2, 200.0)
    lk.phase = Phase.RELEASED
    s.on_repair_reply(lk, 2, reply(Status.NOTFOUND), 101.0, 101.01)
    assert lk.repairing == set() and lk.votes[2].vote is Vote.GRANTED


def test_r1_missed_up_conversion_does_not_count_as_holding() -> None:
    """NL held everywhere, converted up to EX: instance 2's answer is lost and a renewal
    finds NL there. That NL grant lets any EX request in beside it, so the lock is held in
    EX by instances 0 and 1 only; when instance 1 loses it (a restart), the lock is lost,
    not held by instance 0 alone plus an NL that protects nothing."""
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, NL, 100.0)
    convert_missing_one(s, lk, EX, 100.5)
    renew_says(s, lk, 2, NL, 101.0)
    assert s.holding(lk, 101.0) == 2
    assert s.repair_cmds(2, 200.0) == []  # an up-conversion may wait: not re-sent by renewals
    renew_says(s, lk, 1, None, 101.5)
    assert s.check_held(101.6) == [lk]


def test_validity_counts_only_grants_that_cover_the_held_mode() -> None:
    """CW held everywhere, converted up to PW: instance 2's request is lost and renewals
    keep finding CW there; then the client is cut from instance 0, whose lease runs out.
    From then on PW is kept by instance 1 alone (a CW request is granted beside the CW on
    instance 2 and on instance 0), so the lock is not held: its validity (what
    `validity_ms` reports) is none, not the fresh lease of the CW grant that protects
    nothing. Found by the simulator (profile r1, seed 153): the holder went on believing
    PW while another client was granted CW by instances 0 and 2."""
    s = Session(3, "t", lease_ms=1000)
    lk = held(s, CW, 100.0)
    convert_missing_one(s, lk, PW, 100.3)
    renew_says(s, lk, 1, PW, 100.6)
    renew_says(s, lk, 2, CW, 100.6)
    # instance 0's lease (last set at 100.0) still runs: the quorum's shorter one bounds it
    assert lk.validity(100.7) == pytest.approx(100.0 + 1.0 - lk.drift_s() - 100.7)
    assert s.holding(lk, 101.0) == 1
    assert lk.validity(101.0) <= 0


def test_r1_down_conversion_in_progress_still_holds() -> None:
    """While converting down, a grant already in the requested mode counts."""
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    m, _, _ = s.start_convert(lk, NL)
    lk.pending = {0, 1, 2}
    s.on_reply(lk, 0, reply(Status.GRANTED, NL, 10), 100.5, 100.5)
    s.on_reply(lk, 1, reply(Status.GRANTED, NL, 10), 100.5, 100.5)
    assert s.check_held(100.6) == []


@pytest.mark.parametrize("a,b,ok", [
    (EX, NL, True), (EX, PR, True), (PW, PR, True), (PW, CW, True), (PR, CR, True),
    (CW, CR, True), (NL, NL, True), (NL, CR, False), (PR, CW, False), (CW, PR, False),
    (CR, PW, False), (PR, PW, False), (None, NL, False),
])
def test_covers(a, b, ok) -> None:
    assert covers(a, b) is ok


# ----------------------------------------------------------------------------- R2


def renew_from(s: Session, lk, i: int, epoch: str, status: Status, t: float,
               mode: Mode | None = None) -> None:
    s.on_renew_reply(i, [lk], (epoch, [RenewEntry(status, mode, 10, 0, -1)]), t, t)


def test_r2_lock_lost_by_a_restart_is_requested_again_once_safe() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    renew_from(s, lk, 2, "e2", Status.NOTFOUND, 101.0)  # a new epoch: restarted empty
    assert lk.votes[2].vote is Vote.ABSENT and lk.votes[2].rejoin
    assert s.holding(lk, 101.0) == 2
    assert s.repairs_due(2, 101.0) and not s.repairs_due(1, 101.0)
    (rlk, cmd), = s.repair_cmds(2, 101.0)
    assert rlk is lk and cmd.name == "request" and cmd[2][3] == lk.id.encode()
    assert cmd[2][4] == b"5" and cmd[2][6] == str(lk.ticket).encode()  # same mode, ticket
    assert not s.repairs_due(2, 101.0) and s.repair_cmds(2, 101.0) == []  # in flight
    recovering = reply(Status.RECOVERING)._replace(extra=400)  # E1: not safe yet
    s.on_repair_reply(lk, 2, recovering, 101.0, 101.01)
    assert lk.votes[2].vote is Vote.RECOVERING and lk.votes[2].rejoin
    assert not s.repairs_due(2, 101.2) and s.repairs_due(2, 101.5)
    (_, cmd), = s.repair_cmds(2, 101.5)
    s.on_repair_reply(lk, 2, reply(Status.GRANTED, EX, 99), 101.5, 101.51)
    v = lk.votes[2]
    assert (v.vote, v.mode, v.rejoin) == (Vote.GRANTED, EX, False)
    assert s.holding(lk, 101.6) == 3 and lk.token == 10  # the quorum token is unchanged
    assert not s.repairs_due(2, 102.0)


def test_r2_a_queued_rejoin_is_left_to_renewals() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, NL, 100.0)
    renew_from(s, lk, 0, "e2", Status.NOTFOUND, 101.0)
    s.repair_cmds(0, 101.0)
    s.on_repair_reply(lk, 0, reply(Status.QUEUED), 101.0, 101.01)
    assert lk.votes[0].vote is Vote.QUEUED and not lk.votes[0].rejoin
    assert s.holding(lk, 101.1) == 2  # waiting there is not holding
    assert any(lks == [lk] for i, _, lks in s.renew_cmds(101.2, [0]))
    renew_from(s, lk, 0, "e2", Status.GRANTED, 102.0, NL)
    assert s.holding(lk, 102.0) == 3


def test_r2_failed_rejoin_is_tried_again() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    renew_from(s, lk, 1, "e2", Status.NOTFOUND, 101.0)
    s.repair_cmds(1, 101.0)
    s.on_repair_reply(lk, 1, QuorumUnavailable("timed out"), 101.0, 101.3)
    assert lk.votes[1].rejoin and s.repairs_due(1, 101.4)


@pytest.mark.parametrize("epoch,phase", [
    pytest.param("e", Phase.HELD, id="R2-same-epoch-expired-or-broken-no-rejoin"),
    pytest.param("e2", Phase.CONVERTING, id="R2-not-while-converting"),
    pytest.param("e2", Phase.LOST, id="R2-not-a-lost-lock"),
])
def test_r2_only_a_held_lock_lost_by_a_restart(epoch: str, phase: Phase) -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    lk.phase = phase
    renew_from(s, lk, 2, epoch, Status.NOTFOUND, 101.0)
    assert not s.repairs_due(2, 102.0) and s.repair_cmds(2, 102.0) == []


def test_r2_a_rejoin_owed_waits_for_the_lock_to_be_held_again() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    renew_from(s, lk, 2, "e2", Status.NOTFOUND, 101.0)
    s.repair_cmds(2, 101.0)
    lk.phase = Phase.RELEASED
    s.on_repair_reply(lk, 2, reply(Status.GRANTED, EX, 99), 101.0, 101.01)
    assert lk.repairing == set() and lk.votes[2].vote is Vote.ABSENT


# ----------------------------------------------------------------------------- V5


def value_reply(version: int, value: bytes | None, forgotten: bool = False) -> LockReply:
    return LockReply(status=Status.GRANTED, epoch="e", mode=PR, token=10, position=0,
                     value=value, version=version, valid=not forgotten, wait_ms=-1, extra=0,
                     blockers_count=0, blockers=(), forgotten=forgotten)


@pytest.mark.parametrize("forgotten_on,valid", [
    pytest.param((), True, id="V5-no-instance-forgot-valid"),
    pytest.param((0,), False, id="V5-a-forgetful-instance-below-the-top-version-not-valid"),
    pytest.param((2,), True, id="V5-a-forgetful-instance-outside-the-quorum-ignored"),
])
def test_v5_a_forgotten_vote_in_the_quorum_makes_the_value_not_valid(
        forgotten_on: tuple[int, ...], valid: bool) -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = s.new_lock("r", PR)
    lk.pending = {0, 1}
    t = 100.0
    for i in (0, 1):
        lk.votes[i].sent_at = t
    s.on_reply(lk, 0, value_reply(0, None, 0 in forgotten_on), t, t)
    s.on_reply(lk, 1, value_reply(8, b"v1"), t, t)
    if 2 in forgotten_on:
        s.on_reply(lk, 2, reply(Status.QUEUED), t, t)
    assert s.evaluate_acquire(lk, t).done
    assert (lk.value, lk.version, lk.value_valid) == (b"v1", 8, valid)


def ex_reply(version: int, value: bytes | None, valid: bool = True) -> LockReply:
    return LockReply(status=Status.GRANTED, epoch="e", mode=EX, token=30, position=0,
                     value=value, version=version, valid=valid, wait_ms=-1, extra=0,
                     blockers_count=0, blockers=())


def up_again(s: Session, lk, t: float, replies: dict[int, LockReply]) -> None:
    """Convert `lk` up to EX; the instances in `replies` answer, the others stay silent."""
    s.start_convert(lk, EX)
    lk.pending = set(range(s.n))
    for i, rep in replies.items():
        s.on_reply(lk, i, rep, t, t)
    assert s.evaluate_convert(lk, NL, t).done


@pytest.mark.parametrize("valid_there,valid", [
    pytest.param(True, True, id="V7-own-write-read-back-valid"),
    pytest.param(False, False, id="V7-own-write-not-valid-where-the-quorum-says-not-valid"),
])
def test_v7_a_conversion_never_reads_older_than_its_own_write(valid_there: bool,
                                                             valid: bool) -> None:
    """EX -> NL wrote v2 (its call to instance 2 failed: 2 keeps EX and v1); NL -> EX
    again, granted first by instances 1 and 2, which both report v1."""
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5, value=b"v2")
    v2 = lk.written[1]
    up_again(s, lk, 101.0, {1: ex_reply(8, b"v1", valid_there), 2: ex_reply(8, b"v1")})
    assert (lk.value, lk.version, lk.value_valid) == (b"v2", v2, valid)
    assert lk.written is None


def test_v7_a_holder_without_a_new_value_completes_the_value_it_holds() -> None:
    """The release (or a down-conversion) of that EX writes v2 at its own version where
    the grant reported v1, and nothing where it reported v2 or holds less than PW."""
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5, value=b"v2")
    v2 = lk.written[1]
    up_again(s, lk, 101.0, {0: ex_reply(v2, b"v2"), 1: ex_reply(8, b"v1"),
                            2: ex_reply(8, b"v1")})
    lk.votes[2].mode = NL  # (as if a renewal had found the lock held there in NL)
    assert [s.stored_value(lk, i) for i in range(3)] == [(None, 0), (b"v2", v2), (None, 0)]
    cmds = dict(s.release_cmds(lk))
    assert cmds[0] == cmds[2] != cmds[1]
    lk.new_value = b"v3"  # a new value goes where the lock is granted PW/EX, as before
    assert [s.stored_value(lk, i)[0] for i in range(3)] == [b"v3", b"v3", None]
    lk.new_value, lk.value_valid = None, False  # a value not known valid is not spread
    assert [s.stored_value(lk, i) for i in range(3)] == [(None, 0)] * 3


def test_v7_a_write_its_caller_was_told_may_have_failed_is_read_back_not_valid() -> None:
    """EX -> NL writing v2 reached instance 0 only before its timeout: it stands (G4) and
    its caller gets an error, so v2 may be stored nowhere a reader looks. NL -> EX again,
    granted by 1 and 2 (v1): the holder gets its own v2, but not valid (simulator, profile
    vminor seed 69: the write had reached no instance at all)."""
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    lk.new_value = b"v2"
    m, _, down = s.start_convert(lk, NL)
    lk.pending = set(range(3))
    s.on_reply(lk, 0, reply(Status.GRANTED, NL, 10), 100.5, 100.5)
    out = s.evaluate_convert(lk, EX, 100.6, timed_out=True)
    assert out.error is not None and out.keep and lk.mode == NL
    up_again(s, lk, 101.0, {1: ex_reply(8, b"v1"), 2: ex_reply(8, b"v1")})
    assert (lk.value, lk.value_valid) == (b"v2", False)
