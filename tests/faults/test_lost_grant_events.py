"""A waiter whose grant events are lost still reads the right value block.

Found by the fault suite (a paused or restarted instance drops the waiter's pub/sub
connection): when the grant of a waiting request or conversion was learnt from a lease
renewal instead of its event or reply, the vote was counted granted with the value block of
an older state (none at all for a new request, the previous mode's for a conversion), since
renewal replies carry no value block. With a quorum of such votes the lock was handed over
with a stale value and `value_valid` True: a lost value-block write. The fix keeps such a
vote waiting and re-asks the instance at once (the request is idempotent, G12, and its
reply carries the value). It also needed the sync client's conversions to re-check at all:
their re-check time was recomputed from "now" on every wake-up and so never came.
"""

from __future__ import annotations

import threading
import time

import pytest
from quorum.clients import KINDS, make_client
from redis_harness import Instances

from redlockdlm import DLM
from redlockdlm.engine.instance import Engine

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(60)]
NS = "lge"


@pytest.fixture(scope="module")
def inst():
    with Instances(3) as i:
        yield i


@pytest.fixture
def clients(inst: Instances, request: pytest.FixtureRequest):
    for s in inst:
        s.flushall()
        Engine(s.client(), NS).init_fresh()
    made = []

    def make(kind: str, drop_grant_events: bool = False):
        d = make_client(kind, inst.urls, NS, lease_ms=600, socket_timeout=0.5,
                        connect_timeout=0.5)
        made.append(d)
        if drop_grant_events:  # as if the pub/sub connections were down
            core = d._core
            orig = core.on_event
            core.on_event = lambda i, ev, now: [] if ev.kind == "G" else orig(i, ev, now)
        return d

    yield make
    for d in made:
        getattr(d, "shutdown", d.close)()


def _writer(inst: Instances) -> tuple[DLM, object]:
    w = DLM(inst.urls, NS, lease_ms=5000)
    lk = w.lock("r", "EX")
    lk.value = b"v1"
    lk.convert("NL")  # written on every instance; the NL lock keeps the resource alive
    lk.convert("EX")
    return w, lk


@pytest.mark.parametrize("kind", KINDS)
def test_conversion_granted_while_events_are_lost(inst: Instances, clients, kind: str) -> None:
    """An NL lock converting up to PR, granted when the EX writer releases with a new
    value: the reader gets that value, not the one it had before."""
    reader = clients(kind, drop_grant_events=True)
    keeper = reader.lock("r", "NL")
    w, wl = _writer(inst)
    try:
        errors: list[BaseException] = []
        t = threading.Thread(target=lambda: _catch(errors, keeper.convert, "PR", timeout=10))
        t.start()
        time.sleep(0.3)  # queued behind the EX
        wl.value = b"v2"
        written = wl.token * 4  # protocol.next_version: versions follow fencing tokens
        wl.release()
        t.join(15)
        assert not errors, errors
        assert (keeper.value, keeper.version) == (b"v2", written) or not keeper.value_valid, (
            keeper.value, keeper.version, keeper.value_valid)
    finally:
        w.close()


@pytest.mark.parametrize("kind", KINDS)
def test_request_granted_while_events_are_lost(inst: Instances, clients, kind: str) -> None:
    """A new PR request queued behind the EX writer: granted when the writer releases with
    a new value, it reads that value."""
    reader = clients(kind, drop_grant_events=True)
    w, wl = _writer(inst)
    keep = w.lock("keep", "NL")  # (unrelated: the writer's session stays busy)
    try:
        req = reader.enqueue("r", "PR", timeout=10)
        time.sleep(0.3)
        wl.value = b"v2"
        written = wl.token * 4  # protocol.next_version: versions follow fencing tokens
        wl.convert("NL")  # writes v2 and keeps the resource alive
        lk = req.wait(15)
        assert (lk.value, lk.version) == (b"v2", written) or not lk.value_valid, (
            lk.value, lk.version, lk.value_valid)
    finally:
        keep.release()
        w.close()


def _catch(errors: list, fn, *args, **kw) -> None:  # noqa: ANN001
    try:
        fn(*args, **kw)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
