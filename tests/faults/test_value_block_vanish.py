"""A value block that disappeared (G9) must not come back from an instance that slept.

Found by a long run of the fault suite ("pause 2 of 5"): a resource lost its last lock on
some instances, so its value block disappeared there (G9), while an instance that missed
the newer write and the last release (paused, or cut off from those clients) still held an
expired lock and the older value. The next request there purged the expired lock and added
its own in the same call, so the resource (and the older value) lived on, and the reader's
highest version was that superseded value, said valid. (Versions follow the writers'
tokens, so a newer write would win; here the newer write had disappeared with the
resource.) Expected: an empty value block, or one said not valid. Fixed by rule G13: a
purge that removes a resource's last lock drops the value block, as G9 does for a release.
"""

from __future__ import annotations

import time

import pytest
from redis_harness import Instances

from redlockdlm import DLM

from .proxy import ProxyHub

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(60)]
NS = "vbv"
LEASE_MS = 600


def test_value_that_disappeared_does_not_come_back() -> None:
    with Instances(3) as inst:
        inst.init_fresh(NS)
        hub = ProxyHub()
        kp = hub.proxy_set([s.port for s in inst], "keeper")
        wp = hub.proxy_set([s.port for s in inst], "writer2")
        opts = dict(lease_ms=LEASE_MS, socket_timeout=0.3, connect_timeout=0.3)
        keeper_client = DLM(kp.urls, NS, **opts)
        writer2 = DLM(wp.urls, NS, **opts)
        writer, reader = (DLM(inst.urls, NS, **opts) for _ in range(2))
        try:
            keeper = keeper_client.lock("r", "NL")  # keeps "r" alive on all three
            w = writer.lock("r", "EX")
            w.value = b"old"
            w.release()  # everywhere
            wp.blackhole([2])  # instance 2 does not hear from this writer
            w = writer2.lock("r", "EX")  # granted on 0 and 1
            w.value = b"new"
            w.release()  # written on 0 and 1
            kp.blackhole([2])  # ... nor of the keeper's release
            keeper.release()  # 0 and 1 have no lock left: "r" and "new" disappear (G9)
            time.sleep(2 * LEASE_MS / 1000)  # the keeper's lease on 2 runs out
            kp.heal()
            wp.heal()
            r = reader.lock("r", "PR", timeout=5)
            got = (r.value, r.version, r.value_valid)
            r.release()
            assert got[0] is None or not got[2], (
                f"read {got}: the superseded value came back as valid")
        finally:
            for d in (keeper_client, writer2, writer, reader):
                d.close()
            hub.close()
