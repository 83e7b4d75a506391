"""Deadlock-detector benchmark: scan cost with many waiters, and time to resolve a deadlock.

    python benchmarks/detector.py [--waiters 10000] [--repeat 15] [--trials 8]
                                  [--chunks 250,500,1000] [--no-resolution]

Starts three redis-servers on free loopback ports (tests/redis_harness.py) and stops them,
by pid, at the end. The lock state is written with the same scripts a client uses, sent in
pipelines, the same locks on every instance (as the quorum client does):

  layout "1+1"   N resources, each with one EX holder and one EX waiter
  layout "1+10"  N/10 resources, each with one EX holder and ten EX waiters (long queues:
                 45 waiter pairs per resource in the wait-for graph)

Figures, each the median (and min..max) of --repeat runs, all three instances in parallel:

  floor, round trip   PING on every instance (threads), nothing else
  floor, raw data     ZRANGEBYSCORE of the index + MGET of every resource it names: the
                      same bytes the scan moves, without scripts or parsing
  floor, decode       the same index read, then a script that only GETs and
                      cmsgpack.unpacks each resource (500 keys per call, pipelined): what
                      any script reading the stored resources pays, whatever it returns
  scan, cold          detector.scan() without a memo: instance clock, index, then
                      lua/scan.lua on the resources it names (SCAN_CHUNK keys per call, all
                      calls of an instance in one pipeline); every resource is decoded by
                      the script and parsed into detector.ScannedLock tuples (what a detector's
                      first round, or `dlm graph`, pays)
  scan                the same with the ScanMemo a Detector keeps (D1): the script decodes
                      and sends only resources that changed since the previous scan, the
                      client keeps its tuples for the others. Nothing changes between these
                      scans: the detector's steady state. The target is checked on it.
  scan, P% changed    the same, after the lease of the holders of P% of the resources was
                      renewed (a same-mode conversion, untimed) before every scan: the
                      renewals of a real workload (a lease renewed every third of it)
  scan, chunk N       the same with N keys per scan call (--chunks: to choose SCAN_CHUNK)
  graph + cycles      wait_for_graph + find_cycles on that snapshot (pure Python), from
                      scratch, then with the memo a Detector keeps (edges of resources whose
                      views are the same objects are kept: the steady state)
  detector round      Detector.run_once() (memo scan + memo graph + cycles + bookkeeping)

Beside the scan's wall time it prints where its CPU went: the CPU time of the busiest
redis-server (INFO cpu), also per resource, and this process's CPU (reply parsing), because
on a shared machine wall times swing with the load of other processes; and the script time
INFO commandstats counts (elapsed, so it swells with that load too). The load average is
printed after each layout.

Target: a scan of 10,000 waiters under 200 ms. Then the time from the moment a two-owner
cycle is formed (the last request's reply) to the cancel event reaching the victim's
channel, for a detector running with interval 0.5 s, first with no other waiters, then
with the 1+1 layout present; target: within two intervals. This script prints; it does
not assert.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis_harness import Instances  # noqa: E402

from redlockdlm.detector import (  # noqa: E402
    Detector,
    ScanMemo,
    find_cycles,
    scan,
    scanning,
    wait_for_graph,
)
from redlockdlm.engine import codec  # noqa: E402
from redlockdlm.engine.instance import Engine  # noqa: E402
from redlockdlm.engine.keys import EPOCH_KEY  # noqa: E402
from redlockdlm.engine.modes import Mode  # noqa: E402
from redlockdlm.engine.scripts import command, ensure_loaded  # noqa: E402

NAMESPACE = f"bench-{os.getpid()}"
LEASE_MS = 600_000
TARGET_SCAN_MS = 200.0
TARGET_WAITERS = 10_000
INTERVAL_S = 0.5
BATCH = 2_000
DECODE_ONLY = """
local unpack = cmsgpack.unpack
for i = 1, #KEYS do
  local blob = redis.call('GET', KEYS[i])
  if blob then unpack(blob) end
