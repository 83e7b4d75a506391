"""A paused client must not count grants of locks the instances have expired since.

Found by the fault suite (workers stopped with SIGSTOP for longer than their lease while
waiting for a conversion): after the pause the client re-sent its request (G12), which
re-created the expired lock on the instance, queued; the grant events of the *old* lock,
published while the client slept, were read after that reply and counted, with the lease
of the new request: the client held PW with the token of a grant made before two other
holders (PR, EX) and overlapped with one of them. Three rules, replayed here on the
protocol core without I/O:

* a reply to a call that did not necessarily set the lease (a repeated request finds the
  lock and leaves its lease as it was, and so does a yield) does not move the vote's lease
  start; renewals do;
* a grant event for a vote whose lease (as we count it) has run out, or that we re-asked
  after it ran out, is not trusted: we re-ask, and only a reply counts;
* a renewal reporting another token than the one we know reports a grant we have not
  seen (a re-created lock), not ours.
"""

from __future__ import annotations

import pytest

from redlockdlm.engine.codec import Event, LockReply, RenewEntry
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.protocol import Phase, Session

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(30)]
NL, PW, EX = Mode.NL, Mode.PW, Mode.EX
LEASE = 2.0


def reply(status: Status, mode: Mode | None = None, token: int = 0) -> LockReply:
    return LockReply(status=status, epoch="e", mode=mode, token=token, position=0,
                     value=None, version=0, valid=True, wait_ms=-1, extra=0,
                     blockers_count=0, blockers=())


def renew(s: Session, lk, sent: float, entries) -> None:  # noqa: ANN001
    for i, _, lks in s.renew_cmds(sent):
        s.on_renew_reply(i, lks, ("e", [entries[i]]), sent, sent + 0.001)


def test_acquiring_client_paused_across_its_grant_and_expiry() -> None:
    s = Session(3, "t", lease_ms=int(LEASE * 1000))
    t = 100.0
    lk = s.new_lock("r", EX)
    for v in lk.votes:
        v.sent_at = t
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED), t, t + 0.001)
    assert not s.evaluate_acquire(lk, t + 0.002).done
    # paused for 3 s: meanwhile each instance granted us (events wait in the socket)
    # and expired us; after the wake-up the re-check re-creates the request, queued
    t = 103.0
    cmds = s.recheck_cmds(lk, t)
    assert [i for i, _ in cmds] == [0, 1, 2]
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED), t, t + 0.001)
    for i in range(3):  # ...and only now the old grant events are read
        s.on_event(i, Event("G", lk.id, EX, token=50 + i), t + 0.002)
    assert not s.evaluate_acquire(lk, t + 0.003).done, "counted the grants of an expired lock"
    # the re-created request is granted later: its reply (not an event) says so
    for i in range(3):
        s.on_reply(lk, i, reply(Status.GRANTED, EX, 90 + i), t + 0.5, t + 0.501)
    renew(s, lk, t + 0.6, [RenewEntry(Status.GRANTED, EX, 90 + i, 0, -1) for i in range(3)])
    assert s.evaluate_acquire(lk, t + 0.602).done
    assert lk.token == 92


def test_converting_client_paused_across_its_grant_and_expiry() -> None:
    s = Session(3, "t", lease_ms=int(LEASE * 1000))
    t = 100.0
    lk = s.new_lock("r", NL)
    for v in lk.votes:
        v.sent_at = t
    for i in range(3):
        s.on_reply(lk, i, reply(Status.GRANTED, NL, 10 + i), t, t + 0.001)
    assert s.evaluate_acquire(lk, t + 0.002).done
    s.start_convert(lk, PW)
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED, NL, 10 + i), t + 0.1, t + 0.101)
    t = 103.0  # paused: the conversion was granted (events wait), then our lock expired
    s.recheck_cmds(lk, t)  # the re-sent request re-creates it, queued
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED), t, t + 0.001)
    for i in range(3):
        s.on_event(i, Event("G", lk.id, PW, token=50 + i), t + 0.002)
    # a renewal finds the re-created lock granted, with its own (newer) token
    renew(s, lk, t + 0.1, [RenewEntry(Status.GRANTED, PW, 90 + i, 0, -1) for i in range(3)])
    out = s.evaluate_convert(lk, NL, t + 0.102)
    assert not out.done, f"converted with token {lk.token} of an expired grant"
    assert lk.phase is Phase.CONVERTING


def test_a_repeated_request_does_not_extend_the_lease() -> None:
    """Queued with a lease from the renewal at t=100; the re-check at t=101 finds the lock
    granted (G12: its lease untouched): it ends at t=102 on the instance, so we must not
    believe it beyond that."""
    s = Session(3, "t", lease_ms=int(LEASE * 1000))
    t = 100.0
    lk = s.new_lock("r", EX)
    for v in lk.votes:
        v.sent_at = t
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED), t, t + 0.001)
    s.recheck_cmds(lk, 101.0)
    for i in range(3):
        s.on_reply(lk, i, reply(Status.GRANTED, EX, 20 + i), 101.0, 101.001)
    assert s.evaluate_acquire(lk, 101.002).done
    assert s.holding(lk, 102.0) == 0  # 100 + lease - drift < 102
