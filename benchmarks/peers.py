"""redlockdlm beside the Python Redlock libraries, in one run, on the same servers.

    pip install -e '.[bench]'      # redlock-py 1.0.8, aioredlock 0.7.3, pottery 3.0.1
    python benchmarks/peers.py [--seconds S] [--workers W] [--instances N] [--only 1,2] [--whatif]

It starts its own N redis-servers on free loopback ports (tests/redis_harness.py), marks
them fresh for redlockdlm (E1) and stops them, by their pids, at the end. A library that is
not installed is left out (and said so). Every figure is printed beside the FLOOR measured in
the same run: `EVALSHA "return 1"` written to all N instances on raw connections before any
reply is read (one floor round trip).

  (1) uncontended acquire + release of one exclusive lock, one client: pairs/s, p50/p99, and
      floor round trips per pair. The libraries are measured in interleaved slices, so
      machine load hits all alike.
  (2) W worker PROCESSES contending for one resource, each library in turn (and again with a
      1 ms retry delay for those that poll): acquisitions/s, fairness (fewest / most
      acquisitions of a worker), the longest wait (from asking to holding), the handoff
      (release start -> the next grant seen by another worker, p50 in floor round trips).
      Premise, printed per row: the workers contend (the share of acquisitions that did not
      succeed at their first attempt) and no two holds overlap (mutual exclusion as one
      machine's monotonic clock sees it).

  --whatif adds to (1) our sync client against our library with its request and release
      scripts replaced by a peer's (SET PX; GET, compare, DEL), on the same servers: whether
      the server's cost of our scripts explains the gap (premise checked: every call ran
      the replaced code; the real library is put back).

It prints the figures and the ratios to the best peer row; it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from quorum import AioRunner, Floor, pct, timed_loop  # noqa: E402
from redis_harness import Instances  # noqa: E402

from redlockdlm import DLM, Mode  # noqa: E402
from redlockdlm.engine.instance import Engine  # noqa: E402

LEASE_S = 30
#: the peers, by import name: (the package to install, what it is)
PEERS = {"redlock": "redlock-py 1.0.8", "pottery": "pottery 3.0.1",
         "aioredlock": "aioredlock 0.7.3"}


def have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def hostports(urls: list[str]) -> list[tuple[str, int]]:
    out = []
    for u in urls:
        rest = u.split("://", 1)[1].split("/", 1)[0]
        host, port = rest.rsplit(":", 1)
        out.append((host, int(port)))
    return out


# --------------------------------------------------------------------------- lockers

class Locker:
    """One library behind one interface: `acquire(name)` blocks until held and returns
    (handle, attempts); `release(handle)`. `fast`: a 1 ms retry delay instead of the
    library's own."""

    def __init__(self, lib: str, urls: list[str], ns: str, fast: bool = False) -> None:
        self.lib, self.urls, self.ns, self.fast = lib, urls, ns, fast
        self.loop: AioRunner | None = None
        if lib == "redlockdlm":
            self.d = DLM(urls, ns, lease_ms=LEASE_S * 1000)
        elif lib == "redlockdlm-async":
            from redlockdlm.aio import AsyncDLM

            self.loop = AioRunner()

            async def make() -> Any:
                d = AsyncDLM(urls, ns, lease_ms=LEASE_S * 1000)
                await d.__aenter__()
                return d

            self.d = self.loop.run(make())
        elif lib == "redlock":
            import redlock

            conns = [{"host": h, "port": p, "db": 0} for h, p in hostports(urls)]
            self.d = redlock.Redlock(conns, retry_delay=0.001 if fast else None)
        elif lib == "pottery":
            import pottery

            self.masters = {redis.Redis.from_url(u) for u in urls}
            self.cls = type("FastRedlock", (pottery.Redlock,), {"_RETRY_DELAY": 0.001}) \
                if fast else pottery.Redlock
        elif lib == "aioredlock":
            from aioredlock import Aioredlock

            self.loop = AioRunner()
            kw = dict(retry_delay_min=0.0005, retry_delay_max=0.0015) if fast else {}

            async def make() -> Any:
                return Aioredlock([{"host": h, "port": p} for h, p in hostports(urls)],
                                  **kw)

            self.d = self.loop.run(make())
        else:
            raise ValueError(lib)

    def acquire(self, name: str) -> tuple[Any, int]:
        lib = self.lib
        if lib == "redlockdlm":
            req = self.d.enqueue(name, Mode.EX, timeout=60)
            queued = not req.done  # not granted by its first round: it waited in the queue
            return req.wait(), 1 + queued
        if lib == "redlockdlm-async":
            async def go() -> Any:
                return await self.d.lock(name, Mode.EX, timeout=60)
            return self.loop.run(go()), 1
        attempts = 0
        if lib == "redlock":
            while True:  # (as shipped: 3 tries 0.2 s apart, then False; we ask again)
                attempts += 1
                lk = self.d.lock(name, LEASE_S * 1000)
                if lk:
                    return lk, attempts
        if lib == "pottery":
            lk = self.cls(key=name, masters=self.masters, auto_release_time=LEASE_S)
            while not lk.acquire(blocking=False):  # (the loop `acquire()` runs, counted)
                attempts += 1
                time.sleep(random.uniform(0, lk._RETRY_DELAY))
            return lk, attempts + 1
        if lib == "aioredlock":
            from aioredlock import LockError

            async def go() -> Any:
                n = 0
                while True:
                    n += 1
                    try:
                        return await self.d.lock(name, lock_timeout=LEASE_S), n
                    except LockError:
                        continue  # (as shipped: 3 tries 0.1-0.3 s apart; we ask again)
            return self.loop.run(go())
        raise ValueError(lib)

    def release(self, lk: Any) -> None:
        lib = self.lib
        if lib == "redlockdlm":
            lk.release()
        elif lib == "redlockdlm-async":
            self.loop.run(lk.release())
        elif lib == "redlock":
            self.d.unlock(lk)
        elif lib == "pottery":
            lk.release()
        elif lib == "aioredlock":
            self.loop.run(self.d.unlock(lk))

    def pair(self, name: str) -> None:
        self.release(self.acquire(name)[0])

    async def apair(self, name: str) -> None:
        """An asyncio library's acquire + release, awaited in its own loop."""
        if self.lib == "redlockdlm-async":
            lk = await self.d.lock(name, Mode.EX, timeout=60)
            await lk.release()
        elif self.lib == "aioredlock":
            lk = await self.d.lock(name, lock_timeout=LEASE_S)
            await self.d.unlock(lk)
        else:
            raise ValueError(self.lib)

    def close(self) -> None:
        if self.lib == "redlockdlm":
            self.d.close()
        elif self.lib == "redlockdlm-async":
            self.loop.run(self.d.close())
        elif self.lib == "aioredlock":
            self.loop.run(self.d.destroy())
        if self.loop is not None:
            self.loop.stop()


