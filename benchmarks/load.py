"""Load and soak figures for redlockdlm on three local instances (prints; never asserts).

    python benchmarks/load.py                       # 1,000 sessions, 100,000 resources
    python benchmarks/load.py --sessions 100 --resources 10000 --seconds 5   # quicker
    python benchmarks/load.py --soak 600            # 10-minute soak with faults

Figures:
  * memory per held lock: 100,000 locks held at once (one per resource), Redis
    `used_memory` before and after, per instance; target < 500 bytes per lock per instance;
  * throughput and latency: `--sessions` asyncio clients (AsyncDLM, one owner each) lock and
    release random resources among `--resources` for `--seconds`; ops/s, p50/p99/max;
    beside the floor measured in the same run (a trivial script sent to all three instances,
    every request written before any reply is read);
  * soak (`--soak S`): a low-rate workload for S seconds while one instance at a time is
    paused (SIGSTOP) for 1 s every 20 s; errors other than timeouts, and used_memory sampled
    every 10 s (flat means no leak).
Instances are started on free 127.0.0.1 ports and stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from redis_harness import Instances  # noqa: E402

from redlockdlm import AsyncDLM, Mode  # noqa: E402
from redlockdlm.errors import DLMError, LockTimeout  # noqa: E402

NS = "load"
#: One process plays every session here, so its event loop is far busier than a real
#: client's: the default 1 s timeouts would measure the benchmark's own loop, not Redis.
TIMEOUTS = {"socket_timeout": 5.0, "connect_timeout": 5.0}


def floor_rtt(servers, n: int = 2000) -> float:
    conns = [redis.Connection(host="127.0.0.1", port=s.port) for s in servers]
    sha = None
    for s in servers:
        sha = s.client().script_load("return 1")
    for _ in range(200):
        for c in conns:
            c.send_command("EVALSHA", sha, 0)
        for c in conns:
            c.read_response()
    t0 = time.perf_counter()
    for _ in range(n):
        for c in conns:
            c.send_command("EVALSHA", sha, 0)
        for c in conns:
            c.read_response()
    dt = (time.perf_counter() - t0) / n
    for c in conns:
        c.disconnect()
    return dt


def used_memory(servers, field: str = "used_memory") -> list[int | None]:
    """Per instance; None for one that does not answer (paused by the soak's faults)."""
    out: list[int | None] = []
    for s in servers:
        try:
            out.append(s.client(socket_timeout=2.0).info("memory")[field])
        except redis.RedisError:
            out.append(None)
    return out


async def memory_per_lock(urls, servers, resources: int, sessions: int) -> None:
    clients = [AsyncDLM(urls, NS, lease_ms=60_000, **TIMEOUTS) for _ in range(sessions)]
    await connect_all(clients)  # before measuring, so client buffers are not counted
    await asyncio.sleep(0.5)
    before = used_memory(servers)
    before_ds = used_memory(servers, "used_memory_dataset")
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(64)

    async def take(i: int) -> None:
        async with sem:
            await clients[i % sessions].lock(f"mem/{i}", Mode.EX, timeout=60)

    await asyncio.gather(*(take(i) for i in range(resources)))
    took = time.perf_counter() - t0
    after = used_memory(servers)
    after_ds = used_memory(servers, "used_memory_dataset")
    per_all = [(a - b) / resources for a, b in zip(after, before)]
    per = [(a - b) / resources for a, b in zip(after_ds, before_ds)]
    print(f"\nmemory: {resources:,} locks held by {sessions} sessions "
          f"(acquired in {took:.1f} s, {resources / took:,.0f} locks/s)")
    for i, (p, q) in enumerate(zip(per, per_all)):
        print(f"  instance {i + 1}: {p:7.1f} bytes of data per held lock "
              f"({q:.1f} with the connections' buffers, which do not grow with locks)")
    worst = max(per)
    print(f"  target < 500 bytes per lock per instance: {worst:.1f} -> "
          f"{'PASS' if worst < 500 else 'MISS'}")
    t0 = time.perf_counter()
    await asyncio.gather(*(c.close() for c in clients))
    print(f"  released all in {time.perf_counter() - t0:.1f} s")


async def connect_all(clients: list[AsyncDLM], at_once: int = 50) -> float:
    """Open every session's connections (one lock + release each), `at_once` sessions at
    a time; returns the seconds it took. Started all at once, 1,000 sessions open 6,000
    connections in one event loop, and their handshakes starve each other past any
    connect timeout: a real fleet does not start in one loop in one instant."""
    sem = asyncio.Semaphore(at_once)
    t0 = time.perf_counter()

    async def one(c: AsyncDLM) -> None:
        async with sem:
            lk = await c.lock("load/warm-up", Mode.PR, timeout=120)
            await lk.release()

    await asyncio.gather(*(one(c) for c in clients))
    return time.perf_counter() - t0


async def throughput(urls, sessions: int, resources: int, seconds: float,
                     floor: float) -> None:
    clients = [AsyncDLM(urls, NS, lease_ms=10_000, **TIMEOUTS) for _ in range(sessions)]
    connected = await connect_all(clients)
    lat: list[float] = []
    errors: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def session(c: AsyncDLM, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            name = f"res/{rng.randrange(resources)}"
            mode = Mode.EX if rng.random() < 0.5 else Mode.PR
            t0 = time.perf_counter()
            try:
                lk = await c.lock(name, mode, timeout=5)
                await lk.release()
                lat.append(time.perf_counter() - t0)
            except LockTimeout:
                errors["timeout"] = errors.get("timeout", 0) + 1
            except DLMError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    cpu0, srv0 = process_cpu(), server_cpu(urls)
    t0 = time.perf_counter()
    await asyncio.gather(*(session(c, i) for i, c in enumerate(clients)))
    took = time.perf_counter() - t0
    cpu, srv = process_cpu() - cpu0, [b - a for a, b in zip(srv0, server_cpu(urls))]
    await asyncio.gather(*(c.close() for c in clients))
    lat.sort()
    if not lat:
        print(f"\nthroughput: {sessions} sessions: no pair completed; errors: {errors}")
        return
    q = statistics.quantiles(lat, n=100) if len(lat) > 100 else [0.0] * 99
    print(f"\nthroughput: {sessions} sessions over {resources:,} resources, {took:.1f} s "
          f"(sessions connected beforehand, 50 at a time, in {connected:.1f} s)")
    print(f"  {len(lat) / took:10,.0f} lock+release pairs/s   "
          f"p50 {q[49] * 1e3:.2f} ms  p99 {q[98] * 1e3:.2f} ms  max {lat[-1] * 1e3:.1f} ms")
    print(f"  floor (trivial script to all 3 instances, one client): {floor * 1e6:.0f} µs "
          f"-> p50 pair = {q[49] / floor:.1f} floor round trips")
    print(f"  CPU: this process (every session, one event loop) {cpu / took:.0%} of a core, "
          f"{cpu / max(1, len(lat)) * 1e6:,.0f} µs per pair; Redis instances "
          + ", ".join(f"{c / took:.0%}" for c in srv)
          + f" ({sum(srv) / max(1, len(lat)) * 1e6:,.0f} µs per pair in all)")
    print(f"  errors: {errors or 'none'}")


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def server_cpu(urls: list[str]) -> list[float]:
    out = []
    for u in urls:
        c = redis.Redis.from_url(u)
        info = c.info("cpu")
        c.close()
        out.append(info["used_cpu_user"] + info["used_cpu_sys"])
    return out


async def soak(urls, servers, seconds: float, sessions: int = 20) -> None:
    clients = [AsyncDLM(urls, NS, lease_ms=3_000) for _ in range(sessions)]
    errors: dict[str, int] = {}
    ops = [0]
    end = time.monotonic() + seconds
    samples: list[tuple[float, list[int]]] = []

    async def session(c: AsyncDLM, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            try:
                async with await c.lock(f"soak/{rng.randrange(50)}", Mode.EX, timeout=10) as lk:
                    if lk.mode is Mode.EX:
                        lk.value = str(ops[0]).encode()
                ops[0] += 1
            except LockTimeout:
                errors["timeout"] = errors.get("timeout", 0) + 1
            except DLMError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(rng.random() * 0.05)

    async def faults() -> None:
        k = 0
        while time.monotonic() < end - 2:
            await asyncio.sleep(20)
            s = servers[k % len(servers)]
            s.pause()
            await asyncio.sleep(1)
            s.resume()
            k += 1

    async def sampler() -> None:
        t0 = time.monotonic()
        while time.monotonic() < end:
            mem = await asyncio.to_thread(used_memory, servers)
            if None not in mem:  # skip a sample taken while an instance is paused
                samples.append((time.monotonic() - t0, mem))
            await asyncio.sleep(10)

    await asyncio.gather(*(session(c, i) for i, c in enumerate(clients)), faults(), sampler())
    await asyncio.gather(*(c.close() for c in clients))
    print(f"\nsoak: {seconds:.0f} s, {sessions} sessions, {ops[0]:,} critical sections, "
          f"one instance paused 1 s every 20 s")
    print(f"  errors: {errors or 'none'} (timeouts while an instance is paused are expected)")
    print("  used_memory per instance (bytes):")
    for t, mem in samples:
        print(f"    t={t:5.0f} s  " + "  ".join(f"{m:>10,}" for m in mem))
    if len(samples) >= 3:
        first, last = samples[1][1], samples[-1][1]
        growth = max(b - a for a, b in zip(first, last))
        print(f"  growth after warm-up: {growth:,} bytes -> "
              f"{'flat' if growth < 1_000_000 else 'GROWING'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--resources", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--soak", type=float, default=0.0, metavar="SECONDS")
    args = ap.parse_args()
    with Instances(3, extra_args=["--maxclients", "20000"]) as inst:
        inst.init_fresh(NS)
        print(f"redis-server x3 on {', '.join(inst.urls)}; python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cores")
        floor = floor_rtt(inst.servers)
        if args.soak:
            asyncio.run(soak(inst.urls, inst.servers, args.soak))
            return
        asyncio.run(memory_per_lock(inst.urls, inst.servers, args.resources,
                                    max(1, min(args.sessions, 100))))
        asyncio.run(throughput(inst.urls, args.sessions, args.resources, args.seconds, floor))


if __name__ == "__main__":
    main()
