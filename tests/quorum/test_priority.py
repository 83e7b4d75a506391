"""Priorities (docs/rules.md P1) through both clients: they reach every instance with the
request or conversion, bad ones are refused before anything is sent, and the deadlock
detector cancels the request of lowest priority (docs/detector.md D8)."""

from __future__ import annotations

import pytest

from redlockdlm import Mode
from redlockdlm.detector import Detector
from redlockdlm.errors import Deadlock, InvalidArgument, InvalidType

from .conftest import Quorum, wait_until
from .test_features import in_thread, joined, waiting_on_all

PR, EX = Mode.PR, Mode.EX



def waiting_everywhere(q: Quorum, *path: str) -> bool:
    return all(any(lv.queue in ("W", "C") for lv in locks) for locks in q.locks(*path))


def test_priority_chooses_the_deadlock_victim(q: Quorum) -> None:
    """P1, D8: a request's priority reaches every instance with it; in a deadlock the
    detector cancels the request of lowest priority (here the older one, which would
    otherwise be spared: the youngest goes first among equals), and the other is then
    granted."""
    a, b = q.dlm(), q.dlm()
    a1, b1 = a.lock("R1", EX), b.lock("R2", EX)
    ta, boxa = in_thread(a.lock, "R2", EX, priority=-1, timeout=20)
    wait_until(lambda: waiting_everywhere(q, "R2"))
    tb, boxb = in_thread(b.lock, "R1", EX, priority=7, timeout=20)
    wait_until(lambda: waiting_everywhere(q, "R1"))
    assert {lv.priority for ls in q.locks("R2") for lv in ls if lv.queue == "W"} == {-1}
    assert {lv.priority for ls in q.locks("R1") for lv in ls if lv.queue == "W"} == {7}
    with Detector(q.urls, q.ns, 0.05, reap_every=0) as det:
        victims = [v for _ in range(2) for v in det.run_once().victims]
    assert [(v.request.owner, v.request.priority) for v in victims] == [(a.owner, -1)]
    with pytest.raises(Deadlock):
        joined(ta, boxa)
    assert a1.valid  # only the waiting request was cancelled
    b1.release()  # (b waits for a1, not for b1)
    a1.release()
    assert joined(tb, boxb).mode == EX


def test_a_conversion_carries_its_priority(q: Quorum) -> None:
    a, b = q.dlm(), q.dlm()
    la, lb = a.lock("res", PR, priority=3), b.lock("res", PR)
    assert {lv.priority for ls in q.locks("res") for lv in ls if lv.lock_id == la.id} == {3}
    t, box = in_thread(la.convert, EX, priority=-5, timeout=20)
    wait_until(lambda: waiting_on_all(q, la.id, "res", queue="C"))
    assert {lv.priority for ls in q.locks("res") for lv in ls if lv.lock_id == la.id} == {-5}
    lb.release()
    joined(t, box)
    assert la.mode == EX


@pytest.mark.parametrize("priority,error", [
    (2**31, InvalidArgument), (-(2**31) - 1, InvalidArgument), ("1", InvalidType),
    (True, InvalidType), (1.0, InvalidType)])
def test_a_bad_priority_is_refused_before_anything_is_sent(q: Quorum, priority: object,
                                                           error: type) -> None:
    d = q.dlm()
    with pytest.raises(error):
        d.lock("res", EX, priority=priority)
    assert q.gone("res")
    lk = d.lock("res", PR, priority=2**31 - 1)
    with pytest.raises(error):
        lk.convert(EX, priority=priority)
    assert lk.mode == PR and lk.valid
    assert {lv.priority for ls in q.locks("res") for lv in ls} == {2**31 - 1}
