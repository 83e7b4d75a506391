"""Modes that differ between the holder and one instance, replayed on the protocol core.

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

NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX


def reply(status: Status, mode: Mode | None = None, token: int = 0) -> LockReply:
    return LockReply(status=status, epoch="e", mode=mode, token=token, position=0,
                     value=None, version=0, valid=True, wait_ms=-1, extra=0,
                     blockers_count=0, blockers=())


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
    cmds = s.repair_cmds(2)
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
    (rlk, cmd), = s.repair_cmds(2)
    assert cmd[2][4] == b"0" and cmd[2][8] == b"1" and cmd[2][9] == b"v2"  # NL, writes v2
    assert lk.repairing == {2}
    assert s.repair_cmds(2) == []  # in flight: not twice
    s.on_repair_reply(lk, 2, reply(Status.GRANTED, NL, 10), 101.0, 101.01)
    assert lk.repairing == set() and lk.votes[2].mode == NL
    renew_says(s, lk, 2, NL, 102.0)
    assert s.repair_cmds(2) == []


def test_r1_failed_repair_is_retried_on_the_next_renewal() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5)
    renew_says(s, lk, 2, EX, 101.0)
    (_, cmd), = s.repair_cmds(2)
    assert cmd[2][8] == b"0"  # nothing written by that conversion: no value to carry
    s.on_repair_reply(lk, 2, QuorumUnavailable("timed out"), 101.0, 101.3)
    assert lk.repairing == set() and lk.votes[2].mode == EX
    renew_says(s, lk, 2, EX, 102.0)
    assert len(s.repair_cmds(2)) == 1


def test_r1_no_repair_while_converting_or_released() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5)
    renew_says(s, lk, 2, EX, 101.0)
    s.start_convert(lk, PR)
    assert s.repair_cmds(2) == []
    lk.phase = Phase.RELEASED
    assert s.repair_cmds(2) == []


def test_r1_a_repair_reply_after_release_changes_nothing() -> None:
    s = Session(3, "t", lease_ms=3000)
    lk = held(s, EX, 100.0)
    convert_missing_one(s, lk, NL, 100.5)
    renew_says(s, lk, 2, EX, 101.0)
    s.repair_cmds(2)
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
    assert s.repair_cmds(2) == []  # an up-conversion may wait: not re-sent by renewals
    renew_says(s, lk, 1, None, 101.5)
    assert s.check_held(101.6) == [lk]


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
