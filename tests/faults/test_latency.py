"""Latency spikes on a client's connections, below and beyond the validity margin."""

from __future__ import annotations

import time

import pytest

from redlockdlm.protocol import DRIFT_FACTOR, DRIFT_MIN_MS

from .harness import ITERATIONS, Scenario, assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.timeout(120 * ITERATIONS + 60)
def test_latency_spikes() -> None:
    """Two slow clients (socket timeout long enough to wait for late replies) get spikes
    of one-way latency on all their connections: round trips of 0.4x, 1.2x and 1.7x the
    validity margin `lease - drift`. Beyond the margin every grant or renewal arrives too
    late to be counted: the client must never consider a lock held from `lease - drift`
    after the spike started until it ends. Below it, locks are granted with little
    validity left. The observer sees no overlap, no token going back, no stale value, and
    the slow clients work again once the latency is gone."""
    with Scenario("latency spikes", 3) as sc:
        for _ in range(3):
            sc.spawn()
        slow = [sc.spawn(proxied=True, socket_timeout=6.0, connect_timeout=6.0)
                for _ in range(2)]
        sc.wait_started()
        lease_ms = sc.cfg["lease_ms"]
        margin_ms = lease_ms - (lease_ms * DRIFT_FACTOR + DRIFT_MIN_MS)
        windows = []
        for k in range(3 * ITERATIONS):
            rtt = (0.4, 1.2, 1.7)[k % 3] * margin_ms
            before = {h.wid: sc.obs.begins_of(h.wid) for h in slow}
            on = time.monotonic_ns()
            for h in slow:
                sc.proxies[h.wid].latency(rtt / 2, rtt / 2)
            sc.fault("latency spike", f"round trip {rtt:.0f} ms (margin {margin_ms:.0f} ms)")
            time.sleep(3 * sc.lease_s)
            off = time.monotonic_ns()
            for h in slow:
                sc.proxies[h.wid].heal()
            during = {w: sc.obs.begins_of(w) - n for w, n in before.items()}
            sc.log(f"sections of the slow clients during the spike: {during}")
            if rtt > margin_ms:
                windows.append((on + int(margin_ms * 1e6), off))
            sc.wait_progress(3)
        slow_ids = {h.wid for h in slow}
        for s in list(sc.obs.sections.values()):
            if s.worker in slow_ids:
                for t in s.confirms:
                    for a, b in windows:
                        if a <= t <= b:
                            sc.violation(f"latency: {s.worker} considered {s.res} held "
                                         f"{(t - a) / 1e6:.0f} ms into a spike beyond the "
                                         f"validity margin")
        assert_clean(sc.finish())
