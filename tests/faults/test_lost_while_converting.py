"""A lock lost while it waits for a conversion fails the conversion with LockLost.

Found by a long run of the fault suite (instances restarted from their AOF while locks
converted): the lock was reported lost during its conversion, after which nothing renewed
it, so the conversion could only wait for its timeout - or forever without one - and a
failed conversion then put the lost lock back to "held".
"""

from __future__ import annotations

import threading
import time

import pytest
from quorum.clients import KINDS, make_client
from redis_harness import Instances

from redlockdlm.engine.codec import LockReply
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.errors import LockLost, QuorumUnavailable
from redlockdlm.protocol import Phase, Session

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(60)]
NS = "lwc"


def reply(status: Status, mode: Mode | None = None, token: int = 0) -> LockReply:
    return LockReply(status=status, epoch="e", mode=mode, token=token, position=0,
                     value=None, version=0, valid=True, wait_ms=-1, extra=0,
                     blockers_count=0, blockers=())


def test_protocol_core() -> None:
    s = Session(3, "t", lease_ms=1000)
    lk = s.new_lock("r", Mode.PR)
    for v in lk.votes:
        v.sent_at = 100.0
    for i in range(3):
        s.on_reply(lk, i, reply(Status.GRANTED, Mode.PR, 10 + i), 100.0, 100.001)
    assert s.evaluate_acquire(lk, 100.002).done
    s.start_convert(lk, Mode.EX)
    for i in range(3):
        s.on_reply(lk, i, reply(Status.QUEUED, Mode.PR, 10 + i), 100.1, 100.101)
    assert s.check_held(101.5) == [lk]  # no renewal came back: lost
    out = s.evaluate_convert(lk, Mode.PR, 101.5)
    assert isinstance(out.error, LockLost)
    s.rollback_convert(lk, Mode.PR, {})
    assert lk.phase is Phase.LOST


@pytest.mark.parametrize("kind", KINDS)
def test_conversion_without_timeout_returns_when_the_lock_is_lost(kind: str) -> None:
    with Instances(3) as inst:
        inst.init_fresh(NS)
        other = make_client(kind, inst.urls, NS, lease_ms=5000)
        d = make_client(kind, inst.urls, NS, lease_ms=600, socket_timeout=0.2,
                        connect_timeout=0.2)
        try:
            other.lock("r", "PR")
            lk = d.lock("r", "PR")
            errors: list[BaseException] = []

            def convert() -> None:
                try:
                    lk.convert("EX")  # queued behind the other PR: no timeout
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            t = threading.Thread(target=convert, daemon=True)
            t.start()
            time.sleep(0.3)
            for s in inst.servers[:2]:  # our renewals fail: the lock is lost
                s.pause()
            try:
                t.join(10)
            finally:
                for s in inst.servers[:2]:
                    s.resume()
            assert not t.is_alive(), "the conversion of a lost lock never returned"
            # R3: without a timeout the conversion ends at the first round a quorum cannot
            # decide (QuorumUnavailable) or when the renewals report the lock lost
            # (LockLost), whichever comes first; either way the lock is then lost
            assert errors and isinstance(errors[0], (LockLost, QuorumUnavailable)), errors
            deadline = time.monotonic() + 5
            while lk.valid and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not lk.valid
        finally:
            for c in (d, other):
                getattr(c, "shutdown", c.close)()
