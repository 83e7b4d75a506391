"""A client cut off from a majority of instances (through its own proxies) while it holds.

The rest of the world keeps working; the partitioned holder must stop believing in its lock
before anyone else is granted it, and what it writes afterwards must not come back as a
valid value block.
"""

from __future__ import annotations

import threading
import time

import pytest

from redlockdlm import DLM
from redlockdlm.errors import LockLost

from .harness import ITERATIONS, Scenario, assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.slow]
LEASE_MS = 1500


class ValidityWatch:
    """Polls `lock.valid` every millisecond: the last instant it was True."""

    def __init__(self, lock) -> None:  # noqa: ANN001
        self.lock = lock
        self.last_true = 0
        self.first_false = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic_ns()
            if self.lock.valid:
                self.last_true = t
            elif not self.first_false:
                self.first_false = t
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)


@pytest.mark.timeout(60 * ITERATIONS + 60)
def test_partitioned_holder_learns_loss_before_another_is_granted() -> None:
    """A PW/EX holder partitioned from a majority (still reaching one instance, where it
    keeps renewing): `lock.valid` turns False, and `on_lost` runs, and only after that is
    the lock granted to a contender, with a greater token. The holder had set a value
    block before the cut (the `with` pattern) and writes it when it releases after the
    contender's own write: a reader must get the contender's value, or be told the value
    is not valid; never the partitioned holder's stale one as valid."""
    with Scenario("partitioned holder, deterministic", 3) as sc:
        urls = sc.inst.urls
        keeper = DLM(urls, "faults", lease_ms=LEASE_MS)
        writer = DLM(urls, "faults", lease_ms=LEASE_MS)
        reader = DLM(urls, "faults", lease_ms=LEASE_MS)
        try:
            keeper.lock("part", "NL")  # keeps the resource and its value block alive
            for it in range(ITERATIONS):
                ps = sc.hub.proxy_set([s.port for s in sc.inst], f"holder{it}")
                holder = DLM(ps.urls, "faults", lease_ms=LEASE_MS, socket_timeout=0.3,
                             connect_timeout=0.3)
                lost = threading.Event()
                t_lost: list[int] = []
                hl = holder.lock("part", "EX", on_lost=lambda lk, t_lost=t_lost, lost=lost: (
                    t_lost.append(time.monotonic_ns()), lost.set()))
                hl.value = f"holder-{it}".encode()  # written when it releases
                watch = ValidityWatch(hl)
                ps.blackhole([1, 2])  # still reaches instance 0, where it keeps renewing
                sc.fault("client partitioned from a majority", f"holder {it} from [1, 2]")
                t0 = time.monotonic_ns()
                wl = writer.lock("part", "EX", timeout=10)
                t_granted = time.monotonic_ns()
                assert wl.valid
                read = (wl.value, wl.version, wl.value_valid)
                wl.value = f"writer-{it}".encode()
                wl.release()  # written on instances 1 and 2 (the holder still has 0)
                assert lost.wait(5), "on_lost never ran"
                watch.stop()
                sc.log(f"holder valid until {(watch.last_true - t0) / 1e6:.0f} ms after the "
                       f"cut, on_lost at {(t_lost[0] - t0) / 1e6:.0f} ms; the writer got it "
                       f"at {(t_granted - t0) / 1e6:.0f} ms with token {wl.token} > "
                       f"{hl.token}, read {read}")
                assert watch.last_true < t_granted, "two holders believed they held EX"
                # on_lost comes from the renewal thread, which waits up to a socket timeout
                # per unreachable instance: it may run after the contender's grant, but
                # within a renewal tick and those timeouts of lock.valid turning False
                lag = (t_lost[0] - watch.first_false) / 1e9
                assert lag < LEASE_MS / 3000 + 3 * 0.3 + 0.5, f"on_lost {lag:.3f} s late"
                assert watch.first_false and watch.first_false < t_granted
                assert wl.token > hl.token
                with pytest.raises(LockLost):
                    hl.__exit__(None, None, None)  # release: writes its value on instance 0
                ps.heal()
                rl = reader.lock("part", "PR", timeout=10)
                got = (rl.value, rl.version, rl.value_valid)
                rl.release()
                sc.log(f"reader after the heal: {got}")
                if got[2] and got[0] != f"writer-{it}".encode():
                    sc.violation(f"value: the reader got {got[0]!r} v{got[1]} as valid; the "
                                 f"last write was the writer's (the partitioned holder's "
                                 f"write after losing its lock came back)")
                holder.close()
                ps.close()
        finally:
            for d in (keeper, writer, reader):
                d.close()
        rep = sc.finish()
        assert not rep["violations"], rep["violations"]


@pytest.mark.timeout(90 * ITERATIONS + 60)
def test_partitions_under_load() -> None:
    """Workers behind their own proxies are cut off, at random moments, from a random
    majority (holding, converting or waiting), for two leases; then healed. The observer
    sees no incompatible overlap, no token going back, no stale value block, and every
    worker completes sections again after each heal."""
    with Scenario("partitions under load", 3) as sc:
        hs = [sc.spawn(proxied=True, client="async" if k == 3 else "sync") for k in range(4)]
        sc.wait_started()
        for _ in range(3 * ITERATIONS):
            h = sc.rng.choice(hs)
            cut = sorted(sc.rng.sample(range(3), 2))
            sc.run_for(sc.rng.uniform(0.2, 1.0))
            sc.proxies[h.wid].blackhole(cut)
            sc.fault("client partitioned from a majority", f"{h.wid} from {cut}")
            sc.run_for(2 * sc.lease_s)
            sc.proxies[h.wid].heal()
            sc.wait_progress(3)
        assert_clean(sc.finish())
