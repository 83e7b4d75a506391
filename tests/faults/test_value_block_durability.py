"""Value blocks through sequential restarts of different instances (one at a time).

Found by a long run of the fault suite (``DLM_FAULT_ITERATIONS=4``, "kill 1 of 3": eight
rounds of an instance killed and restarted empty): a reader got, with `value_valid` True, a
value ten writes old. The mechanism, replayed here step by step:

1. instance C restarts empty: every lock held through it loses its vote there for good
   (renewals find it gone; nothing re-establishes it) and stays held on A and B;
2. a holder of such a lock (an NL "keeper" converted up to EX, the VMS idiom) writes the
   value block when it converts down: only where it holds PW/EX (V3), so on A and B; C keeps
   the older value it got from a lock granted there after its restart;
3. instance A restarts empty (C is healthy again: one fault at a time);
4. a reader granted on A and C (B is slow to answer, or simply answers last) takes the
   highest version of its quorum: C's older one, said valid. The last write now lives on B
   alone, a minority, although an NL lock held all along kept the resource alive.

Each fault was a minority, and each was healed before the next. The lock itself stays safe
(a lock left with fewer than a quorum of votes is reported lost); the value block did not
say it may be stale. Fixed by two rules (docs/rules.md, reasoning in docs/protocol.md):

* R2: a held lock whose renewal finds it gone from an instance that restarted empty (a new
  epoch) requests it there again, same lock id, once that instance is safe (E1); so step 2
  writes on all three instances again;
* V5: an instance that restarted empty marks the value block of a resource that gets its
  first lock there in the rejoin window as *forgotten*, and a reader whose quorum includes
  such an instance gets `value_valid` False (VMS: a value block recovery cannot rebuild is
  marked invalid), whatever versions the others report, until the next write. That covers
  a write that reached a bare quorum for another reason (the second test).
"""

from __future__ import annotations

import time

import pytest
from redis_harness import Instances

from redlockdlm import DLM

from .proxy import ProxyHub

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(60)]
NS = "vbd"
LEASE_MS = 500  # also the rejoin delay of a restarted instance


def test_write_survives_sequential_restarts_of_different_instances() -> None:
    with Instances(3) as inst:
        a, b, c = inst.servers
        inst.init_fresh(NS)
        opts = dict(lease_ms=LEASE_MS, socket_timeout=0.3, connect_timeout=0.3)
        keeper_client, anchor_client, writer, reader = (
            DLM(inst.urls, NS, **opts) for _ in range(4))
        try:
            keeper = keeper_client.lock("r", "NL")  # held on A, B and C
            c.restart(empty=True)  # fault 1
            time.sleep(3 * LEASE_MS / 1000)  # C's rejoin delay; renewals find the lock gone
            assert keeper.valid  # still held, on A and B
            # an NL lock held on all three from now on: the resource and its value block
            # stay alive on every instance but a restarted one, and this lock stays held
            anchor = anchor_client.lock("r", "NL")
            w = writer.lock("r", "EX")  # granted on A, B and C (C has recovered)
            w.value = b"v1"
            w.release()  # version 1 everywhere
            keeper.convert("EX")  # granted on A and B: C does not know this lock any more
            keeper.value = b"v2"
            keeper.convert("NL")  # version 2 written on A and B only
            a.restart(empty=True)  # fault 2, once C is healthy
            time.sleep(3 * LEASE_MS / 1000)
            b.pause()  # a slow B: the reader's quorum is A and C
            try:
                r = reader.lock("r", "PR", timeout=5)
            finally:
                b.resume()
            got = (r.value, r.version, r.value_valid)
            r.release()
            assert anchor.valid  # held all along (on B and C at the end)
            assert got[0] == b"v2" or not got[2], f"read {got}: version 2 was lost"
        finally:
            for d in (keeper_client, anchor_client, writer, reader):
                d.close()


def test_write_on_a_bare_quorum_then_a_restart_reads_not_valid() -> None:
    """The write of version 2 misses C (cut off from the writer, not restarted: nothing to
    rejoin), then A restarts empty: the reader's quorum A and C holds no copy of it. A
    marked the value forgotten (V5), so the reader is told the value may be stale."""
    with Instances(3) as inst:
        a, b, c = inst.servers
        inst.init_fresh(NS)
        hub = ProxyHub()
        kp = hub.proxy_set([s.port for s in inst], "keeper")
        opts = dict(lease_ms=LEASE_MS, socket_timeout=0.3, connect_timeout=0.3)
        keeper_client = DLM(kp.urls, NS, **opts)
        anchor_client, writer, reader = (DLM(inst.urls, NS, **opts) for _ in range(3))
        try:
            anchor = anchor_client.lock("r", "NL")  # keeps "r" alive everywhere
            keeper = keeper_client.lock("r", "NL")
            w = writer.lock("r", "EX")
            w.value = b"v1"
            w.release()  # version 1 everywhere
            kp.blackhole([2])  # the keeper cannot reach C
            keeper.convert("EX")  # granted on A and B
            keeper.value = b"v2"
            keeper.convert("NL")  # version 2 written on A and B only
            kp.heal([2])
            a.restart(empty=True)  # A forgets version 2: only B has it
            time.sleep(3 * LEASE_MS / 1000)  # A is safe; anchor and keeper rejoin A (R2)
            b.pause()  # the reader's quorum is A and C
            try:
                r = reader.lock("r", "PR", timeout=5)
            finally:
                b.resume()
            got = (r.value, r.version, r.value_valid)
            r.release()
            assert anchor.valid
            assert got[0] == b"v2" or not got[2], f"read {got}: version 2 was lost"
        finally:
            for d in (keeper_client, anchor_client, writer, reader):
                d.close()
            hub.close()
