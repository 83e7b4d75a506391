"""redis-server instructions per script call on a Redis Cluster node against a standalone one.

    python benchmarks/cluster_instructions.py [--n N] [--slots K] [--keep DIR]

Starts redis-server under `valgrind --tool=callgrind` twice on free loopback ports: a
standalone server, and a 1-node Redis Cluster (`cluster-enabled yes`, every slot assigned
to it with CLUSTER ADDSLOTSRANGE). On each it counts, between `callgrind_control -z` and
`-d`, the instructions of N calls of:

  floor   FCALL of a function that returns 1 (no key)
  set20   FCALL of a function doing 20 SETs of one declared key (the nested command's cost)
  pair1   request(EX) + release through the Engine, ONE resource (one slot)
  pairK   the same on K root resources taken in turn (K slots on the cluster)

and prints the instructions per call (per pair for pair*). With --keep, the callgrind dumps
of each batch are kept in DIR (`callgrind_annotate DIR/<server>-<batch>.out` gives the
breakdown by function). The servers are stopped by their own pids. This script prints; it
does not assert.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
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

LEASE_MS = 600_000
LIB = """#!lua name=cibench
redis.register_function('floor', function() return 1 end)
redis.register_function('set20', function(keys)
  for i = 1, 20 do redis.call('SET', keys[1], 'x') end
  return 1
end)
"""


def _dumps(outdir: str) -> list[str]:
    return glob.glob(os.path.join(outdir, "callgrind.out*"))


def _totals(outdir: str, keep: str | None, label: str) -> int:
    """The sum of the `totals:` lines of the dumps in outdir, removing them (or moving them
    to keep/label.out)."""
    total = 0
    for f in _dumps(outdir):
        with open(f) as fh:
            for line in fh:
                if line.startswith("totals:") or line.startswith("summary:"):
                    total += int(line.split()[1])
                    break
        if keep and label:
            shutil.move(f, os.path.join(keep, f"{label}.out"))
        else:
            os.unlink(f)
    return total


def run_server(cluster: bool, n: int, slots: int, keep: str | None,
               timed: bool = False, cache_sim: bool = False) -> dict[str, float]:
    from redis_harness import free_port

    port = free_port()
    kind = "cluster" if cluster else "standalone"
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        grind = [] if timed else ["valgrind", "--tool=callgrind", "--instr-atstart=yes",
                                  f"--callgrind-out-file={out}/callgrind.out.%p"]
        if cache_sim and grind:
            grind.append("--cache-sim=yes")
        args = grind + ["redis-server", "--port",
                str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", tmp]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file",
                     os.path.join(tmp, "nodes.conf"), "--cluster-port", str(free_port())]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            raw = redis.Redis(port=port)
            for _ in range(600):
                try:
                    raw.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            if cluster:
                raw.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
                for _ in range(600):
                    if b"cluster_state:ok" in raw.execute_command("CLUSTER", "INFO"):
                        break
                    time.sleep(0.1)
                client: redis.Redis | redis.RedisCluster = redis.RedisCluster(
                    host="127.0.0.1", port=port)
            else:
                client = raw
            raw.function_load(LIB, replace=True)
            e = Engine(client, f"ci-{os.getpid()}", rejoin_ms=LEASE_MS)
            e.init_fresh()
            one = e.key("bench", "pair")
            many = [e.key("bench", f"r{j}") for j in range(slots)]
            fkey = e.key("bench", "f")  # (one slot; the connection of that slot's node)

            def floor(i: int) -> None:
                raw.fcall("floor", 0)

            def set20(i: int) -> None:
                raw.fcall("set20", 1, fkey)

            def pair_on(keys: list[bytes]):
                def pair(i: int) -> None:
                    key = keys[i % len(keys)]
                    lid = f"p{i}"
                    e.request(key, "bench-owner", lid, Mode.EX, ticket=i, lease_ms=LEASE_MS,
                              name=b"x")
                    e.release(key, "bench-owner", lid)
                return pair

            steps = {"floor": floor, "set20": set20, "pair1": pair_on([one]),
                     f"pair{slots}": pair_on(many)}
            for i in range(max(200, 2 * slots)):  # warm-up: library loaded, slots' epochs
                for step in steps.values():
                    step(1_000_000 + i)
            for label, step in steps.items():
                if timed:
                    raw.config_resetstat()
                    for i in range(n):
                        step(i)
                    st = raw.info("commandstats")["cmdstat_fcall"]
                    res[label] = 1000 * st["usec"] / st["calls"]
                    continue
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                               stdout=subprocess.DEVNULL)
                _totals(out, None, "")
                for i in range(n):
                    step(i)
                subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                               stdout=subprocess.DEVNULL)
                res[label] = _totals(out, keep, f"{kind}-{label}") / n
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="calls per figure")
    ap.add_argument("--slots", type=int, default=64, help="resources (slots) of pairK")
    ap.add_argument("--keep", help="keep the callgrind dumps in this directory")
    ap.add_argument("--time", action="store_true",
                    help="no valgrind: server ns per FCALL from INFO commandstats instead")
    ap.add_argument("--cache-sim", action="store_true",
                    help="callgrind's cache simulation too (misses in the kept dumps)")
    args = ap.parse_args(argv)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    rows = {kind: run_server(kind == "cluster", args.n, args.slots, args.keep, args.time,
                             args.cache_sim)
            for kind in ("standalone", "cluster")}
    what = "server µs per FCALL (commandstats)" if args.time else "instructions per call (k)"
    print(f"redis-server {what}, {args.n} calls each (pair*: per FCALL, not per pair):"
          if args.time else f"redis-server {what}, {args.n} calls each:")
    print(f"{'':10s} " + " ".join(f"{k:>9s}" for k in rows["standalone"]))
    for kind, r in rows.items():
        print(f"{kind:10s} " + " ".join(f"{v / 1000:9.1f}" for v in r.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
