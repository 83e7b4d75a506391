"""Latency of an uncontended lock + release, and of a waiter's wake after the holder's
release, over three Redis Cluster members against three standalone servers, alternating
(two rounds each), in one process: docs/performance.md, "Redis Cluster members".

    python benchmarks/cluster_latency.py [sync|async] [pairs=300] [primaries per cluster=3]
"""
import contextlib
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from quorum.clients import make_client  # noqa: E402
from redis_harness import RedisClusterServer, RedisServer  # noqa: E402

KIND = sys.argv[1] if len(sys.argv) > 1 else "sync"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300
SHARDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3

from redlockdlm.engine.keys import check_namespace, epoch_key, key_slot, resource_key  # noqa: E402,I001
from redlockdlm.engine.scripts import command, load_command  # noqa: E402

def fresh(ms, names):
    for m in ms:
        if isinstance(m, RedisClusterServer):
            c = m.client()
            c.execute_command(*load_command(), target_nodes=c.ALL_NODES)
            ns = check_namespace("bench")
            for s in sorted({key_slot(resource_key(ns, (n.encode(),))) for n in names}):
                c.execute_command(*command("init", [epoch_key(s)], [b"fresh", b""]))
        else:
            c = m.client()
            c.execute_command(*load_command())
            c.execute_command(*command("init", [epoch_key()], [b"fresh", b""]))

NAMES = [f"w{j}" for j in range(8)] + [f"r{j}" for j in range(8)] + ["wk"]

def lat(urls):
    d = make_client(KIND, urls, "bench", socket_timeout=1.0, connect_timeout=1.0)
    try:
        for j in range(30):
            d.lock(f"w{j%8}", "EX", timeout=5).release()
        ts = []
        for j in range(N):
            t0 = time.perf_counter()
            d.lock(f"r{j%8}", "EX", timeout=5).release()
            ts.append(time.perf_counter() - t0)
        # waiter wake
        b = make_client(KIND, urls, "bench", socket_timeout=1.0, connect_timeout=1.0)
        wk = []
        for _ in range(15):
            la = d.lock("wk", "EX", timeout=5)
            req = b.enqueue("wk", "EX", timeout=5)
            time.sleep(0.03)
            t0 = time.perf_counter()
            la.release()
            req.wait(5).release()
            wk.append(time.perf_counter() - t0)
        b.close()
        return statistics.median(ts) * 1e3, statistics.median(wk) * 1e3
    finally:
        d.close()

with contextlib.ExitStack() as st:
    cl = [st.enter_context(RedisClusterServer(SHARDS)) for _ in range(3)]
    sa = []
    for _ in range(3):
        s = RedisServer()
        st.callback(s.stop)
        sa.append(s)
    fresh(cl + sa, NAMES)
    for _ in range(2):
        for name, ms in (("standalone", sa), ("cluster", cl)):
            ms_pair, w = lat([m.url for m in ms])
            print(f"{KIND} {name:10s} lock+release {ms_pair:.2f} ms  wake {w:.2f} ms", flush=True)