def libraries() -> list[str]:
    return ["redlockdlm", "redlockdlm-async"] + [m for m in PEERS if have(m)]


# --------------------------------------------------------------------------- (1)

def figure_uncontended(urls: list[str], ns: str, seconds: float,
                       whatif: WhatIf | None = None) -> tuple[float, dict]:
    """Pairs of every library in interleaved slices. An asyncio library's pairs run in a
    loop inside its event loop (a slice is one `run`), as an application's would: a hop
    from this thread into the loop per call would cost it two thread switches a pair."""
    floor = Floor(urls)
    lockers = {lib: Locker(lib, urls, ns) for lib in libraries()}
    slices, warm = 6, 0.3
    res: dict[str, list[float]] = {"floor": [], **{lib: [] for lib in lockers}}

    def measure(lib: str, lk: Locker, span: float) -> list[float]:
        name = f"uncontended-{lib}"
        if lk.loop is None:
            return timed_loop(lambda: lk.pair(name), span)

        async def pairs() -> list[float]:
            lat = []
            end = time.perf_counter() + span
            while (t0 := time.perf_counter()) < end:
                await lk.apair(name)
                lat.append(time.perf_counter() - t0)
            return lat
        return lk.loop.run(pairs())

    for lib, lk in lockers.items():
        measure(lib, lk, warm)
    if whatif is not None:
        res["redlockdlm, what-if"] = []
    for _ in range(slices):
        res["floor"] += timed_loop(floor.round, seconds / slices)
        for lib, lk in lockers.items():
            res[lib] += measure(lib, lk, seconds / slices)
        if whatif is not None:
            res["redlockdlm, what-if"] += whatif.measure(seconds / slices)
    for lk in lockers.values():
        lk.close()
    if whatif is not None:
        whatif.close()
    floor.close()
    return statistics.median(res.pop("floor")), res


