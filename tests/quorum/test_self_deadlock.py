"""G14: one owner waiting behind its own incompatible lock is a deadlock (VMS answers
SS$_DEADLOCK). A DLM / AsyncDLM is one owner: a queueing request or up-conversion on a
resource where it holds an incompatible lock fails at once with Deadlock and leaves nothing
queued on any instance; NOQUEUE still gets NotQueued; compatible modes, other resources and
other owners are unaffected. Over N=1,3,5 and both clients (the `q` fixture)."""

from __future__ import annotations

import time

import pytest

from redlockdlm import Mode
from redlockdlm.errors import Deadlock, LockTimeout, NotQueued

from .conftest import Quorum

pytestmark = pytest.mark.timeout(30)

EX, PW, PR, CR = Mode.EX, Mode.PW, Mode.PR, Mode.CR


def only(q: Quorum, lock_ids: set[str], *path: str) -> None:
    """Every instance has exactly `lock_ids` on `path` (none queued besides)."""
    assert q.lock_ids(*path) == [lock_ids] * q.n
    assert all(lk.queue == "G" for locks in q.locks(*path) for lk in locks)


def test_request_behind_own_incompatible_lock_fails_at_once(q: Quorum) -> None:
    d = q.dlm()
    held = d.lock("R", EX)
    t0 = time.monotonic()
    with pytest.raises(Deadlock) as ei:
        d.lock("R", PR, timeout=10)
    assert time.monotonic() - t0 < 2.0  # at once, not after the timeout or a detector
    assert ei.value.resource == "R"
    only(q, {held.id}, "R")
    with pytest.raises(NotQueued):  # NOQUEUE: as before
        d.lock("R", EX, noqueue=True)
    only(q, {held.id}, "R")
    held.release()
    d.lock("R", EX).release()  # nothing was left behind to block the next request


def test_up_conversion_behind_own_incompatible_lock_fails_at_once(q: Quorum) -> None:
    d = q.dlm()
    a = d.lock("R", PR)
    b = d.lock("R", PR)  # compatible with a: granted, no deadlock
    with pytest.raises(Deadlock):
        b.convert(EX, timeout=10)
    assert b.mode == PR and a.mode == PR  # the conversion failed: b keeps its mode
    only(q, {a.id, b.id}, "R")
    with pytest.raises(NotQueued):
        b.convert(EX, noqueue=True)
    b.convert(CR)  # down-conversions never wait
    a.release()
    b.convert(EX, timeout=5)  # nothing of ours blocks it any more
    assert b.mode == EX
    b.release()


def test_other_owners_and_other_resources_still_queue(q: Quorum) -> None:
    d, other = q.dlm(), q.dlm()
    table = d.lock("R", EX)
    row = table.lock("R", EX)  # a child resource named R under R: another resource
    d.lock("S", EX).release()
    with pytest.raises(LockTimeout):  # another owner waits, as ever
        other.lock("R", EX, timeout=0.3)
    row.release()
    table.release()
