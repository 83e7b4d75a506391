"""Single-instance engine benchmark: what one lock operation costs against a trivial script.

    python benchmarks/engine.py [--seconds S] [--rounds R] [--url redis://host:port]

Without --url it starts its own redis-server on a free loopback port (the test harness,
tests/redis_harness.py) and stops it, by its pid, at the end. Everything runs on ONE
connection (redis.Redis; the hiredis parser when installed), one call after another. The
three figures are measured in R interleaved slices (floor, pair, conversion, floor, ...), so
a change of machine load between them does not skew their ratios:

  (a) floor       EVALSHA of `return 1`: the cheapest possible script round trip
  (b) pair        Engine.request(EX) + Engine.release, a new lock id each time, uncontended
  (c) conversion  request NL, convert to EX, convert down to NL, release

For each it prints ops/s, µs/op, the ratio to the floor (pair / 2 floor round trips,
conversion round / 4 floor round trips) and what the scripts cost inside the server
(INFO commandstats deltas of evalsha + eval + fcall: µs per call and per op). The target is
pair <= 1.5 x two trivial round trips; it is printed with PASS/MISS beside it. Last, the
CPU time the client and server processes used per op (a loaded machine stretches wall time
but not CPU time; kernel work on the other's behalf is partly missed). This script prints;
it does not assert.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redlockdlm.engine.instance import Engine  # noqa: E402
from redlockdlm.engine.modes import Mode, Status  # noqa: E402

TARGET_PAIR_RATIO = 1.5
LEASE_MS = 30_000
NAMESPACE = f"bench-{os.getpid()}"


SCRIPT_COMMANDS = ("evalsha", "eval", "fcall")  # however the engine invokes its scripts


def script_stats(client: redis.Redis) -> tuple[int, int]:
    """(calls, usec) of script commands (EVALSHA, EVAL, FCALL) so far on the server."""
    info = client.info("commandstats")
    calls = usec = 0
    for c in SCRIPT_COMMANDS:
        st = info.get(f"cmdstat_{c}", {})
        calls += int(st.get("calls", 0))
        usec += int(st.get("usec", 0))
    return calls, usec


def server_cpu(client: redis.Redis) -> float:
    """CPU seconds the server process has used (user + system)."""
    st = client.info("cpu")
    return float(st["used_cpu_user"]) + float(st["used_cpu_sys"])


class Result:
    """One figure, accumulated over the interleaved slices it was measured in."""

    def __init__(self, name: str, unit: str, step: Callable[[int], None]) -> None:
        self.name = name
        self.unit = unit
        self.step = step
        self.i = 0  # the step counter runs on across slices (fresh lock ids)
        self.ops = 0
        self.seconds = 0.0
        self.calls = 0  # script calls seen by the server during the measurement
        self.server_usec = 0
        self.slice_us: list[float] = []  # µs/op of each slice
        self.client_cpu = 0.0  # CPU seconds of this process (time.process_time)
        self.server_cpu = 0.0  # CPU seconds of the server (INFO cpu)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    @property
    def us(self) -> float:
        return self.seconds / self.ops * 1e6

    @property
    def server_us_per_call(self) -> float:
        return self.server_usec / self.calls if self.calls else float("nan")

    @property
    def server_us_per_op(self) -> float:
        return self.server_usec / self.ops

    @property
    def cpu_us(self) -> float:
        """Client + server CPU µs per op: what the op costs, whoever else uses the CPUs."""
        return (self.client_cpu + self.server_cpu) / self.ops * 1e6

    def run_slice(self, client: redis.Redis, seconds: float, record: bool = True) -> None:
        """Run step(i) for `seconds`, timed; add it to the figure unless `record` is False."""
        calls0, usec0 = script_stats(client)
        srv0 = server_cpu(client)
        cpu0 = time.process_time()
        n = 0
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            self.step(self.i)
            self.i += 1
            n += 1
            now = time.perf_counter()
        elapsed = now - start
        cpu1 = time.process_time()
        srv1 = server_cpu(client)
        calls1, usec1 = script_stats(client)
        if record:
            self.client_cpu += cpu1 - cpu0
            self.server_cpu += srv1 - srv0
            self.ops += n
            self.seconds += elapsed
            self.calls += calls1 - calls0
            self.server_usec += usec1 - usec0
            self.slice_us.append(elapsed / n * 1e6)


def measure(client: redis.Redis, figures: list[Result], seconds: float, warmup: float,
            rounds: int) -> None:
    """Warm each figure up, then measure them in `rounds` interleaved slices of
    seconds / rounds each, so a change of machine load hits every figure alike."""
    for f in figures:
        f.run_slice(client, warmup, record=False)
    for _ in range(rounds):
        for f in figures:
            f.run_slice(client, seconds / rounds)


def check(rep, want: Status, what: str) -> None:
    if rep.status != want:
        raise SystemExit(f"benchmark aborted: {what} returned {rep.status.name}, "
                         f"expected {want.name}: {rep}")


def run(url: str, seconds: float, own_server: bool, rounds: int) -> None:
    client = redis.Redis.from_url(url)
    info = client.info("server")
    e = Engine(client, NAMESPACE, rejoin_ms=LEASE_MS)
    if own_server:
        e.init_fresh()  # our own brand-new server: safe at once (E1)
    st = e.status()
    if st.epoch is None or st.recovering_ms > 0:
        state = f"recovering for {st.recovering_ms} ms (E1)" if st.epoch else "uninitialised"
        raise SystemExit(f"benchmark aborted: {url} is {state}; run against a safe instance "
                         "or omit --url to use a private redis-server")
    warmup = min(1.0, max(0.3, seconds / 5))

    print(f"redis-server {info['redis_version']} at {url}"
          f" ({'started by this script' if own_server else 'external'})")
    print(f"python {platform.python_version()}, redis-py {redis.__version__}, "
          f"hiredis parser: {'yes' if redis.utils.HIREDIS_AVAILABLE else 'NO'}; "
          f"one connection, sequential calls; {seconds:g} s per figure after "
          f"{warmup:g} s warm-up, in {rounds} interleaved slices")
    print()

    # (a) floor: a trivial script round trip
    sha = client.script_load("return 1")

    def floor_step(i: int) -> None:
        client.evalsha(sha, 0)

    # (b) uncontended request + release
    key = e.key("bench", "pair")
    name = e.name("bench", "pair")
    owner = "bench-owner"
    check(e.request(key, owner, "probe", Mode.EX, ticket=1, lease_ms=LEASE_MS, name=name),
          Status.GRANTED, "request")
    check(e.release(key, owner, "probe"), Status.RELEASED, "release")

    def pair_step(i: int) -> None:
        lid = f"p{i}"
        e.request(key, owner, lid, Mode.EX, ticket=i, lease_ms=LEASE_MS, name=name)
        e.release(key, owner, lid)

    # (c) conversion round
    ckey = e.key("bench", "conv")
    cname = e.name("bench", "conv")
    check(e.request(ckey, owner, "cprobe", Mode.NL, ticket=1, lease_ms=LEASE_MS, name=cname),
          Status.GRANTED, "request NL")
    check(e.convert(ckey, owner, "cprobe", Mode.EX, ticket=2, lease_ms=LEASE_MS),
          Status.GRANTED, "convert NL->EX")
    check(e.convert(ckey, owner, "cprobe", Mode.NL, ticket=3, lease_ms=LEASE_MS),
          Status.GRANTED, "convert EX->NL")
    check(e.release(ckey, owner, "cprobe"), Status.RELEASED, "release")

    def conv_step(i: int) -> None:
        lid = f"c{i}"
        t = 3 * i
        e.request(ckey, owner, lid, Mode.NL, ticket=t, lease_ms=LEASE_MS, name=cname)
        e.convert(ckey, owner, lid, Mode.EX, ticket=t + 1, lease_ms=LEASE_MS)
        e.convert(ckey, owner, lid, Mode.NL, ticket=t + 2, lease_ms=LEASE_MS)
        e.release(ckey, owner, lid)

    floor = Result("floor: EVALSHA `return 1`", "calls", floor_step)
    pair = Result("request + release (EX)", "pairs", pair_step)
    conv = Result("conversion round (4 calls)", "rounds", conv_step)
    measure(client, [floor, pair, conv], seconds, warmup, rounds)

    rows = [
        (floor, floor.us / floor.us, "1 round trip"),
        (pair, pair.us / (2 * floor.us), "pair / (2 x floor)"),
        (conv, conv.us / (4 * floor.us), "round / (4 x floor)"),
    ]
    head = (f"{'figure':<30} {'ops/s':>10} {'unit':<7} {'µs/op':>8} {'ratio':>6}  "
            f"{'ratio of':<20} {'srv µs/call':>11} {'srv µs/op':>9}")
    print(head)
    print("-" * len(head))
    for res, ratio, what in rows:
        print(f"{res.name:<30} {res.rate:>10,.0f} {res.unit:<7} {res.us:>8.1f} {ratio:>6.2f}  "
              f"{what:<20} {res.server_us_per_call:>11.1f} {res.server_us_per_op:>9.1f}")
    print()
    pair_ratio = rows[1][1]
    verdict = "PASS" if pair_ratio <= TARGET_PAIR_RATIO else "MISS"
    print(f"target: pair <= {TARGET_PAIR_RATIO} x two trivial round trips "
          f"({TARGET_PAIR_RATIO * 2 * floor.us:.1f} µs): {pair.us:.1f} µs = "
          f"{pair_ratio:.2f} x  -> {verdict}")
    per_round = sorted(p / (2 * f) for p, f in zip(pair.slice_us, floor.slice_us))
    print(f"  pair ratio of each slice with the floor measured just before it: median "
          f"{statistics.median(per_round):.2f}, min {per_round[0]:.2f}, "
          f"max {per_round[-1]:.2f} ({len(per_round)} slices)")
    print()
    print("server side (INFO commandstats, evalsha + eval + fcall deltas during each "
          "measurement):")
    print(f"  trivial script        {floor.server_us_per_call:6.1f} µs per call")
    print(f"  request/release       {pair.server_us_per_call:6.1f} µs per call on average, "
          f"{pair.server_us_per_op:6.1f} µs per pair "
          f"(client + network: {pair.us - pair.server_us_per_op:6.1f} µs per pair)")
    print(f"  conversion round      {conv.server_us_per_call:6.1f} µs per call on average, "
          f"{conv.server_us_per_op:6.1f} µs per round "
          f"(client + network: {conv.us - conv.server_us_per_op:6.1f} µs per round)")
    print()
    print("CPU time (this process + the server process, getrusage), which other load on the "
          "machine does not lengthen:")
    print(f"  floor                 {floor.cpu_us:6.1f} µs per call")
    print(f"  request/release       {pair.cpu_us:6.1f} µs per pair "
          f"= {pair.cpu_us / (2 * floor.cpu_us):.2f} x two floor calls")
    print(f"  conversion round      {conv.cpu_us:6.1f} µs per round "
          f"= {conv.cpu_us / (4 * floor.cpu_us):.2f} x four floor calls")
    client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="measured seconds per figure (default 3)")
    ap.add_argument("--rounds", type=int, default=10,
                    help="interleaved slices each figure is measured in (default 10)")
    ap.add_argument("--url", help="redis://host:port of a running, safe instance "
                    "(default: start a private redis-server)")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.url:
        run(args.url, args.seconds, own_server=False, rounds=args.rounds)
        return 0
    from redis_harness import RedisServer  # tests/redis_harness.py

    server = RedisServer()
    try:
        run(server.url, args.seconds, own_server=True, rounds=args.rounds)
    finally:
        server.stop()  # SIGTERM to its own pid, then cleanup
    return 0


if __name__ == "__main__":
    sys.exit(main())
