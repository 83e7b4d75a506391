"""Where one script call's server time goes: each piece timed alone inside redis-server.

    python benchmarks/server_parts.py [--n N] [--rounds R] [--url redis://host:port]
                                      [--tree PATH ...] [--only-scripts]

Without --url it starts its own redis-server (tests/redis_harness.py) and stops it, by its
pid, at the end. A throwaway Functions library (`dlmparts`, removed at the end) runs one
piece N times in a loop inside one FCALL; INFO commandstats' `usec` for that FCALL, minus
the same loop with nothing in it, divided by N, is the piece's cost. The FCALL itself (its
argument parsing and reply) is measured as calls of functions that do nothing, with the
argument and reply shapes of the request script. The real scripts are timed the same way
(pipelined calls), with the Lua of this tree or, alternately, of each --tree (another
checkout, e.g. main's, to compare before and after in one run on one server). Every figure
is the median of R rounds.
This script prints; it does not assert. docs/performance.md explains the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LIB = r"""#!lua name=dlmparts
local R = {
  n = 'bench name', s = 1733300000000000, vv = 0, vi = 0, c = {}, w = {},
  g = {{id = 'lock-000001', o = 'owner-01', gr = 5, rq = -1, f = 0, t = 1000000,
        ct = 0, e = 1733300600000, p = '', pk = '', k = {}, tok = 1733300000000001,
        pm = -1}},
}
local TOMB = {n = 'bench name', s = 1733300000000000, vv = 0, vi = 0}
local BLOB  -- (globals cannot be read while the library loads)
local piece = {
  empty = function() end,
  hmget_epoch5 = function()
    redis.call('HMGET', 'dlm:epoch', 'id', 'safe', 'tfix', 'toff', 'rejoin') end,
  hget_epoch1 = function() redis.call('HGET', 'dlm:epoch', 'id') end,
  time = function() redis.call('TIME') end,
  get_100B = function() redis.call('GET', 'parts:blob') end,
  get_missing = function() redis.call('GET', 'parts:none') end,
  set_100B = function() redis.call('SET', 'parts:blob', BLOB) end,
  set_px = function() redis.call('SET', 'parts:tomb', BLOB, 'PX', '60000') end,
  pack_one_lock = function() cmsgpack.pack(R) end,
  pack_tombstone = function() cmsgpack.pack(TOMB) end,
  unpack_one_lock = function() cmsgpack.unpack(BLOB) end,
  zadd_zrem = function()
    redis.call('ZADD', 'parts:z', 1733300600000, 'lock-000001|dlm:{x:bench')
    redis.call('ZREM', 'parts:z', 'lock-000001|dlm:{x:bench') end,
  publish_nobody = function() redis.call('PUBLISH', 'dlm:x:ch:owner-01', 'G|lock|5|1|0|0|0|') end,
  acl_check = function() redis.acl_check_cmd('SET', 'parts:blob', 'x') end,
  hset_3 = function()
    redis.call('HSET', 'parts:h', 'l', 'lock-000001', 'o', 'owner-01', 'e', '1733300600000') end,
  hmget_3 = function() redis.call('HMGET', 'parts:h', 'l', 'o', 'e') end,
  hgetall_small = function() redis.call('HGETALL', 'parts:h') end,
  pcall_empty = function() pcall(function() end) end,
  string_format = function() string.format('%.0f', 1733300000000001) end,
  concat_5 = function() local _ = 'G|' .. 'lock-000001' .. '|' .. 5 .. '|' .. 'x' end,
  table_13 = function()
    local _ = {id = 'lock-000001', o = 'owner-01', gr = 5, rq = -1, f = 0, t = 1000000,
               ct = 0, e = 1733300600000, p = '', pk = '', k = {}, tok = 1, pm = -1} end,
}
redis.register_function('dlmparts_loop', function(keys, args)
  BLOB = BLOB or cmsgpack.pack(R)
  local f, n = piece[args[1]], tonumber(args[2])
  for _ = 1, n do f() end
  return 1
end)
redis.register_function('dlmparts_nothing', function(keys, args) return 1 end)
redis.register_function('dlmparts_reply11', function(keys, args)
  return {0, 'e.p.och', 5, 1733300000000001, 0, false, 0, 0, -1, 0, 0}
end)
"""

PIECES = ["empty", "hmget_epoch5", "hget_epoch1", "time", "get_100B", "get_missing",
          "set_100B", "set_px", "pack_one_lock", "pack_tombstone", "unpack_one_lock",
          "zadd_zrem", "publish_nobody", "acl_check", "hset_3", "hmget_3", "hgetall_small",
          "pcall_empty", "string_format", "concat_5", "table_13"]

# The request script's shape: 4 keys, 11 arguments.
REQ_KEYS = [b"dlm:epoch", b"dlm:bench:waiters", b"dlm:{bench:x", b"dlm:{bench:x"]
REQ_ARGS = [b"600000", b"dlm:bench:ch:", b"owner-01", b"lock-000001", b"5", b"0",
            b"1000000", b"600000", b"", b"x", b"0"]


def fcall_usec(c: redis.Redis) -> tuple[int, int]:
    st = c.info("commandstats").get("cmdstat_fcall", {})
    return int(st.get("calls", 0)), int(st.get("usec", 0))


def loop_cost(c: redis.Redis, name: str, n: int) -> float:
    _, u0 = fcall_usec(c)
    c.execute_command("FCALL", "dlmparts_loop", 0, name, n)
    _, u1 = fcall_usec(c)
    return (u1 - u0) / n


def call_cost(c: redis.Redis, fn: str, keys: list, args: list, n: int) -> float:
    calls0, u0 = fcall_usec(c)
    p = c.pipeline(transaction=False)
    for _ in range(n):
        p.execute_command("FCALL", fn, len(keys), *keys, *args)
    p.execute()
    calls1, u1 = fcall_usec(c)
    return (u1 - u0) / (calls1 - calls0)


def _engine_modules(tree: Path):
    """redlockdlm's engine modules as found in `tree` (its lua/ is what they load)."""
    for m in [m for m in sys.modules if m == "redlockdlm" or m.startswith("redlockdlm.")]:
        del sys.modules[m]
    sys.path.insert(0, str(tree))
    try:
        from redlockdlm.engine import codec, scripts
        from redlockdlm.engine.instance import Engine
    finally:
        sys.path.remove(str(tree))
    return codec, scripts, Engine


