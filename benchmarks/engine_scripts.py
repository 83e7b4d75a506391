"""What each engine script costs inside the server, and how it grows with a queue.

    python benchmarks/engine_scripts.py [--seconds S] [--url redis://host:port]

Without --url it starts its own redis-server (tests/redis_harness.py) and stops it, by its
pid, at the end. Each scenario repeats one pattern of Engine calls on one connection for S
seconds (default 1) and prints the server time per script call from INFO commandstats
(evalsha + eval + fcall deltas: the time inside the command, network and client excluded)
and the client's µs per call. docs/performance.md explains the figures. This script prints;
it does not assert.
"""

from __future__ import annotations

import argparse
import os
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

LEASE_MS = 600_000
SCRIPT_COMMANDS = ("evalsha", "eval", "fcall")


def script_stats(client: redis.Redis) -> tuple[int, int]:
    info = client.info("commandstats")
    calls = usec = 0
    for c in SCRIPT_COMMANDS:
        st = info.get(f"cmdstat_{c}", {})
        calls += int(st.get("calls", 0))
        usec += int(st.get("usec", 0))
    return calls, usec


def expect(rep, *want: Status) -> None:
    if rep.status not in want:
        raise SystemExit(f"benchmark aborted: got {rep.status.name}, expected "
                         f"{'/'.join(w.name for w in want)}: {rep}")


def measure(client: redis.Redis, step: Callable[[int], None], seconds: float) -> tuple:
    """(server µs per script call, client µs per script call) of step(0), step(1), ..."""
    for i in range(20):  # warm-up
        step(-1 - i)
    calls0, usec0 = script_stats(client)
    i = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        step(i)
        i += 1
    elapsed = time.perf_counter() - start
    calls1, usec1 = script_stats(client)
    calls = calls1 - calls0
    return (usec1 - usec0) / calls, elapsed / calls * 1e6


def scenarios(e: Engine) -> list[tuple[str, Callable[[], Callable[[int], None]]]]:
    """(name, setup) pairs; setup() prepares the state and returns the step."""
    out: list[tuple[str, Callable[[], Callable[[int], None]]]] = []
    counter = iter(range(10**9))

    def fresh(label: str) -> bytes:
        return e.key("bench", f"{label}-{next(counter)}")

    def pair():
        k = fresh("pair")

        def step(i: int) -> None:
            e.request(k, "o1", f"p{i}", Mode.EX, ticket=10**6 + i, lease_ms=LEASE_MS)
            e.release(k, "o1", f"p{i}")
        return step
    out.append(("request EX granted + release (2 calls)", pair))

    def retry():
        k = fresh("retry")
        expect(e.request(k, "o1", "r", Mode.PR, ticket=1, lease_ms=LEASE_MS), Status.GRANTED)
        return lambda i: e.request(k, "o1", "r", Mode.PR, ticket=1, lease_ms=LEASE_MS)
    out.append(("request repeated (G12, read only)", retry))

    def convert():
        k = fresh("conv")
        expect(e.request(k, "o1", "c", Mode.PR, ticket=1, lease_ms=LEASE_MS), Status.GRANTED)

        def step(i: int) -> None:
            e.convert(k, "o1", "c", Mode.EX, ticket=10**6 + 2 * i, lease_ms=LEASE_MS)
            e.convert(k, "o1", "c", Mode.PR, ticket=10**6 + 2 * i + 1, lease_ms=LEASE_MS)
        return step
    out.append(("convert PR->EX + EX->PR (2 calls)", convert))

    def yield_():
        k = fresh("yield")
        expect(e.request(k, "o1", "y", Mode.EX, ticket=1, lease_ms=LEASE_MS), Status.GRANTED)
        return lambda i: e.yield_(k, "o1", "y")
    out.append(("yield, granted again at once", yield_))

    def renew(n: int):
        def setup():
            items = []
            for j in range(n):
                k = fresh("renew")
                expect(e.request(k, "o1", f"n{j}", Mode.PR, ticket=j, lease_ms=LEASE_MS),
                       Status.GRANTED)
                items.append((k, f"n{j}", 0))
            return lambda i: e.renew("o1", LEASE_MS, items)
        return setup
    out.append(("renew 1 lock", renew(1)))
    out.append(("renew 40 locks (one call)", renew(40)))

    def queued(n: int):
        def setup():
            k = fresh("queue")
            expect(e.request(k, "h", "holder", Mode.EX, ticket=0, lease_ms=LEASE_MS),
                   Status.GRANTED)
            for j in range(n):
                expect(e.request(k, f"w{j % 50}", f"w{j}", Mode.EX, ticket=1 + j,
                                 lease_ms=LEASE_MS), Status.QUEUED)

            def step(i: int) -> None:
                e.request(k, "o1", f"q{i}", Mode.EX, ticket=10**9 + i, lease_ms=LEASE_MS)
                e.cancel(k, "o1", f"q{i}")
            return step
        return setup
    for n in (0, 10, 100, 1000):
        out.append((f"request queued + cancel, {n} ahead (2 calls)", queued(n)))

    def handoff(n: int):
        def setup():
            k = fresh("handoff")
            owners = [f"h{j}" for j in range(n + 1)]
            for j, o in enumerate(owners):
                expect(e.request(k, o, o, Mode.EX, ticket=j, lease_ms=LEASE_MS),
                       Status.GRANTED if j == 0 else Status.QUEUED)
            ring = {"t": n + 1, "head": 0}

            def step(i: int) -> None:  # the holder leaves and queues again at the tail
                o = owners[ring["head"] % len(owners)]
                e.release(k, o, o)
                e.request(k, o, o, Mode.EX, ticket=ring["t"], lease_ms=LEASE_MS)
                ring["t"] += 1
                ring["head"] += 1
            return step
        return setup
    for n in (1, 100):
        out.append((f"release granting the next of {n} + requeue (2 calls)", handoff(n)))

    def inspect():
        k = fresh("inspect")
        expect(e.request(k, "o1", "i", Mode.PR, ticket=1, lease_ms=LEASE_MS), Status.GRANTED)
        return lambda i: e.inspect([k])
    out.append(("inspect 1 resource", inspect))
    out.append(("init status", lambda: (lambda i: e.status())))
    return out


def run(url: str, seconds: float, own_server: bool) -> None:
    client = redis.Redis.from_url(url)
    e = Engine(client, f"bench-{os.getpid()}", rejoin_ms=LEASE_MS)
    if own_server:
        e.init_fresh()
    st = e.status()
    if st.epoch is None or st.recovering_ms > 0:
        raise SystemExit(f"benchmark aborted: {url} is not a safe instance (E1)")
    info = client.info("server")
    print(f"redis-server {info['redis_version']}; {seconds:g} s per scenario; µs per script call")
    print()
    print(f"{'scenario':<52} {'server':>8} {'client':>8}")
    print("-" * 70)
    for name, setup in scenarios(e):
        srv, cli = measure(client, setup(), seconds)
        print(f"{name:<52} {srv:>8.1f} {cli:>8.1f}")
    client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--url")
    args = ap.parse_args(argv)
    if args.url:
        run(args.url, args.seconds, own_server=False)
        return 0
    from redis_harness import RedisServer

    server = RedisServer()
    try:
        run(server.url, args.seconds, own_server=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
