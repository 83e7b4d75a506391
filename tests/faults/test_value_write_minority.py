"""A value written by a down-conversion that reached only a minority of instances.

Found by CI (`test_instance_faults.py::test_minority_restarted_from_aof`, about one run in
35; `DLM_FAULT_DEBUG=1 DLM_FAULT_DUMP=file` printed each instance's answers): a holder held
EX on instances 1 and 2 only (instance 0 had restarted and held its lock in NL). It wrote a
value converting down to NL: instance 2 stored it, instance 0 was not held in PW/EX (V3: no
write there), and the call to instance 1, which was being restarted, failed, so instance 1
kept the lock in EX with the older value. The conversion stood (a quorum, 0 and 2, granted
NL). Converting up to EX again right after, the quorum that answered first was 0 and 1,
which both reported the older value: the holder read its own write back as the value before
it, said valid. Nothing repaired instance 1's value either: R1 re-sends a missed
down-conversion only while the lock holds the weaker mode, and the lock was EX again.

Two rules close it (docs/rules.md V7, docs/protocol.md "Value blocks across instances"):
a lock never reads a value older than its own last write, and a PW/EX holder that releases
or converts down without a new value writes the value it holds where its grant reported an
older one, so the next reader's quorum finds it.
"""

from __future__ import annotations

import time

import pytest
from redis_harness import Instances

from redlockdlm import DLM

from .proxy import ProxyHub

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]
NS = "vwm"


def _settle(ps, which: list[int]) -> None:  # noqa: ANN001
    """End a black hole: its connections are closed; give the client a moment to see it."""
    ps.heal(which)
    time.sleep(0.4)


@pytest.mark.parametrize("end", ["release", "down-conversion"])
def test_a_value_that_reached_a_minority_is_read_back_and_completed(end: str) -> None:
    with Instances(3) as inst:
        inst.init_fresh(NS)
        hub = ProxyHub()
        ps = hub.proxy_set([s.port for s in inst], "writer")
        reader_ps = hub.proxy_set([s.port for s in inst], "reader")
        # a long lease: no renewal (R1) runs between the steps below
        opts = dict(lease_ms=20_000, socket_timeout=0.3, connect_timeout=0.3)
        writer = DLM(ps.urls, NS, **opts)
        keeper_client = DLM(inst.urls, NS, **opts)
        reader = DLM(reader_ps.urls, NS, **opts)
        try:
            keeper = keeper_client.lock("r", "NL")  # keeps the resource (and value) alive
            lk = writer.lock("r", "EX")
            lk.value = b"v1"
            lk.convert("NL")  # v1 on all three
            ps.blackhole([0])
            lk.convert("EX")  # EX on instances 1 and 2; instance 0 keeps NL
            _settle(ps, [0])
            lk.value = b"v2"
            ps.blackhole([1])
            lk.convert("NL")  # 0: NL -> NL (no write there), 2: writes v2; 1 misses it
            _settle(ps, [1])
            ps.latency(300, 0, [2])  # the quorum that answers first: 0 and 1 (v1 both)
            lk.convert("EX")
            assert (lk.value, lk.value_valid) == (b"v2", True), (
                "the holder read a value older than its own last write, said valid")
            ps.latency(0, 0, [2])
            if end == "down-conversion":
                lk.convert("PR")  # no new value: it completes v2 where its grant had v1
            lk.release()  # (from EX: completes v2 the same way; from PR: writes nothing)
            reader_ps.blackhole([2])  # a reader whose quorum is 0 and 1
            got = reader.lock("r", "PR", timeout=5)
            assert (got.value, got.value_valid) == (b"v2", True), (
                f"a reader after the write read {got.value!r}, valid {got.value_valid}")
            got.release()
            assert keeper.valid
        finally:
            for d in (writer, keeper_client, reader):
                d.close()
            hub.close()