def script_costs(c: redis.Redis, n: int, tree: Path) -> dict[str, float]:
    """Server µs per call of the real scripts of `tree`, pipelined in batches: request EX
    granted + release on one resource (the mean of the two calls), and renew of one
    granted lock."""
    codec, scripts, Engine = _engine_modules(tree)

    # (a namespace per tree: two versions of the scripts need not read each other's format)
    e = Engine(c, f"parts{sum(str(tree).encode()) % 10000}", rejoin_ms=600000)
    e.init_fresh(force=True)
    k = e.key("bench", "pair")
    ek = [b"dlm:epoch", e.wkey]
    out = {}
    calls0, u0 = fcall_usec(c)
    p = c.pipeline(transaction=False)
    for i in range(n):
        p.execute_command(*scripts.command("request", [*ek, k, k], codec.request_args(
            600000, e.chan, "owner-01", f"l{i}", 5, 0, 10**6 + i, 600000, "", b"", 0)))
        p.execute_command(*scripts.command("release", [*ek, k, k], codec.release_args(
            600000, e.chan, "owner-01", f"l{i}", 0, None, 0, 65536, 0)))
    p.execute()
    calls1, u1 = fcall_usec(c)
    out["script: request EX + release, per call"] = (u1 - u0) / (calls1 - calls0)
    calls0, u0 = fcall_usec(c)
    for i in range(n // 5):  # one call at a time, as benchmarks/engine_scripts.py does
        e.request(k, "owner-01", f"s{i}", 5, ticket=10**6 + i, lease_ms=600000)
        e.release(k, "owner-01", f"s{i}")
    calls1, u1 = fcall_usec(c)
    out["script: request EX + release, per call, sequential"] = (u1 - u0) / (calls1 - calls0)
    r = e.request(k, "owner-01", "held", 5, ticket=1, lease_ms=600000)
    calls0, u0 = fcall_usec(c)
    p = c.pipeline(transaction=False)
    for _ in range(n):
        p.execute_command(*scripts.command("renew", [*ek, k], codec.renew_args(
            600000, e.chan, "owner-01", 600000, [("held", r.token)])))
    p.execute()
    calls1, u1 = fcall_usec(c)
    out["script: renew 1 lock"] = (u1 - u0) / (calls1 - calls0)
    e.release(k, "owner-01", "held")
    # renewal of many locks (the client sends calls of 256 locks), per lock; and the memory
    # of a held lone lock's key (MEMORY USAGE: key, value and Redis's own overhead)
    items = []
    for j in range(256):
        kj = e.key("bench", f"many{j}")
        rj = e.request(kj, "owner-01", f"lock-{j:010d}", 5, ticket=j + 1, lease_ms=600000,
                       name=e.name("bench", f"many{j}"))
        assert rj.status == 0, rj
        items.append((kj, f"lock-{j:010d}", rj.token))
    calls0, u0 = fcall_usec(c)
    for _ in range(max(1, n // 500)):
        e.renew("owner-01", 600000, items)
    calls1, u1 = fcall_usec(c)
    out["script: renew 256 locks in one call, per lock"] = (u1 - u0) / (calls1 - calls0) / 256
    out["memory of a held lone lock's key, bytes"] = sum(
        c.memory_usage(kj, samples=0) for kj, _, _ in items) / len(items)
    for kj, lid, _ in items:
        e.release(kj, "owner-01", lid)
    e.close()
    return out


def run(url: str, n: int, rounds: int, trees: list[Path], only_scripts: bool) -> None:
    c = redis.Redis.from_url(url)
    c.execute_command("FUNCTION", "LOAD", "REPLACE", LIB)
    # (dlm:epoch, which the pieces read, is created by the scripts' round, run first)
    c.hset("parts:h", mapping={"l": "lock-000001", "o": "owner-01", "e": "1733300600000"})
    try:
        res: dict[str, list[float]] = {}
        for _ in range(rounds):
            for tree in trees:
                tag = "" if tree == ROOT else f" [{tree}]"
                for name, v in script_costs(c, min(n, 5000), tree).items():
                    res.setdefault(name + tag, []).append(v)
            if only_scripts:
                continue
            base = loop_cost(c, "empty", n)
            for name in PIECES[1:]:
                res.setdefault(name, []).append(loop_cost(c, name, n) - base)
            res.setdefault("FCALL, no args, reply 1", []).append(
                call_cost(c, "dlmparts_nothing", [], [], n))
            res.setdefault("FCALL, 4 keys + 11 args, reply 1", []).append(
                call_cost(c, "dlmparts_nothing", REQ_KEYS, REQ_ARGS, n))
            res.setdefault("FCALL, 4 keys + 11 args, 11-element reply", []).append(
                call_cost(c, "dlmparts_reply11", REQ_KEYS, REQ_ARGS, n))
        print(f"median of {rounds} rounds, {n} iterations each; µs of server time")
        for name, vals in res.items():
            print(f"  {name:<45} {statistics.median(vals):7.3f}")
    finally:
        c.execute_command("FUNCTION", "DELETE", "dlmparts")
        c.delete("parts:blob", "parts:tomb", "parts:z", "parts:h")
        c.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--url")
    ap.add_argument("--tree", action="append", default=[],
                    help="also time the scripts of this checkout (alternately with this one)")
    ap.add_argument("--only-scripts", action="store_true")
    args = ap.parse_args(argv)
    trees = [ROOT] + [Path(t).resolve() for t in args.tree]
    if args.url:
        run(args.url, args.n, args.rounds, trees, args.only_scripts)
        return 0
    from redis_harness import RedisServer

    server = RedisServer()
    try:
        run(server.url, args.n, args.rounds, trees, args.only_scripts)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
