"""A down-conversion that did not reach an instance leaves the stronger mode there.

Found by a long run of the fault suite (instances restarted from their AOF while NL keeper
locks converted back down): the conversion completed on a quorum, the instance that missed
it kept the old, stronger mode, and the holder's renewals kept that stale grant alive for
as long as the lock lived. The holder believes it holds NL; the instance blocks every
incompatible request behind an EX nobody holds. Safe (stronger is never unsafe), but one
more unavailable instance and nobody can take the resource: workers waited their full
acquisition timeout. Fixed by R1 (docs/rules.md): a renewal that reports the stronger mode
makes the client send the missed down-conversion again.
"""

from __future__ import annotations

import time

import pytest
from redis_harness import Instances

from redlockdlm import DLM
from redlockdlm.engine.instance import Engine

from .proxy import ProxyHub

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(60)]
NS = "smc"


def test_missed_down_conversion_is_repaired() -> None:
    with Instances(3) as inst:
        inst.init_fresh(NS)
        hub = ProxyHub()
        ps = hub.proxy_set([s.port for s in inst], "holder")
        d = DLM(ps.urls, NS, lease_ms=900, socket_timeout=0.3, connect_timeout=0.3)
        try:
            lk = d.lock("r", "EX")
            ps.blackhole([2])  # the down-conversion will not reach instance 2
            lk.convert("NL")  # done on instances 0 and 1 (a quorum)
            ps.heal([2])
            time.sleep(2.0)  # several renewals, which reach instance 2 again
            assert lk.valid
            eng = Engine(inst[2].client(), NS)
            _, (view,) = eng.inspect([eng.key("r")])
            modes = [lv.mode for lv in view.locks if lv.lock_id == lk.id] if view else []
            assert modes and all(m == 0 for m in modes), (
                f"instance 2 still grants {modes} to a lock held in NL")
        finally:
            d.close()
            hub.close()
