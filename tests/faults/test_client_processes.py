"""Client processes that crash (SIGKILL) or stop (SIGSTOP) in the middle of the protocol.

A crashed client's locks, granted, converting or waiting, free themselves within a lease,
wherever the crash left its requests, conversions and releases (some instances reached,
others not). A stopped client that wakes after its lease and writes with its old fencing
token is refused by the protected resource.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from .harness import ITERATIONS, Scenario, assert_clean
from .workload import ACQUIRE, CONVERT, PHASES, RELEASE

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


@pytest.mark.timeout(150 * ITERATIONS + 60)
def test_client_killed_mid_protocol() -> None:
    """Victim clients, behind proxies that make every call last 20-25 ms and reach the
    instances at different moments, are killed (SIGKILL) by a timer started as they enter
    an acquisition, a conversion or a release, or at a random moment. After each kill no
    instance keeps a live lock of the dead owner beyond one lease (plus polling slack),
    the other workers go on, and the observer finds no overlap, no token going back, no
    stale value block."""
    with Scenario("client SIGKILL mid-protocol", 3) as sc:
        for k in range(3):
            sc.spawn(client="async" if k == 2 else "sync")
        sc.wait_started()
        plans = [ACQUIRE, CONVERT, RELEASE, None] * (2 * ITERATIONS)
        died_in: Counter[str] = Counter()
        freed_after: list[float] = []
        for phase in plans:
            die = None
            if phase is not None:
                die = (phase, sc.rng.randint(2, 6), sc.rng.uniform(0.0, 22.0))
            v = sc.spawn(proxied=True, die=die)
            for i, p in enumerate(sc.proxies[v.wid].proxies):
                p.latency(up_ms=10 * i, down_ms=5)  # the instances hear it at different times
            if phase is None:
                deadline = time.monotonic() + 20
                while v.alive and sc.obs.begins_of(v.wid) < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(sc.rng.uniform(0.0, 0.5))
                where = v.kill()
            else:
                v.proc.join(20)
                where = v.kill() if v.alive else PHASES[v.phase.value]
            t_dead = time.monotonic()
            owner = sc.obs.workers.get(v.wid, {}).get("owner")
            died_in[where] += 1
            if owner is None:  # died before it said hello: it holds nothing
                sc.fault("client SIGKILL", f"{v.wid} before its first call")
                continue
            left = [sum(1 for r in sc.views(i) for lv in r.locks
                        if lv.owner == owner and lv.lease_left_ms > 0) for i in range(sc.n)]
            gone = sc.wait_owner_gone(owner, sc.lease_s + 1.0)
            after = time.monotonic() - t_dead if gone is not None else None
            planned = PHASES[phase] if phase is not None else "random moment"
            sc.fault("client SIGKILL", f"{v.wid} planned in {planned}, died in {where}, "
                     f"leaving {left} live locks on the instances; all gone after "
                     f"{after if after is None else round(after, 2)} s")
            if after is None:
                sc.violation(f"liveness: {v.wid}'s locks still live {sc.lease_s + 1.0} s after "
                             f"it was killed")
            else:
                freed_after.append(after)
        sc.log(f"killed in phases {dict(died_in)}; locks freed after at most "
               f"{max(freed_after, default=0):.2f} s (lease {sc.lease_s} s)")
        took = sc.wait_progress(3)
        sc.log(f"every surviving worker made progress {took:.1f} s later")
        rep = sc.finish()
        assert_clean(rep)
        assert set(died_in) & {"acquire", "convert", "release"}, died_in


@pytest.mark.timeout(150 * ITERATIONS + 60)
def test_paused_client_writes_with_stale_token() -> None:
    """A client checks `lock.valid`, then stops (SIGSTOP, as a GC pause would) before its
    write, for longer than its lease. Meanwhile another client is granted the resource in
    an incompatible mode and presents its newer token. When the paused client wakes and
    writes with its old token, the protected resource refuses it. Other workers are also
    stopped at random moments for longer than a lease. No overlap, no token going back, no
    stale value block."""
    with Scenario("client SIGSTOP, stale write", 3) as sc:
        normal = [sc.spawn() for _ in range(3)]
        sc.spawn(pause_every=2, pause_max=4 * ITERATIONS, mode_weights=(0, 1, 0, 1, 3, 3))
        sc.wait_started()
        stop = threading.Event()

        def pauser() -> None:
            """Meanwhile, stop the other workers at random moments, longer than a lease."""
            while not stop.is_set():
                victim = sc.rng.choice(normal)
                victim.pause()
                sc.fault("client SIGSTOP at a random moment", victim.wid)
                stop.wait(sc.rng.uniform(sc.lease_s + 0.1, sc.lease_s + 0.7))
                victim.resume()
                stop.wait(sc.rng.uniform(0.0, 0.4))

        th = threading.Thread(target=pauser, daemon=True)
        th.start()
        seen = refused = 0
        for _ in range(4 * ITERATIONS):
            deadline = time.monotonic() + 30
            while len(sc.obs.paused) <= seen and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(sc.obs.paused) > seen, "the victim never reached its pause point"
            wid, sid = sc.obs.paused[seen]
            seen += 1
            h = sc.handles[wid]
            while not _stopped(h.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            sc.fault("client SIGSTOP after its validity check",
                     f"{wid} section {sid} ({sc.obs.sections[sid].res})")
            t0 = time.monotonic()
            newer = None
            while newer is None and time.monotonic() - t0 < 4 * sc.lease_s:
                newer = sc.obs.newer_conflicting(sid)
                time.sleep(0.01)
            time.sleep(0.1)
            h.resume()
            while not sc.obs.sections[sid].writes and time.monotonic() - t0 < 10:
                time.sleep(0.01)
            writes = sc.obs.sections[sid].writes
            accepted = bool(writes) and writes[0][2]
            if newer is not None:
                sc.log(f"stale write of {wid} (token {sc.obs.sections[sid].token}) after "
                       f"{newer.worker} presented {newer.token}: "
                       f"{'ACCEPTED' if accepted else 'refused'}")
                if accepted:
                    sc.violation(f"fencing: the stale write of {sid} was accepted")
                else:
                    refused += 1
            else:
                sc.log(f"nobody took {sc.obs.sections[sid].res} while {wid} slept: its late "
                       f"write was {'accepted' if accepted else 'refused'} (nothing to fence)")
        stop.set()
        th.join(5)
        took = sc.wait_progress(3)
        sc.log(f"every worker made progress {took:.1f} s after the last pause")
        rep = sc.finish()
        assert_clean(rep)
        assert refused >= 1, "no stale write was ever fenced off"