# ------------------------------------------------------------------- (1) what-if

#: a marker in the what-if library's source (FUNCTION LIST tells it is loaded)
WHATIF_MARK = b"-- peers.py what-if: request and release as cheap as a Redlock peer"


def whatif_source(epoch: str) -> bytes:
    """Our library with `request` and `release` replaced by scripts as cheap as a Redlock
    peer's (SET PX; GET, compare, DEL), answering the short lock replies of a grant and a
    release with this instance's `epoch`; every other function is the real one."""
    from redlockdlm.engine.scripts import library

    lib = library()
    src = lib.source
    fns = {n: lib.functions[n].decode() for n in ("request", "release")}
    for n, body in (
            ("request", "local r = whatif_r or the_globals() whatif_r = r "
                        "r.call('SET', keys[3], args[4], 'PX', args[8]) "
                        "return {0, EPOCH, args[5] + 0, 1}"),
            ("release", "local r = whatif_r or the_globals() whatif_r = r "
                        "if r.call('GET', keys[3]) == args[4] then "
                        "r.call('DEL', keys[3]) end return {7, EPOCH, 1}")):
        real = (f"register('{fns[n]}', function(keys, args) "
                f"return call(script_{n}, keys, args) end)\n").encode()
        if real not in src:
            raise RuntimeError(f"the library registers {n} otherwise: update whatif_source")
        src = src.replace(real, (f"register('{fns[n]}', function(keys, args) "
                                 f"{body.replace('EPOCH', repr(epoch))} end)\n").encode())
    # (`redis` is a local of core.lua bound by the first real call: the what-if code
    # binds its own once, `the_globals()` returning the global `redis` first)
    head = b"local KEYS, ARGV\n"
    if head not in src:
        raise RuntimeError("the library's header changed: update whatif_source")
    src = src.replace(head, head + b"local whatif_r\n", 1)
    return src + WHATIF_MARK + b"\n"


class WhatIf:
    """Our sync client's pairs against the what-if library (`whatif_source`) on every
    instance, in slices interleaved with the others': what redlockdlm's client would do if
    our scripts cost what a peer's do. Premise, checked after each slice: every request and
    release ran the what-if code (FCALLs counted on each instance, the marker loaded).
    The real library is put back after each slice."""

    def __init__(self, inst: Any, urls: list[str], ns: str) -> None:
        from redlockdlm.engine.scripts import library

        self.clients = [s.client() for s in inst]
        self.real = library().source
        self.sources = [whatif_source(Engine(c, ns).status().epoch or "")
                        for c in self.clients]
        self.lk = Locker("redlockdlm", urls, ns)

    def measure(self, span: float) -> list[float]:
        for c, src in zip(self.clients, self.sources):
            c.execute_command("FUNCTION", "LOAD", "REPLACE", src)
        try:
            timed_loop(lambda: self.lk.pair("whatif"), min(0.05, span))
            for c in self.clients:
                c.config_resetstat()
            lat = timed_loop(lambda: self.lk.pair("whatif"), span)
            for c in self.clients:
                calls = c.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)
                code = c.execute_command("FUNCTION", "LIST", "WITHCODE")
                if calls != 2 * len(lat) or WHATIF_MARK not in repr(code).encode():
                    raise RuntimeError(f"what-if premise failed: {calls} FCALLs for "
                                       f"{len(lat)} pairs, or the library was replaced")
        finally:
            for c in self.clients:
                c.execute_command("FUNCTION", "LOAD", "REPLACE", self.real)
        return lat

    def close(self) -> None:
        self.lk.close()