end
return #KEYS
"""


def touch(engines: list[Engine], resources: int, waiters_each: int, tag: str, share: float,
          round_no: int) -> None:
    """Renew the holder's lease on `share` of the resources of `fill` (a conversion to the
    mode held, G4: only the lease changes, so the stored resource changes), on every
    instance, pipelined; a different slice each round."""
    n = max(1, int(resources * share))
    start = (round_no * n) % resources
    picked = [(start + i) % resources for i in range(n)]

    def one(e: Engine) -> None:
        p = e.client.pipeline(transaction=False)
        for r in picked:
            key = e.key(f"{tag}{r}")
            t = (1 + waiters_each) * r + 1
            p.execute_command(*command("convert", [EPOCH_KEY, e.wkey, key], codec.convert_args(
                e.rejoin_ms, e.chan, f"o{r}_0", f"{tag}{r}_0", Mode.EX, 0, t,
                LEASE_MS + round_no % 7 + 1, None, 0, e.vbmax, 0)))
        p.execute()

    with ThreadPoolExecutor(len(engines)) as pool:
        list(pool.map(one, engines))


def fill(engines: list[Engine], resources: int, waiters_each: int, tag: str) -> int:
    """`resources` resources, each with one EX holder and `waiters_each` EX waiters, on
    every instance; returns the number of waiters per instance."""
    ticket = 0
    calls: list[tuple[bytes, str, str, int]] = []
    for r in range(resources):
        key = engines[0].key(f"{tag}{r}")
        for k in range(1 + waiters_each):
            ticket += 1
            calls.append((key, f"o{r}_{k}", f"{tag}{r}_{k}", ticket))

    def one(e: Engine) -> None:
        ensure_loaded(e.client)
        for i in range(0, len(calls), BATCH):
            p = e.client.pipeline(transaction=False)
            for key, owner, lock_id, t in calls[i:i + BATCH]:
                p.execute_command(*command("request", [EPOCH_KEY, e.wkey, key, key],
                                           codec.request_args(e.rejoin_ms, e.chan, owner,
                                                              lock_id, Mode.EX, 0, t, LEASE_MS,
                                                              "", key)))
            p.execute()

    with ThreadPoolExecutor(len(engines)) as pool:
        list(pool.map(one, engines))
    return resources * waiters_each


def clear(engines: list[Engine]) -> None:
    for e in engines:
        e.client.flushall()
        e.init_fresh()


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm-up (connections, first parse)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def server_script_ms(engines: list[Engine]) -> list[float]:
    """Script CPU time so far on each instance (INFO commandstats: fcall + eval)."""
    out = []
    for e in engines:
        st = e.client.info("commandstats")
        out.append(sum(st.get(k, {}).get("usec", 0) for k in ("cmdstat_fcall",
                                                              "cmdstat_eval")) / 1000)
    return out


def server_cpu_ms(engines: list[Engine]) -> list[float]:
    """CPU time so far of each redis-server process (INFO cpu: user + sys). Unlike the
    script time of commandstats (elapsed time), it does not grow while the server waits for
    a CPU that other processes hold."""
    out = []
    for e in engines:
        st = e.client.info("cpu")
        out.append((st["used_cpu_user"] + st["used_cpu_sys"]) * 1000)
    return out


def cpu_split(engines: list[Engine], fn: Callable[[], object], repeat: int
              ) -> tuple[float, float, float]:
    """Per call of fn: (script ms on the busiest instance, CPU ms of the busiest server,
    this process's CPU ms)."""
    s0, u0, c0 = server_script_ms(engines), server_cpu_ms(engines), time.process_time()
    for _ in range(repeat):
        fn()
    s1, u1, c1 = server_script_ms(engines), server_cpu_ms(engines), time.process_time()
    return (max(b - a for a, b in zip(s0, s1)) / repeat,
            max(b - a for a, b in zip(u0, u1)) / repeat, (c1 - c0) * 1000 / repeat)


def fmt(ms: list[float]) -> str:
    return f"{statistics.median(ms):8.1f} ms  ({min(ms):.1f}..{max(ms):.1f})"


def measure(engines: list[Engine], pool: ThreadPoolExecutor, repeat: int, label: str,
            waiters: int, chunks: list[int], per: int) -> None:
    def ping() -> None:
        list(pool.map(lambda e: e.client.ping(), engines))

    def raw() -> None:
        def one(e: Engine) -> int:
            members = e.client.zrangebyscore(e.wkey, "-inf", "+inf")
            keys = list(dict.fromkeys(m.split(b"|", 1)[1] for m in members))
            return len(e.client.mget(keys)) if keys else 0
        list(pool.map(one, engines))

    snap = scan(engines, executor=pool)
    assert snap.waiter_count == waiters * len(engines), snap.waiter_count
    det = Detector(engines, NAMESPACE, INTERVAL_S, reap_every=0)
    floor_rt = timed(ping, repeat)
    def decode() -> None:
        def one(e: Engine) -> None:
            members = e.client.zrangebyscore(e.wkey, "-inf", "+inf")
            keys = list(dict.fromkeys(m.split(b"|", 1)[1] for m in members))
            p = e.client.pipeline(transaction=False)
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                p.evalsha(sha, len(chunk), *chunk)
            p.execute()
        list(pool.map(one, engines))

    sha = ""
    for e in engines:
        sha = e.client.script_load(DECODE_ONLY)
    floor_raw = timed(raw, repeat)
    floor_decode = timed(decode, repeat)
    cold = timed(lambda: scan(engines, executor=pool), repeat)
    cold_split = cpu_split(engines, lambda: scan(engines, executor=pool), repeat)
    memo = ScanMemo()
    scans = timed(lambda: scan(engines, executor=pool, memo=memo), repeat)
    srv_ms, cpu_ms, cli_ms = cpu_split(engines, lambda: scan(engines, executor=pool, memo=memo),
                                       repeat)
    resources = waiters // per
    churn: dict[float, list[float]] = {}
    for share in (0.05,):
        out = []
        for k in range(repeat + 1):
            touch(engines, resources, per, "r", share, k)
            t0 = time.perf_counter()
            scan(engines, executor=pool, memo=memo)
            out.append((time.perf_counter() - t0) * 1000)
        churn[share] = out[1:]
    graphs = timed(lambda: find_cycles(wait_for_graph(snap)), repeat)
    graph_memo: dict = {}
    graphs_memo = timed(lambda: find_cycles(wait_for_graph(snap, memo=graph_memo)), repeat)
    rounds = timed(det.run_once, repeat)
    det.close()
    by_chunk = {}
    default_chunk = scanning.SCAN_CHUNK
    try:
        for n in chunks:
            scanning.SCAN_CHUNK = n
            by_chunk[n] = timed(lambda: scan(engines, executor=pool), repeat)
    finally:
        scanning.SCAN_CHUNK = default_chunk
    g = wait_for_graph(snap)
    med = statistics.median(scans)
    per_instance = max(len(i.resources) for i in snap.instances)
    print(f"layout {label}: {waiters:,} waiters per instance x {len(engines)} instances "
          f"({snap.waiter_count:,} index entries, {sum(len(i.resources) for i in snap.instances):,}"
          f" resources read); graph: {len(g.edges):,} edges, {len(g.owners):,} owners")
    print(f"  floor, round trip   {fmt(floor_rt)}")
    print(f"  floor, raw data     {fmt(floor_raw)}")
    print(f"  floor, decode       {fmt(floor_decode)}")
    print(f"  scan, cold          {fmt(cold)}   = "
          f"{statistics.median(cold) / statistics.median(floor_decode):.1f} x decode; CPU: "
          f"{cold_split[1]:.1f} ms per server (busiest), {cold_split[2]:.1f} ms in this "
          f"process")
    verdict = ("PASS" if med < TARGET_SCAN_MS else "MISS") if waiters >= TARGET_WAITERS \
        else f"n/a below {TARGET_WAITERS:,} waiters"
    print(f"  scan (memo)         {fmt(scans)}   = "
          f"{med / statistics.median(floor_raw):.1f} x raw data, "
          f"{med / statistics.median(floor_decode):.1f} x decode; target < "
          f"{TARGET_SCAN_MS:.0f} ms: {verdict}")
    print(f"    of which CPU      {cpu_ms:8.1f} ms per server (busiest, INFO cpu: "
          f"{cpu_ms * 1000 / per_instance:.1f} µs per resource), {cli_ms:.1f} ms in this "
          f"process (all {len(engines)} instances)")
    print(f"    script time       {srv_ms:8.1f} ms per server (busiest, INFO commandstats: "
          f"{srv_ms * 1000 / per_instance:.1f} µs per resource; elapsed time, it grows "
          f"when the CPUs are shared)")
    for share, ms in churn.items():
        print(f"  scan, {share:.0%} changed   {fmt(ms)}")
    for n, ms in by_chunk.items():
        print(f"  scan, chunk {n:<7,} {fmt(ms)}")
    print(f"  graph + cycles      {fmt(graphs)}")
    print(f"  graph + cycles, memo{fmt(graphs_memo)}")
    print(f"  detector round      {fmt(rounds)}")
    print(f"  load average now    {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(other processes share these {os.cpu_count()} CPUs)")
    print()


def resolution(engines: list[Engine], trials: int, load: str) -> None:
    """Cycle formation -> cancel event, detector interval INTERVAL_S."""
    stop = threading.Event()
    det = Detector(engines, NAMESPACE, INTERVAL_S, reap_every=0)
    runner = threading.Thread(target=det.run_forever, args=(stop,), daemon=True)
    runner.start()
    subs = []
    for e in engines:
        p = e.client.pubsub()
        p.subscribe(e.chan + b"b")
        p.get_message(timeout=1)
        subs.append(p)
    lat = []
    try:
        for t in range(trials):
            k1, k2 = engines[0].key(f"cyc{t}a"), engines[0].key(f"cyc{t}b")
            base = 10_000_000 + 10 * t
            for e in engines:
                e.request(k1, "a", f"a1_{t}", Mode.EX, ticket=base + 1, lease_ms=LEASE_MS,
                          name=f"cyc{t}a".encode())
                e.request(k2, "b", f"b1_{t}", Mode.EX, ticket=base + 2, lease_ms=LEASE_MS,
                          name=f"cyc{t}b".encode())
                e.request(k2, "a", f"a2_{t}", Mode.EX, ticket=base + 3, lease_ms=LEASE_MS,
                          name=f"cyc{t}b".encode())
            time.sleep(0.137 * (t % 4))  # vary the phase against the detector's schedule
            close = functools.partial(Engine.request, key=k1, owner="b", lock_id=f"b2_{t}",
                                      mode=Mode.EX, ticket=base + 4, lease_ms=LEASE_MS,
                                      name=f"cyc{t}a".encode())
            with ThreadPoolExecutor(len(engines)) as pool:  # the cycle closes on all at once
                list(pool.map(close, engines))
            t0 = time.perf_counter()
            want = f"C|b2_{t}|deadlock".encode()
            got = None
            deadline = t0 + 10
            while got is None and time.perf_counter() < deadline:
                for p in subs:
                    m = p.get_message(timeout=0.002)
                    if m and m["type"] == "message" and m["data"] == want:
                        got = time.perf_counter()
                        break
            lat.append(float("inf") if got is None else (got - t0) * 1000)
            for p in subs:  # drain the other instances' copies
                while p.get_message(timeout=0.05):
                    pass
            for e in engines:  # a releases; the next trial starts clean
                e.release(k1, "a", f"a1_{t}")
                e.release(k2, "b", f"b1_{t}")
                e.release(k2, "a", f"a2_{t}")
    finally:
        stop.set()
        runner.join(timeout=5)
        det.close()
        for p in subs:
            p.close()
    target = 2 * INTERVAL_S * 1000
    print(f"cycle formed -> C|id|deadlock received, detector interval {INTERVAL_S} s, "
          f"{load} ({trials} trials, phases varied):")
    print("  " + "  ".join(f"{x:.0f}" for x in lat) + " ms")
    print(f"  median {statistics.median(lat):.0f} ms, max {max(lat):.0f} ms; target within "
          f"two intervals ({target:.0f} ms): {'PASS' if max(lat) <= target else 'MISS'}")


def main() -> None:
    logging.getLogger("redlockdlm").setLevel(logging.ERROR)  # the figures, not the events
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--waiters", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--chunks", default="",
                    help="comma-separated keys per scan call to compare (default: none)")
    ap.add_argument("--no-resolution", action="store_true",
                    help="skip the cycle-resolution trials")
    args = ap.parse_args()
    chunks = [int(x) for x in args.chunks.split(",") if x]
    with Instances(3) as inst:
        engines = [Engine(redis.Redis.from_url(u), NAMESPACE, rejoin_ms=LEASE_MS)
                   for u in inst.urls]
        info = engines[0].client.info("server")
        print(f"3 x redis-server {info['redis_version']} on 127.0.0.1 (started by this script);"
              f" python {platform.python_version()}, redis-py {redis.__version__}, hiredis: "
              f"{'yes' if redis.utils.HIREDIS_AVAILABLE else 'NO'}; {os.cpu_count()} CPUs")
        print()
        with ThreadPoolExecutor(3) as pool:
            for label, per in (("1+1", 1), ("1+10", 10)):
                clear(engines)
                t0 = time.perf_counter()
                n = fill(engines, args.waiters // per, per, "r")
                print(f"(layout {label} written in {time.perf_counter() - t0:.1f} s)")
                measure(engines, pool, args.repeat, label, n, chunks, per)
        if args.no_resolution:
            clear(engines)
            return
        clear(engines)
        resolution(engines, args.trials, "no other waiters")
        print()
        fill(engines, args.waiters, 1, "r")
        resolution(engines, args.trials, f"layout 1+1 present ({args.waiters:,} waiters)")


if __name__ == "__main__":
    main()
