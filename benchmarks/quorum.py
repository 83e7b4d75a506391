"""Quorum client benchmark: what the DLM client costs beside the transport floor.

    python benchmarks/quorum.py [--seconds S] [--workers W] [--locks L] [--only 1,2,3]

It starts its own redis-servers on free loopback ports (tests/redis_harness.py), marks them
fresh (E1) and stops them, by their pids, at the end. Every figure is printed beside the
FLOOR measured in the same run: the trivial script (`return 1` by EVALSHA) sent to all N
instances on raw connections, every request written before any reply is read; one floor
round trip = one such round.

  (1) uncontended EX acquire + release on 3 instances, one client (sync DLM, then AsyncDLM):
      pairs/s and p50/p99 latency. Target: pair rate >= 0.6 x floor rate / 2 (an acquire
      and a release are one round trip each).
  (2) W worker PROCESSES contending for one resource in EX: acquisitions/s, handoff time
      (from the holder starting its release to the next grant seen by the next holder,
      time.monotonic_ns of one machine) p50/p99, fairness = fewest / most acquisitions of a
      worker. Targets: handoff p50 <= 3 floor round trips, fairness >= 0.9.
  (3) renewal with L locks held by one client: round trips per renewal tick per instance
      (counted by wrapping DLM._broadcast, and on the servers by INFO commandstats) and the
      time one tick takes. Target: one round trip per instance per tick.

It prints PASS/MISS per target; it does not assert.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis_harness import Instances  # noqa: E402

from redlockdlm import DLM, Mode  # noqa: E402

NAMESPACE = f"qbench-{os.getpid()}"
LEASE_MS = 30_000


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --------------------------------------------------------------------------- floor


class Floor:
    """EVALSHA `return 1` to all instances on raw connections: write all, then read all."""

    def __init__(self, urls: list[str]) -> None:
        self.conns = []
        for u in urls:
            pool = redis.ConnectionPool.from_url(u)
            c = pool.make_connection()
            c.connect()
            self.conns.append(c)
        c0 = redis.Redis.from_url(urls[0])
        self.sha = c0.script_load("return 1")
        c0.close()
        for u in urls[1:]:
            c = redis.Redis.from_url(u)
            c.script_load("return 1")
            c.close()

    def round(self) -> None:
        for c in self.conns:
            c.send_command("EVALSHA", self.sha, 0)
        for c in self.conns:
            c.read_response()

    def close(self) -> None:
        for c in self.conns:
            c.disconnect()


def timed_loop(step, seconds: float) -> list[float]:
    """Run step() for `seconds`; return each call's latency in seconds."""
    lat = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        step()
        lat.append(time.perf_counter() - t0)
    return lat


def interleaved(steps: dict[str, Any], seconds: float, slices: int = 6,
                warmup: float = 0.3) -> dict[str, list[float]]:
    """Measure every step in `slices` interleaved slices (machine load hits all alike)."""
    for step in steps.values():
        timed_loop(step, warmup)
    out: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(slices):
        for k, step in steps.items():
            out[k] += timed_loop(step, seconds / slices)
    return out


# --------------------------------------------------------------------------- (1)


