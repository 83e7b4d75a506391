"""Split votes between conversions resolve without waiting for a timeout.

Found by the fault suite (five instances, two restarted empty: NL keeper locks then live on
exactly a quorum, three instances, so any disagreement splits): two keepers converting up,
one granted EX on one instance, the other PR on the two others, each waiting for the
other's grant elsewhere. A new request granted on a minority gives its grant back when a
blocking event says an older ticket waits behind it (Y1); a conversion only passed the
blocking event on to the user, so both waited for their timeouts (8 s, every worker
stalled). Now a conversion gives its grant back the same way, by conversion ticket.
Replayed on the protocol core.
"""

from __future__ import annotations

import pytest

from redlockdlm.engine.codec import Event, LockReply
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.protocol import Session, Vote

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(30)]
NL, PR, EX = Mode.NL, Mode.PR, Mode.EX


def reply(status: Status, mode: Mode | None = None, token: int = 0) -> LockReply:
    return LockReply(status=status, epoch="e", mode=mode, token=token, position=0,
                     value=None, version=0, valid=True, wait_ms=-1, extra=0,
                     blockers_count=0, blockers=())


def converting(s: Session, t: float):
    lk = s.new_lock("r", NL)
    for v in lk.votes:
        v.sent_at = t
    for i in range(3):
        s.on_reply(lk, i, reply(Status.GRANTED, NL, 10 + i), t, t + 0.001)
    assert s.evaluate_acquire(lk, t + 0.002).done
    s.start_convert(lk, EX)
    return lk


def test_granted_conversion_yields_to_an_older_one() -> None:
    s = Session(3, "t", lease_ms=2000)
    t = 100.0
    lk = converting(s, t)
    s.on_reply(lk, 0, reply(Status.QUEUED, NL, 10), t, t + 0.01)
    s.on_reply(lk, 1, reply(Status.QUEUED, NL, 11), t, t + 0.01)
    s.on_reply(lk, 2, reply(Status.GRANTED, EX, 20), t, t + 0.01)
    lk.round_done = True  # this round's own yield is not what we look at
    assert not s.evaluate_convert(lk, NL, t + 0.02).done
    # an older conversion (PR) queues behind our EX on instance 2
    notes = s.on_event(2, Event("B", lk.id, PR, ticket=lk.cticket - 5, other="older"),
                       t + 0.03)
    assert [(k, a) for k, _, a in notes] == [("yield", 2)]
    s.yield_cmd_for(lk, 2)
    assert lk.votes[2].vote is Vote.QUEUED and lk.votes[2].mode == NL  # old mode kept


def test_a_younger_one_does_not_make_it_yield() -> None:
    s = Session(3, "t", lease_ms=2000)
    t = 100.0
    lk = converting(s, t)
    s.on_reply(lk, 2, reply(Status.GRANTED, EX, 20), t, t + 0.01)
    notes = s.on_event(2, Event("B", lk.id, PR, ticket=lk.cticket + 5, other="younger"),
                       t + 0.03)
    assert [k for k, _, _ in notes] == ["blocking"]
