"""Scale-out benchmark (issue 13): quorum members that are Redis Clusters of 1 and of 3 shards.

    python benchmarks/scale.py [--seconds S] [--workers W] [--resources R] [--held H]
                               [--shards 1,3]

For each shard count S it starts 3 quorum members, each a Redis Cluster of S primaries on
free loopback ports (tests/redis_harness.py; a 1-shard member is a cluster too, so the two
rows differ only in the shard count), marks every slot's epoch fresh (E1) and then:

  1. W worker processes acquire H locks (EX, random resources out of R) and keep them;
  2. the same workers lock and release random resources out of R for S seconds (EX, each
     acquisition waits at most 5 s), while the H locks stay held;
  3. with everything still held, it counts each shard's lock keys (SCAN) and, over phase 2
     only, each shard's script calls (INFO commandstats, FCALL) and CPU (INFO cpu).

It prints, per shard: keys held, script calls, CPU; the balance (busiest shard / mean, target
<= 1.2 for calls and keys); the server CPU per script call and per acquisition (target: not
growing with the shard count); the aggregate acquisitions/s; and what the per-shard CPU
predicts for a machine with a core per shard (the capacity model of docs/operations.md).

Every figure stands beside the FLOOR measured in the same run: the trivial script (`return
1` by EVALSHA) sent to one node of each of the 3 members on raw connections, all written
before any reply is read. The benchmark proves its premises: that every member is a cluster
of S primaries (CLUSTER INFO), that the script calls really spread over all the shards, that
the floor is below the fastest acquisition, and that no resource had two EX holders (each
worker checks its fencing tokens of a resource never go back). It does not assert.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quorum import Floor, pct  # noqa: E402
from redis_harness import RedisClusterServer  # noqa: E402

from redlockdlm import DLM, Mode  # noqa: E402
from redlockdlm.engine.instance import Engine  # noqa: E402

NAMESPACE = "scale"  # (a constant: spawned workers evaluate it again)
LEASE_MS = 60_000
MEMBERS = 3


def worker(urls: list[str], k: int, held: int, resources: int, seconds: float,
           start_at: float, q: Any, done: Any) -> None:
    """Hold `held` locks, then lock/release random resources until the time is up; report
    (k, acquisitions, latencies, cpu seconds of the loop, fencing errors), then wait for
    `done` before releasing the held locks (the parent counts keys meanwhile)."""
    rng = random.Random(k)
    with DLM(urls, NAMESPACE, lease_ms=LEASE_MS) as d:
        # Held locks: names of this worker only (another worker never waits on them).
        keep = [d.lock(f"held-{k}-{i}", Mode.EX, timeout=30) for i in range(held)]
        q.put(("held", k, len(keep)))
        while time.time() < start_at:
            time.sleep(0.001)
        lat: list[float] = []
        last_token: dict[str, int] = {}
        backwards = 0
        cpu = time.process_time()
        end = time.monotonic() + seconds
        while True:
            t0 = time.perf_counter()
            if time.monotonic() >= end:
                break
            name = f"r{rng.randrange(resources)}"
            lk = d.lock(name, Mode.EX, timeout=5)
            tok = lk.token
            if tok <= last_token.get(name, -1):
                backwards += 1  # a fencing token that did not grow: two holders
            last_token[name] = tok
            lk.release()
            lat.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu
        q.put(("run", k, len(lat), lat, cpu, backwards))
        done.wait(120)
        for lk in keep:
            lk.release()


def node_stats(nodes: list[tuple[int, redis.Redis]]) -> list[dict[str, float]]:
    out = []
    for _, c in nodes:
        st = c.info("commandstats").get("cmdstat_fcall", {})
        cpu = c.info("cpu")
        out.append({"calls": int(st.get("calls", 0)), "usec": int(st.get("usec", 0)),
                    "cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])})
    return out


def lock_keys(c: redis.Redis) -> int:
    return sum(1 for _ in c.scan_iter(match=f"dlm:{{{NAMESPACE}:*", count=1000))


def run_config(shards: int, args: argparse.Namespace) -> dict[str, Any]:
    members: list[RedisClusterServer] = []
    try:
        for _ in range(MEMBERS):
            members.append(RedisClusterServer(shards))
        urls = [m.url for m in members]
        for m in members:
            Engine(m.client(), NAMESPACE).init_fresh()
        # Premise: each member is a cluster of `shards` primaries.
        nodes: list[tuple[int, redis.Redis]] = []
        labels = []
        for mi, m in enumerate(members):
            for ni, n in enumerate(m.nodes):
                c = redis.Redis(host="127.0.0.1", port=n.port)
                info = c.execute_command("CLUSTER", "INFO")
                if isinstance(info, bytes):
                    info = dict(line.split(":", 1) for line in info.decode().split("\r\n")
                                if ":" in line)
                assert int(info["cluster_size"]) == shards, info
                nodes.append((mi, c))
                lo, hi = m.ranges[ni]
                labels.append(f"m{mi} :{n.port} slots {lo}-{hi}")
        floor = Floor([m.nodes[0].url for m in members])
        for _ in range(200):
            floor.round()
        t0 = time.perf_counter()
        nfl = 2000
        for _ in range(nfl):
            floor.round()
        floor_rt = (time.perf_counter() - t0) / nfl
        floor.close()

        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        done = ctx.Event()
        per = args.held // args.workers
        procs = []
        # One start for all, after the held locks are in (premise: checked, `late_start`)
        start_at = time.time() + 5.0 + per / 400 + 0.5 * args.workers
        for k in range(args.workers):
            p = ctx.Process(target=worker, args=(urls, k, per, args.resources, args.seconds,
                                                 start_at, q, done), daemon=True)
            p.start()
            procs.append(p)
        held = 0
        for _ in procs:
            kind, k, n = q.get(timeout=120)
            held += n
        late = time.time() > start_at
        before = node_stats(nodes)
        t_start = time.perf_counter()
        res = []
        for _ in procs:
            res.append(q.get(timeout=args.seconds + 120))
        elapsed = time.perf_counter() - t_start
        after = node_stats(nodes)
        keys = [lock_keys(c) for _, c in nodes]
        done.set()
        for p in procs:
            p.join(60)
        acq = sum(r[2] for r in res)
        lat = [x for r in res for x in r[3]]
        cpu_client = sum(r[4] for r in res)
        backwards = sum(r[5] for r in res)
        d_calls = [a["calls"] - b["calls"] for a, b in zip(after, before)]
        d_usec = [a["usec"] - b["usec"] for a, b in zip(after, before)]
        d_cpu = [a["cpu"] - b["cpu"] for a, b in zip(after, before)]
        for _, c in nodes:
            c.close()
        return {"shards": shards, "labels": labels, "floor_rt": floor_rt, "held": held,
                "late_start": late, "acq": acq, "elapsed": elapsed, "lat": lat,
                "cpu_client": cpu_client, "backwards": backwards, "calls": d_calls,
                "usec": d_usec, "cpu": d_cpu, "keys": keys}
    finally:
        for m in members:
            m.stop()


def balance(xs: list[float]) -> float:
    mean = statistics.fmean(xs)
    return max(xs) / mean if mean else float("nan")


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    s = r["shards"]
    fl = r["floor_rt"]
    rate = r["acq"] / args.seconds
    print(f"\n== 3 members x {s} shard(s): {len(r['labels'])} primaries, "
          f"{args.workers} workers, {r['held']} locks held, {args.resources} resources")
    print(f"floor round trip (EVALSHA return 1, one node of each member): {fl * 1e6:.0f} µs")
    print(f"{'shard':<32}{'keys':>8}{'calls':>9}{'cpu ms':>9}{'µs/call (cpu)':>15}"
          f"{'µs/call (script)':>18}")
    for lab, k, c, cpu, us in zip(r["labels"], r["keys"], r["calls"], r["cpu"], r["usec"]):
        per = cpu / c * 1e6 if c else float("nan")
        print(f"{lab:<32}{k:>8}{c:>9}{cpu * 1e3:>9.0f}{per:>15.1f}{us / max(1, c):>18.1f}")
    calls, cpu, usec = sum(r["calls"]), sum(r["cpu"]), sum(r["usec"])
    bal_c = [balance(r["calls"][m * s:(m + 1) * s]) for m in range(MEMBERS)]
    bal_k = [balance(r["keys"][m * s:(m + 1) * s]) for m in range(MEMBERS)]
    print(f"balance, busiest shard / mean of its member: calls {max(bal_c):.3f}, "
          f"keys {max(bal_k):.3f} (target <= 1.2: "
          f"{'PASS' if max(bal_c) <= 1.2 and max(bal_k) <= 1.2 else 'MISS'})")
    per_acq_calls = calls / max(1, r["acq"]) / MEMBERS
    print(f"server CPU per script call: {cpu / max(1, calls) * 1e6:.1f} µs "
          f"(script time alone {usec / max(1, calls):.1f} µs); calls per acquisition per "
          f"member: {per_acq_calls:.2f}")
    client_us = r["cpu_client"] / max(1, r["acq"]) * 1e6
    print(f"aggregate: {rate:,.0f} acquisitions/s (lock + release), p50 "
          f"{pct(r['lat'], 50) * 1e3:.2f} ms = {pct(r['lat'], 50) / fl:.1f} floor RTs, p99 "
          f"{pct(r['lat'], 99) * 1e3:.2f} ms; client CPU {client_us:.0f} µs per acquisition")
    # The capacity model: a shard's core is busy cpu/elapsed; with a core per shard, a
    # member serves `s` shards at once, each at 1 / (cpu per call) calls/s.
    cpu_call = cpu / max(1, calls)
    server_cap = s / (cpu_call * per_acq_calls) if calls else float("nan")
    busiest = max(r["cpu"]) / r["elapsed"]
    print(f"busiest shard's core: {busiest:.0%} busy; with a core per shard the servers "
          f"could take {server_cap:,.0f} acquisitions/s (s / (CPU per call x calls per "
          f"acquisition per member)); clients need "
          f"{r['cpu_client'] / max(1, r['acq']) * 1e6:.0f} µs of CPU per acquisition, so "
          f"{1 / (r['cpu_client'] / max(1, r['acq'])):,.0f}/s per client core")
    premises = []
    premises.append(("every shard got script calls", min(r["calls"]) > 0))
    premises.append(("floor below the fastest acquisition", fl < min(r["lat"] or [0])))
    premises.append(("no fencing token went back (no two EX holders)", r["backwards"] == 0))
    premises.append(("the run started after every worker held its locks", not r["late_start"]))
    for what, ok in premises:
        print(f"premise: {what}: {'yes' if ok else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--resources", type=int, default=100_000)
    ap.add_argument("--held", type=int, default=2_000)
    ap.add_argument("--shards", default="1,3")
    args = ap.parse_args(argv)
    print(f"scale.py: {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} cores, redis-py {redis.__version__}")
    results = [run_config(int(s), args) for s in args.shards.split(",")]
    for r in results:
        report(r, args)
    if len(results) > 1:
        base = results[0]
        cb = sum(base["cpu"]) / max(1, sum(base["calls"]))
        for r in results[1:]:
            cr = sum(r["cpu"]) / max(1, sum(r["calls"]))
            print(f"\nserver CPU per call, {r['shards']} shards / {base['shards']}: "
                  f"{cr / cb:.2f} (target: does not grow, <= 1.10: "
                  f"{'PASS' if cr / cb <= 1.10 else 'MISS'})")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