class AioRunner:
    """An event loop in a thread of its own, for AsyncDLM."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return self._asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def figure_uncontended(urls: list[str], seconds: float) -> tuple[float, list[tuple]]:
    floor = Floor(urls)
    d = DLM(urls, NAMESPACE, lease_ms=LEASE_MS)

    def pair() -> None:
        d.lock("uncontended", Mode.EX).release()

    from redlockdlm.aio import AsyncDLM

    runner = AioRunner()
    ad = runner.run(_make_async(AsyncDLM, urls))

    async def apair() -> None:
        lk = await ad.lock("uncontended-aio", Mode.EX)
        await lk.release()

    async def apairs(seconds: float) -> list[float]:
        lat = []
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            await apair()
            lat.append(time.perf_counter() - t0)
        return lat

    # The same two scripts on the floor's raw connections, one thread, no client logic:
    # what the scripts cost, so that (sync - raw) is what the client adds.
    from redlockdlm.engine.scripts import command

    core = d._core

    def raw_pair() -> None:
        lk = core.new_lock("uncontended-raw", Mode.EX)
        for c in floor.conns:
            c.send_command(*command(*core.request_cmd(lk)))
        for c in floor.conns:
            c.read_response()
        lk.mode = Mode.EX
        for c in floor.conns:
            c.send_command(*command(*core.release_cmd(lk)))
        for c in floor.conns:
            c.read_response()
        core.forget(lk)

    before = script_usec(urls)
    res = interleaved({"floor": floor.round, "raw": raw_pair, "sync": pair}, seconds)
    after = script_usec(urls)
    # AsyncDLM: its own loop, in slices between floor slices
    alat: list[float] = []
    afloor: list[float] = []
    runner.run(apairs(0.3))
    for _ in range(6):
        afloor += timed_loop(floor.round, seconds / 12)
        alat += runner.run(apairs(seconds / 6))
    runner.run(ad.close())
    runner.stop()
    d.close()
    floor.close()
    floor_rt = statistics.median(res["floor"] + afloor)
    rows = [("floor round (all instances)", res["floor"] + afloor, 1.0),
            ("raw scripts req+rel, no client", res["raw"], 2.0),
            ("sync DLM acquire+release", res["sync"], 2.0),
            ("AsyncDLM acquire+release", alat, 2.0)]
    calls = [a[0] - b[0] for a, b in zip(after, before)]
    usec = [a[1] - b[1] for a, b in zip(after, before)]
    per_call = sum(usec) / max(1, sum(calls))
    return floor_rt, rows, per_call


async def _make_async(cls, urls: list[str]):
    d = cls(urls, NAMESPACE, lease_ms=LEASE_MS)
    await d.__aenter__()
    return d


# --------------------------------------------------------------------------- (2)


def contender(urls: list[str], ns: str, seconds: float, start_at: float, k: int, q) -> None:
    """Worker process: lock/release one resource of namespace `ns` (the parent's: a spawned
    worker evaluates NAMESPACE again, with its own pid) in a loop; report (queued,
    grant_ns, release_ns) of every acquisition (queued: not granted by its first round)."""
    out = []
    with DLM(urls, ns, lease_ms=LEASE_MS) as d:
        # The arrival of each grant event (the breakdown of a handoff): wrapped, not changed
        events: list[tuple[int, str]] = []
        on_event = d._on_event

        def record(i: int, ev: Any) -> None:
            if ev.kind == "G":
                events.append((time.monotonic_ns(), ev.lock_id))
            on_event(i, ev)

        d._on_event = record
        d.lock(f"warm-{k}", Mode.EX).release()  # connections and scripts warm
        while time.time() < start_at:
            time.sleep(0.0005)
        end = time.monotonic() + seconds
        cpu = time.process_time()  # (this process, all its threads: the loop only)
        while time.monotonic() < end:
            events.clear()
            req = d.enqueue("contended", Mode.EX, timeout=30)
            queued = not req.done  # not granted by its first round: it waited for a holder
            lk = req.wait()
            g = time.monotonic_ns()
            mine = sorted(t for t, lock_id in events if lock_id == lk.id)
            r = time.monotonic_ns()
            lk.release()
            out.append((queued, g, r, time.monotonic_ns(), mine))
        cpu = time.process_time() - cpu
    q.put((k, out, cpu))


def figure_contended(urls: list[str], workers: int, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 2.0 + 0.3 * workers
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [ctx.Process(target=contender, args=(urls, NAMESPACE, seconds, start_at, k, q),
                         daemon=True) for k in range(workers)]
    for p in procs:
        p.start()
    results = {}
    loop_cpu = 0.0
    for _ in procs:
        k, out, cpu = q.get(timeout=seconds + 60)
        results[k] = out
        loop_cpu += cpu
    for p in procs:
        p.join(10)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    # (grant, release, worker, queued, release returned, grant events), in grant order (one
    # machine's monotonic clock)
    sections = sorted((g, r, k, w, rd, ev) for k, out in results.items()
                      for w, g, r, rd, ev in out)
    pairs = list(zip(sections, sections[1:]))
    handoffs = [(b[0] - a[1]) / 1e9 for a, b in pairs if b[2] != a[2]]
    # A handoff's parts: the release reaching the instances and the first grant event
    # reaching the waiter; the quorum's last event; the waiter's thread returning from
    # wait(); and the holder's release call. (Only handoffs the events decided.)
    q_ = (len(urls) // 2) + 1
    parts: dict[str, list[float]] = {"release -> first grant event": [],
                                     "first -> quorum's grant event": [],
                                     "quorum's event -> wait() returns": [],
                                     "the holder's release call": []}
    for a, b in pairs:
        ev = b[5]
        if b[2] == a[2] or not b[3] or len(ev) < q_ or ev[q_ - 1] > b[0]:
            continue
        parts["release -> first grant event"].append((ev[0] - a[1]) / 1e9)
        parts["first -> quorum's grant event"].append((ev[q_ - 1] - ev[0]) / 1e9)
        parts["quorum's event -> wait() returns"].append((b[0] - ev[q_ - 1]) / 1e9)
        parts["the holder's release call"].append((a[4] - a[1]) / 1e9)
    counts = [len(results[k]) for k in range(workers)]
    span = (sections[-1][1] - sections[0][0]) / 1e9 if sections else float("nan")
    # The premise: workers contend. A request not granted by its first round waited in
    # the queue behind another holder (workers locking different resources never wait);
    # and no two holds overlap.
    waited = sum(1 for s in sections if s[3])
    overlaps = sum(1 for a, b in pairs if b[0] < a[1])
    return {"acq": len(sections), "rate": len(sections) / span, "handoffs": handoffs,
            "counts": counts, "waited": waited, "overlaps": overlaps, "parts": parts,
            "cpu_per_acq": worker_cpu / max(1, len(sections)),
            "loop_cpu_per_acq": loop_cpu / max(1, len(sections)),
            "same_worker_again": sum(1 for a, b in pairs if b[2] == a[2])}


# --------------------------------------------------------------------------- (3)


def script_usec(urls: list[str]) -> list[tuple[int, int, int]]:
    """(calls, usec) of FCALL (the DLM's scripts) on each server so far, and the events
    they published (PUBLISH, counted by commandstats inside scripts too)."""
    out = []
    for u in urls:
        c = redis.Redis.from_url(u)
        stats = c.info("commandstats")
        st = stats.get("cmdstat_fcall", {})
        pub = stats.get("cmdstat_publish", {})
        out.append((int(st.get("calls", 0)), int(st.get("usec", 0)), int(pub.get("calls", 0))))
        c.close()
    return out


def figure_renewal(urls: list[str], locks: int) -> dict[str, Any]:
    lease = 6000  # a tick every 2 s
    d = DLM(urls, NAMESPACE, lease_ms=lease)
    t0 = time.perf_counter()
    lost: list = []
    reqs = [d.enqueue(f"held:{i}", Mode.PR, on_lost=lost.append) for i in range(locks)]
    held = [r.wait(30) for r in reqs]
    acquire_s = time.perf_counter() - t0
    ticks: list[dict[str, Any]] = []
    orig = d._pipeline
    reads: list[float] = []  # every reply read during the watch: how long it was waited for

    def counting(i, calls):
        calls = list(calls)
        if not (calls and all(c.name == "renew" for c in calls)):
            return orig(i, calls)
        calls0 = script_usec(urls)  # INFO only: FCALLs seen by the servers during the tick
        writes.n = 0
        t = time.perf_counter()
        res = orig(i, calls)  # one write of all the calls, then their replies
        took = time.perf_counter() - t
        calls1 = script_usec(urls)
        ticks.append({"per_instance": {i: writes.n}, "calls": len(calls), "seconds": took,
                      "keys": sum(len(c[1]) - 2 for c in calls),
                      "server_calls": [b[0] - a[0] for a, b in zip(calls0, calls1)],
                      "server_ms": [(b[1] - a[1]) / 1000 for a, b in zip(calls0, calls1)]})
        return res

    writes = threading.local()  # round trips (pipelined writes) of this thread's tick
    write = d._write

    def counting_writes(conn, chunks):
        writes.n = getattr(writes, "n", 0) + 1
        return write(conn, chunks)

    def timed(conn):
        if getattr(conn, "_bench_timed", False):
            return conn
        read = conn.read_response

        def read_response(*a, **k):
            t = time.perf_counter()
            try:
                return read(*a, **k)
            finally:
                reads.append(time.perf_counter() - t)

        conn.read_response = read_response
        conn._bench_timed = True
        return conn

    for inst in d._instances:
        inst.get = (lambda g: lambda: timed(g()))(inst.get)
    d._pipeline = counting  # type: ignore[method-assign]
    d._write = counting_writes  # type: ignore[method-assign]
    t_watch = time.perf_counter()
    deadline = time.monotonic() + 2 * lease / 3000 + 0.5  # two or three ticks
    while time.monotonic() < deadline:
        time.sleep(0.05)
    watch_s = time.perf_counter() - t_watch
    from collections import Counter

    votes = Counter(v.vote.value for lk in held for v in lk._core.votes)
    still_valid = sum(1 for lk in held if lk.valid)
    d._pipeline = orig  # type: ignore[method-assign]
    longest_read = max(reads, default=0.0)
    t1 = time.perf_counter()
    d.close()
    close_s = time.perf_counter() - t1
    return {"ticks": ticks, "votes": dict(votes), "lost": len(lost),
            "watch_s": watch_s, "acquire_s": acquire_s, "valid": still_valid,
            "close_s": close_s, "longest_read": longest_read}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per figure")
    ap.add_argument("--workers", type=int, default=8, help="contending processes (2)")
    ap.add_argument("--locks", type=int, default=10_000, help="locks held in (3)")
    ap.add_argument("--instances", type=int, default=3, help="N (odd)")
    ap.add_argument("--only", default="1,2,3",
                    help="the figures to measure, e.g. 1 or 1,3 (default: all)")
    args = ap.parse_args(argv)
    only = {f.strip() for f in args.only.split(",")}
    if not only <= {"1", "2", "3"}:
        ap.error(f"--only takes figure numbers 1, 2, 3, not {args.only!r}")

    with Instances(args.instances) as inst:
        inst.init_fresh(NAMESPACE)  # our own brand-new servers (E1)
        urls = inst.urls
        info = inst[0].client().info("server")
        print(f"{args.instances} x redis-server {info['redis_version']} on loopback "
              f"(started by this script); python {platform.python_version()}, redis-py "
              f"{redis.__version__}, hiredis: "
              f"{'yes' if redis.utils.HIREDIS_AVAILABLE else 'NO'}; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}")
        print()

        # (1): also the floor round trip the other figures are given in
        floor_rt, rows, per_call = figure_uncontended(
            urls, args.seconds if "1" in only else 0.3)
        floor_rate = 1 / floor_rt
        if "1" in only:
            _print_uncontended(floor_rt, floor_rate, rows, per_call)
        if "2" in only:
            _print_contended(urls, args, floor_rt)
        if "3" in only:
            _print_renewal(urls, args, floor_rt)
    return 0


def _print_uncontended(floor_rt: float, floor_rate: float, rows: list[tuple],
                       per_call: float) -> None:
    print("(1) uncontended EX acquire + release, one client")
    head = f"    {'figure':<28} {'ops/s':>9} {'p50 µs':>9} {'p99 µs':>9} {'floor RTs':>9}"
    print(head)
    for name, lat, _ in rows:
        p50 = statistics.median(lat)
        print(f"    {name:<28} {1 / statistics.mean(lat):>9,.0f} {p50 * 1e6:>9.1f} "
              f"{pct(lat, 99) * 1e6:>9.1f} {p50 / floor_rt:>9.2f}")
    print(f"    server time per DLM script call (INFO commandstats fcall): "
          f"{per_call:.1f} µs; a floor round is {floor_rt * 1e6:.1f} µs")
    for name, lat, _ in rows[2:]:
        rate = 1 / statistics.mean(lat)
        want = 0.6 * floor_rate / 2
        print(f"    target {name}: pair rate >= 0.6 x floor rate / 2 = {want:,.0f}/s: "
              f"{rate:,.0f}/s ({rate / (floor_rate / 2):.2f} x) -> {verdict(rate >= want)}")
    print()


def _print_contended(urls: list[str], args: argparse.Namespace, floor_rt: float) -> None:
    before = script_usec(urls)
    c = figure_contended(urls, args.workers, args.seconds)
    after = script_usec(urls)
    h = c["handoffs"]
    fair = min(c["counts"]) / max(c["counts"]) if max(c["counts"]) else 0.0
    print(f"(2) {args.workers} worker processes contending for one EX lock "
          f"({args.seconds:g} s)")
    print(f"    acquisitions: {c['acq']} ({c['rate']:,.0f}/s); per worker {c['counts']}")
    print(f"    worker CPU per acquisition (all {args.workers} processes, start-up included): "
          f"{c['cpu_per_acq'] * 1e6:,.0f} µs; in the measured loops only: "
          f"{c['loop_cpu_per_acq'] * 1e6:,.0f} µs")
    share = c["waited"] / max(1, c["acq"] - 1)
    premise = share >= 0.5 and not c["overlaps"]
    print(f"    premise: {c['waited']} of {c['acq']} grants ({share:.0%}) waited in the queue "
          f"for another holder (not granted by their first round); overlapping holds: "
          f"{c['overlaps']} -> "
          f"{'contended' if premise else 'NOT CONTENDED: the figures below mean nothing'}")
    print(f"    handoff (release start -> next grant, {len(h)} handoffs): "
          f"p50 {statistics.median(h) * 1e6:,.0f} µs = "
          f"{statistics.median(h) / floor_rt:.2f} floor RTs, p99 "
          f"{pct(h, 99) * 1e6:,.0f} µs = {pct(h, 99) / floor_rt:.2f} floor RTs")
    print(f"    same worker twice in a row: {c['same_worker_again']}")
    n_parts = len(next(iter(c["parts"].values())))
    print(f"    breakdown of the handoffs the grant events decided ({n_parts}), p50:")
    for name, xs in c["parts"].items():
        if xs:
            m = statistics.median(xs)
            print(f"      {name:<34} {m * 1e6:>7,.0f} µs = {m / floor_rt:5.2f} floor RTs")
    calls = sum(a[0] - b[0] for a, b in zip(after, before))
    usec = sum(a[1] - b[1] for a, b in zip(after, before))
    print(f"      server time per script call meanwhile (commandstats): "
          f"{usec / max(1, calls):.1f} µs ({calls:,} calls on {len(urls)} instances)")
    pubs = sum(a[2] - b[2] for a, b in zip(after, before))
    print(f"      events published per acquisition (all instances): "
          f"{pubs / max(1, c['acq']):.2f} ({pubs:,})")
    print(f"    target handoff p50 <= 3 floor RTs ({3 * floor_rt * 1e6:.0f} µs): "
          f"{verdict(statistics.median(h) <= 3 * floor_rt)}")
    print(f"    target fairness (fewest/most) >= 0.9: {fair:.2f} -> {verdict(fair >= 0.9)}")
    print()


def _print_renewal(urls: list[str], args: argparse.Namespace, floor_rt: float) -> None:
    r = figure_renewal(urls, args.locks)
    ticks = r["ticks"]
    print(f"(3) renewal with {args.locks:,} locks held by one client "
          f"(acquired in {r['acquire_s']:.1f} s)")
    rts = [max(t["per_instance"].values()) for t in ticks]
    for k, t in enumerate(ticks):
        print(f"    tick {k + 1}: round trips per instance {t['per_instance']}, "
              f"{t['calls']} renew calls in it "
              f"(FCALLs the servers ran meanwhile: {t['server_calls']}), "
              f"{t['keys']:,} (lock, instance) entries, {t['seconds'] * 1e3:,.1f} ms = "
              f"{t['seconds'] / floor_rt:,.0f} floor RTs (server time "
              f"{[round(m) for m in t['server_ms']]} ms)")
    print(f"    watched {r['watch_s']:.1f} s; acquisition rate "
          f"{args.locks / r['acquire_s']:,.0f} locks/s; votes after: {r['votes']}")
    print(f"    locks still valid after the ticks: {r['valid']:,} of {args.locks:,} "
          f"({r['lost']} reported lost, no fault injected); close() released them in "
          f"{r['close_s']:.1f} s")
    longest = max((t["seconds"] for t in ticks), default=0.0)
    print(f"    longest tick {longest * 1e3:,.0f} ms; longest wait for one reply "
          f"{r['longest_read'] * 1e3:,.0f} ms: a read slower than the client's "
          f"socket_timeout (1000 ms by default) fails on the client side: "
          f"{'RISK' if r['longest_read'] >= 1.0 else 'ok'}")
    # The criterion is what the client sent per tick (the wrapper's count); the servers'
    # FCALL counts also include any other call that ran during the tick.
    ok = bool(ticks) and all(x == 1 for x in rts)
    print(f"    target one round trip per instance per tick: {verdict(ok)}")


if __name__ == "__main__":
    sys.exit(main())