# --------------------------------------------------------------------------- (2)

def contender(lib: str, fast: bool, urls: list[str], ns: str, seconds: float,
              start_at: float, k: int, q: Any) -> None:
    """Worker process: acquire and release one resource in a loop; report (attempts,
    asked_ns, grant_ns, release_ns) per acquisition."""
    out = []
    locker = Locker(lib, urls, ns, fast)
    try:
        locker.pair(f"warm-{lib}-{k}")  # connections (and scripts) warm
        while time.time() < start_at:
            time.sleep(0.0005)
        end = time.monotonic() + seconds
        name = f"contended-{lib}-{int(fast)}"
        while time.monotonic() < end:
            a = time.monotonic_ns()
            lk, attempts = locker.acquire(name)
            g = time.monotonic_ns()
            r = time.monotonic_ns()
            locker.release(lk)
            out.append((attempts, a, g, r))
    finally:
        locker.close()
    q.put((k, out))


def figure_contended(lib: str, fast: bool, urls: list[str], ns: str, workers: int,
                     seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 2.0 + 0.3 * workers
    procs = [ctx.Process(target=contender,
                         args=(lib, fast, urls, ns, seconds, start_at, k, q), daemon=True)
             for k in range(workers)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        k, out = q.get(timeout=seconds + 120)
        results[k] = out
    for p in procs:
        p.join(10)
    # (grant, release, worker, attempts, asked), in grant order
    sections = sorted((g, r, k, n, a) for k, out in results.items() for n, a, g, r in out)
    pairs = list(zip(sections, sections[1:]))
    span = (sections[-1][1] - sections[0][0]) / 1e9 if len(sections) > 1 else float("nan")
    counts = [len(results[k]) for k in range(workers)]
    return {"acq": len(sections), "rate": len(sections) / span if span else 0.0,
            "fair": min(counts) / max(counts) if max(counts) else 0.0, "counts": counts,
            "longest": max(((g - a) / 1e9 for g, _, _, _, a in sections), default=0.0),
            "handoffs": [(b[0] - a[1]) / 1e9 for a, b in pairs if b[2] != a[2]],
            "retried": sum(1 for s in sections if s[3] > 1),
            "tries": sum(s[3] for s in sections) / max(1, len(sections)),
            "overlaps": sum(1 for a, b in pairs if b[0] < a[1]),
            "same_again": sum(1 for a, b in pairs if b[2] == a[2])}


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per figure / row")
    ap.add_argument("--workers", type=int, default=8, help="contending processes (2)")
    ap.add_argument("--instances", type=int, default=3, help="N (odd)")
    ap.add_argument("--only", default="1,2", help="the figures to measure: 1, 2 or 1,2")
    ap.add_argument("--whatif", action="store_true",
                    help="also (1) with our request/release scripts as cheap as a peer's "
                         "(SET PX / GET+DEL): does the server's cost explain the gap?")
    args = ap.parse_args(argv)
    only = {f.strip() for f in args.only.split(",")}
    if not only <= {"1", "2"}:
        ap.error(f"--only takes figure numbers 1 and 2, not {args.only!r}")
    missing = [v for m, v in PEERS.items() if not have(m)]
    ns = f"peers-{os.getpid()}"
    with Instances(args.instances) as inst:
        inst.init_fresh(ns)  # our own brand-new servers (E1)
        urls = inst.urls
        info = inst[0].client().info("server")
        print(f"{args.instances} x redis-server {info['redis_version']} on loopback; python "
              f"{platform.python_version()}, redis-py {redis.__version__}; {os.cpu_count()} "
              f"CPUs, load average {os.getloadavg()[0]:.2f}")
        if missing:
            print(f"not installed, left out: {', '.join(missing)} (pip install -e '.[bench]')")
        print()
        whatif = WhatIf(inst, urls, ns) if args.whatif and "1" in only else None
        floor_rt, res = figure_uncontended(urls, ns, args.seconds if "1" in only else 0.3,
                                           whatif)
        if "1" in only:
            print_uncontended(floor_rt, res)
        if "2" in only:
            print_contended(urls, ns, args, floor_rt)
    return 0


def print_uncontended(floor_rt: float, res: dict[str, list[float]]) -> None:
    print("(1) uncontended acquire + release of one exclusive lock, one client")
    print(f"    floor round (all instances): p50 {floor_rt * 1e6:.1f} µs "
          f"({1 / floor_rt:,.0f}/s)")
    print(f"    {'library':<22} {'pairs/s':>9} {'p50 µs':>9} {'p99 µs':>9} {'floor RTs':>9}")
    rate = {lib: 1 / statistics.mean(lat) for lib, lat in res.items()}
    for lib, lat in res.items():
        p50 = statistics.median(lat)
        print(f"    {lib:<22} {rate[lib]:>9,.0f} {p50 * 1e6:>9.1f} {pct(lat, 99) * 1e6:>9.1f} "
              f"{p50 / floor_rt:>9.2f}")
    peers = {lib: r for lib, r in rate.items() if not lib.startswith("redlockdlm")}
    if peers:
        best = max(peers, key=peers.get)
        for ours in [lib for lib in rate if lib.startswith("redlockdlm")]:
            print(f"    {ours} / best peer ({best}): {rate[ours] / peers[best]:.2f}")
    if "redlockdlm, what-if" in rate:
        print("    (what-if: our sync client, its request and release scripts replaced by a "
              "peer's SET PX / GET+DEL, in slices interleaved with the others)")
    print()


def print_contended(urls: list[str], ns: str, args: argparse.Namespace,
                    floor_rt: float) -> None:
    print(f"(2) {args.workers} worker processes contending for one exclusive lock "
          f"({args.seconds:g} s per row)")
    print(f"    {'library':<26} {'acq/s':>7} {'fair':>5} {'longest':>9} {'handoff p50':>12} "
          f"{'retried':>8} {'tries':>6} {'overlap':>7}")
    rows = [("redlockdlm", False)] + [(m, f) for m in PEERS if have(m) for f in (False, True)]
    rates = {}
    for lib, fast in rows:
        c = figure_contended(lib, fast, urls, ns, args.workers, args.seconds)
        name = lib + (" (1 ms retry)" if fast else "")
        rates[name] = c["rate"]
        h = statistics.median(c["handoffs"]) if c["handoffs"] else float("nan")
        share = c["retried"] / max(1, c["acq"])
        print(f"    {name:<26} {c['rate']:>7,.0f} {c['fair']:>5.2f} "
              f"{c['longest'] * 1e3:>7,.0f} ms {h / floor_rt:>8.1f} RTs {share:>8.0%} "
              f"{c['tries']:>6.1f} {c['overlaps']:>7}")
        if c["overlaps"]:
            print("        ^ holds overlapped: mutual exclusion broken (or clocks disagree)")
        if lib == "redlockdlm" and share < 0.5:
            print("        ^ NOT CONTENDED: fewer than half the grants waited in the queue")
        elif c["same_again"] > c["acq"] / 2:
            print(f"        ^ barging: the same worker again in {c['same_again']} of "
                  f"{c['acq']} acquisitions while the others waited (see fair, longest)")
    peers = {k: v for k, v in rates.items() if not k.startswith("redlockdlm")}
    if peers:
        best = max(peers, key=peers.get)
        print(f"    redlockdlm / best peer ({best}): {rates['redlockdlm'] / peers[best]:.2f}")
    print("    (retried: acquisitions not granted at their first attempt, for redlockdlm"
          " not granted by its first round, i.e. queued behind a holder; tries: attempts"
          " per acquisition; longest: the longest wait from asking to holding)")
    print()


if __name__ == "__main__":
    sys.exit(main())
