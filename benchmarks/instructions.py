"""Instructions per lock operation, counted with valgrind callgrind (load does not move them).

    python benchmarks/instructions.py [server|client|both] [--n N]

server: starts its own redis-server under `valgrind --tool=callgrind` on a free loopback
        port, runs N floor calls (EVALSHA `return 1`) and N request(EX) + release pairs
        through the Engine, each batch between `callgrind_control -z` and `-d`, and prints
        the redis-server instructions per call and per pair.
client: runs this script's client loop under callgrind twice (N operations and none, against
        a plain redis-server), so the difference over N is the Python process's own
        instructions per floor call and per pair (user space: kernel work is not counted).

The servers are stopped by their own pids. This script prints; it does not assert.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redlockdlm.engine.instance import Engine  # noqa: E402
from redlockdlm.engine.modes import Mode  # noqa: E402

LEASE_MS = 30_000


def _ops(client: redis.Redis, e: Engine):
    """(floor step, pair step) on `client` and `e`."""
    sha = client.script_load("return 1")
    key = e.key("bench", "pair")
    name = e.name("bench", "pair")

    def floor(i: int) -> None:
        client.evalsha(sha, 0)

    def pair(i: int) -> None:
        lid = f"p{i}"
        e.request(key, "bench-owner", lid, Mode.EX, ticket=i, lease_ms=LEASE_MS, name=name)
        e.release(key, "bench-owner", lid)

    return floor, pair


def _totals(outdir: str) -> int:
    """The sum of the `totals:` lines of the dumps in outdir, removing them."""
    total = 0
    for f in glob.glob(os.path.join(outdir, "callgrind.out*")):
        with open(f) as fh:
            for line in fh:
                if line.startswith("totals:") or line.startswith("summary:"):
                    total += int(line.split()[1])
                    break
        os.unlink(f)
    return total


def server(n: int) -> None:
    from redis_harness import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=yes",
             f"--callgrind-out-file={out}/callgrind.out.%p", "redis-server", "--port",
             str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(600):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            e = Engine(client, f"ir-{os.getpid()}", rejoin_ms=LEASE_MS)
            e.init_fresh()
            floor, pair = _ops(client, e)
            for i in range(200):  # warm-up: library loaded, tables grown
                floor(i)
                pair(1_000_000 + i)

            def count(step, start: int) -> int:
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                               stdout=subprocess.DEVNULL)
                _totals(out)
                for i in range(start, start + n):
                    step(i)
                subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                               stdout=subprocess.DEVNULL)
                return _totals(out)

            f = count(floor, 0)
            p = count(pair, 10 * n)
            print(f"redis-server instructions: floor {f / n / 1000:8.1f} k per call; "
                  f"request + release {p / n / 1000:8.1f} k per pair ({n} each)")
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def client_loop(what: str, n: int, port: int) -> None:
    client = redis.Redis(port=port)
    e = Engine(client, f"ir-{os.getpid()}", rejoin_ms=LEASE_MS)
    floor, pair = _ops(client, e)
    for i in range(100):
        floor(i)
        pair(1_000_000 + i)
    step = floor if what == "floor" else pair
    for i in range(n):
        step(i)


def client(n: int) -> None:
    from redis_harness import RedisServer

    srv = RedisServer()
    try:
        Engine(srv.client(), "x").init_fresh()
        res = {}
        with tempfile.TemporaryDirectory() as tmp:
            for what in ("floor", "pair"):
                counts = []
                for k in (0, n):
                    subprocess.run(
                        ["valgrind", "--tool=callgrind",
                         f"--callgrind-out-file={tmp}/callgrind.out.%p", sys.executable,
                         __file__, "_loop", what, str(k), str(srv.port)],
                        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        env={**os.environ, "PYTHONHASHSEED": "0"})
                    counts.append(_totals(tmp))
                res[what] = (counts[1] - counts[0]) / n
        print(f"python client instructions: floor {res['floor'] / 1000:8.1f} k per call; "
              f"request + release {res['pair'] / 1000:8.1f} k per pair ({n} each)")
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_loop":
        client_loop(argv[1], int(argv[2]), int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="both", choices=["server", "client", "both"])
    ap.add_argument("--n", type=int, default=1000, help="operations per figure")
    args = ap.parse_args(argv)
    if args.what in ("server", "both"):
        server(args.n)
    if args.what in ("client", "both"):
        client(args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
