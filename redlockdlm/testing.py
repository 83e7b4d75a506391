"""Unit tests of code that uses redlockdlm, without a Redis server: in-process fake instances.

    from redlockdlm.testing import fake_dlm

    def test_my_job():
        with fake_dlm(3, "jobs") as dlm:          # three fake instances, a DLM on them
            with dlm.lock("report", "EX"):
                ...

Each fake instance is a fakeredis server (`fakeredis.TcpFakeServer`) on a free port of
127.0.0.1, served by threads of the test process: no `redis-server` binary, nothing outside
the process. The clients talk to it over loopback TCP exactly as to a real instance (the
sync client waits on its sockets with poll/select, which fakeredis's in-memory connections
do not offer), and the instance runs redlockdlm's own Lua library (FUNCTION LOAD, FCALL) in
fakeredis's Lua runtime (lupa). What that runtime lacks is supplied by `FakeCluster` on each
of its instances, and only there:

- `cmsgpack.pack` / `cmsgpack.unpack` (the resources' encoding): MessagePack written in
  Python here, with the rules of Redis's cmsgpack (a table whose keys are 1..n is an array,
  any other a map; integral numbers as integers);
- `INFO` from a script (a `run_id` of its own per instance, `maxmemory_policy:noeviction`);
- `redis.acl_check_cmd` (always true: fakes have no ACL users; rule K3 is not exercised).

Every instance is brand new and marked so (`init fresh`, rule E1), so no rejoin wait delays
the first lock. What differs from real instances: about 10 ms more per notification (a fake
connection looks for pushed messages every 10 ms), script calls slower (~0.1-0.2 ms of
Python each), no EVAL fallback (fakeredis's EVAL runtime has no cmsgpack), no INFO or ACL
from outside a script (`dlm status` and `dlm acl` need real servers). It is for the logic of
the code under test, not for timing or failure drills: use real servers (`DevCluster`,
`dlm dev`) for those.

Needs the optional extra `redlockdlm[testing]` (fakeredis and lupa); FakesUnavailable
otherwise. The pytest plugin (`redlockdlm.pytest_plugin`, registered as an entry point) adds
the fixtures `dlm_fake_cluster`, `dlm_fake` and `async_dlm_fake`.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .errors import FakesUnavailable, InvalidArgument
from .protocol import check_int

HOST = "127.0.0.1"
#: E1: the rejoin wait stored on every fake instance (as `DevCluster`'s): leases up to this
DEFAULT_REJOIN_MS = 60_000
#: the Redis version the fakes announce (Functions need >= 7.0)
FAKE_VERSION = (7, 4)


def _fakeredis() -> Any:
    try:
        import fakeredis
        import lupa  # noqa: F401  (fakeredis runs Lua only with it)
        from fakeredis.commands_mixins import scripting_mixin
    except ImportError as exc:
        raise FakesUnavailable(
            f"redlockdlm.testing needs fakeredis with its Lua extra ({exc}): "
            "pip install 'redlockdlm[testing]'") from None
    return fakeredis, scripting_mixin.LUA_MODULE


# ----------------------------------------------------------------- MessagePack (cmsgpack)

class _MsgPack:
    """`cmsgpack.pack` / `cmsgpack.unpack` for one Lua runtime: Lua values <-> MessagePack
    bytes, with the choices Redis's cmsgpack makes (a table is an array when its keys are
    exactly 1..n, a map otherwise, the empty table an empty array; an integral number is an
    integer, any other a double; a Lua string a MessagePack str; functions and other
    values nil). `unpack` returns every object in the bytes, and raises (a Lua error the
    calling script can `pcall`) on bytes that are not MessagePack."""

    def __init__(self, runtime: Any, lua: Any) -> None:
        self.runtime = runtime
        self.lua_type = lua.lua_type

    # pack
    def pack(self, *values: Any) -> bytes:
        out = bytearray()
        for v in values:
            self._pack(v, out, 0)
        return bytes(out)

    def _pack(self, v: Any, out: bytearray, depth: int) -> None:
        if v is None:
            out.append(0xC0)
        elif v is True:
            out.append(0xC3)
        elif v is False:
            out.append(0xC2)
        elif isinstance(v, int):
            self._int(v, out)
        elif isinstance(v, float):
            if v.is_integer() and -(2 ** 63) <= v < 2 ** 64:
                self._int(int(v), out)
            else:
                out += b"\xcb" + struct.pack(">d", v)
        elif isinstance(v, (bytes, str)):
            b = v.encode() if isinstance(v, str) else v
            n = len(b)
            if n < 32:
                out.append(0xA0 | n)
            elif n < 0x100:
                out += b"\xd9" + struct.pack(">B", n)
            elif n < 0x10000:
                out += b"\xda" + struct.pack(">H", n)
            else:
                out += b"\xdb" + struct.pack(">I", n)
            out += b
        elif self.lua_type(v) == "table" and depth < 16:
            items = list(v.items())
            n = len(items)
            if all(type(k) is int and 1 <= k <= n for k, _ in items):  # keys exactly 1..n
                self._head(n, out, 0x90, b"\xdc", b"\xdd")
                for i in range(1, n + 1):
                    self._pack(v[i], out, depth + 1)
            else:
                self._head(n, out, 0x80, b"\xde", b"\xdf")
                for k, x in items:
                    self._pack(k, out, depth + 1)
                    self._pack(x, out, depth + 1)
        else:  # a function, userdata, or nesting too deep: nil, as cmsgpack does
            out.append(0xC0)

    @staticmethod
    def _head(n: int, out: bytearray, fix: int, b16: bytes, b32: bytes) -> None:
        if n < 16:
            out.append(fix | n)
        elif n < 0x10000:
            out += b16 + struct.pack(">H", n)
        else:
            out += b32 + struct.pack(">I", n)

    @staticmethod
    def _int(i: int, out: bytearray) -> None:
        if 0 <= i < 0x80:
            out.append(i)
        elif -32 <= i < 0:
            out += struct.pack(">b", i)
        elif i >= 0:
            for code, fmt, top in ((0xCC, ">B", 0x100), (0xCD, ">H", 0x10000),
                                   (0xCE, ">I", 2 ** 32), (0xCF, ">Q", 2 ** 64)):
                if i < top:
                    out.append(code)
                    out += struct.pack(fmt, i)
                    return
            out += b"\xcb" + struct.pack(">d", float(i))
        else:
            for code, fmt, low in ((0xD0, ">b", -0x80), (0xD1, ">h", -0x8000),
                                   (0xD2, ">i", -(2 ** 31)), (0xD3, ">q", -(2 ** 63))):
                if i >= low:
                    out.append(code)
                    out += struct.pack(fmt, i)
                    return
            out += b"\xcb" + struct.pack(">d", float(i))

    # unpack
    def unpack(self, blob: Any) -> Any:
        if not isinstance(blob, bytes):
            raise ValueError("cmsgpack.unpack: the argument must be a string")
        values = []
        pos = 0
        while pos < len(blob):
            v, pos = self._unpack(blob, pos)
            values.append(v)
        if not values:
            raise ValueError("cmsgpack.unpack: empty string")
        return values[0] if len(values) == 1 else tuple(values)

    def _take(self, blob: bytes, pos: int, n: int) -> tuple[bytes, int]:
        end = pos + n
        if end > len(blob):
            raise ValueError("cmsgpack.unpack: truncated data")
        return blob[pos:end], end

    def _unpack(self, blob: bytes, pos: int) -> tuple[Any, int]:
        c = blob[pos]
        pos += 1
        if c < 0x80:
            return c, pos
        if c >= 0xE0:
            return c - 0x100, pos
        if 0xA0 <= c <= 0xBF:
            return self._take(blob, pos, c & 0x1F)
        if 0x90 <= c <= 0x9F:
            return self._array(blob, pos, c & 0x0F)
        if 0x80 <= c <= 0x8F:
            return self._map(blob, pos, c & 0x0F)
        if c == 0xC0:
            return None, pos
        if c in (0xC2, 0xC3):
            return c == 0xC3, pos
        fixed = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}.get(c)
        if fixed is not None:
            raw, pos = self._take(blob, pos, struct.calcsize(fixed))
            return struct.unpack(fixed, raw)[0], pos
        sized = {0xD9: (">B", "s"), 0xDA: (">H", "s"), 0xDB: (">I", "s"),
                 0xC4: (">B", "s"), 0xC5: (">H", "s"), 0xC6: (">I", "s"),
                 0xDC: (">H", "a"), 0xDD: (">I", "a"), 0xDE: (">H", "m"),
                 0xDF: (">I", "m")}.get(c)
        if sized is None:
            raise ValueError(f"cmsgpack.unpack: bad type byte 0x{c:02x}")
        fmt, kind = sized
        raw, pos = self._take(blob, pos, struct.calcsize(fmt))
        n = struct.unpack(fmt, raw)[0]
        if kind == "s":
            return self._take(blob, pos, n)
        return (self._array if kind == "a" else self._map)(blob, pos, n)

    def _array(self, blob: bytes, pos: int, n: int) -> tuple[Any, int]:
        t = self.runtime.table()
        for i in range(1, n + 1):
            v, pos = self._unpack(blob, pos)
            if v is not None:
                t[i] = v
        return t, pos

    def _map(self, blob: bytes, pos: int, n: int) -> tuple[Any, int]:
        t = self.runtime.table()
        for _ in range(n):
            k, pos = self._unpack(blob, pos)
            v, pos = self._unpack(blob, pos)
            if k is None:
                raise ValueError("cmsgpack.unpack: a nil map key")
            if v is not None:
                t[k] = v
        return t, pos


# The completion of fakeredis's Functions runtime, run once per fake instance with the
# engine fakeredis creates for it (`FunctionsEngine._lua`, whose `end_load` holds the table
# of globals a function sees, `run_globals`, and `redis` there a read-only view of the API).
_COMPLETE = """
function(engine, pack, unpack, info)
  local run_globals
  local i = 1
  while true do
    local name, value = debug.getupvalue(engine.end_load, i)
    if name == nil then break end
    if name == 'run_globals' then run_globals = value end
    i = i + 1
  end
  if type(run_globals) ~= 'table' or type(run_globals.redis) ~= 'table' then
    return false
  end
  local mt = debug.getmetatable(run_globals.redis)
  local api = mt and mt.__index
  if type(api) ~= 'table' or api.call == nil then return false end
  local call, pcall_ = api.call, api.pcall
  local function is_info(cmd)
    return type(cmd) == 'string' and string.upper(cmd) == 'INFO'
  end
  api.call = function(cmd, ...)
    if is_info(cmd) then return info(...) end
    return call(cmd, ...)
  end
  api.pcall = function(cmd, ...)
    if is_info(cmd) then return info(...) end
    return pcall_(cmd, ...)
  end
  api.acl_check_cmd = function(cmd) return true end
  local msgpack = {
    pack = function(...) return pack(...) end,
    unpack = function(blob) return unpack(blob) end,
  }
  run_globals.cmsgpack = setmetatable({}, {
    __index = msgpack,
    __newindex = function() error('Attempt to modify a readonly table', 2) end,
    __metatable = false,
  })
  return true
end
"""


class _Info:
    """What `redis.call('INFO', ...)` answers in a fake instance's scripts."""

    def __init__(self, version: tuple[int, ...]) -> None:
        self.run_id = os.urandom(20).hex()
        v = ".".join(map(str, (tuple(version) + (0, 0, 0))[:3]))
        self.sections = {
            "server": f"# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n"
                      f"run_id:{self.run_id}\r\n",
            "memory": "# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n",
        }

    def __call__(self, *sections: Any) -> bytes:
        names = [s.decode().lower() if isinstance(s, bytes) else str(s).lower()
                 for s in sections] or ["server", "memory"]
        if any(n in ("all", "everything", "default") for n in names):
            names = list(self.sections)
        return "\r\n".join(self.sections[n] for n in names if n in self.sections).encode()


class FakeInstance:
    """One fake instance: a fakeredis server on `url`, its Lua runtime completed, served by
    threads of this process until `stop()`."""

    def __init__(self, version: tuple[int, int] = FAKE_VERSION) -> None:
        fakeredis, lua = _fakeredis()
        self._tcp = fakeredis.TcpFakeServer((HOST, 0), server_version=version)
        self.port: int = self._tcp.server_address[1]
        self.url = f"redis://{HOST}:{self.port}"
        #: the fakeredis.FakeServer holding the data (for FakeRedis(server=...) in a test)
        self.server: Any = self._tcp.fake_server
        self.info = _Info(version)
        client = fakeredis.FakeRedis(server=self.server)
        try:
            client.execute_command("FUNCTION", "LIST")  # fakeredis creates its Lua engine
            engine = getattr(self.server, "_lua_functions", None)
            runtime = getattr(engine, "runtime", None)
            codec = _MsgPack(runtime, lua)
            ok = runtime is not None and runtime.eval(_COMPLETE)(
                engine._lua, codec.pack, codec.unpack, self.info)
        except Exception as exc:  # noqa: BLE001  (any shape this fakeredis has)
            self._tcp.server_close()
            raise FakesUnavailable(f"fakeredis {fakeredis.__version__}: its Lua runtime could "
                                   f"not be completed for redlockdlm ({exc})") from None
        finally:
            client.close()
        if not ok:
            self._tcp.server_close()
            raise FakesUnavailable(f"fakeredis {fakeredis.__version__}: its Functions runtime "
                                   "is not the one redlockdlm.testing knows how to complete")
        self._thread: threading.Thread | None = threading.Thread(target=self._tcp.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name=f"redlockdlm-fake-{self.port}")
        self._thread.start()

    def client(self) -> Any:
        """A fakeredis.FakeRedis on this instance's data (no TCP)."""
        fakeredis, _ = _fakeredis()
        return fakeredis.FakeRedis(server=self.server)

    def stop(self) -> None:
        """Stop serving and close every connection to it (idempotent)."""
        if self._thread is not None:
            self._tcp.shutdown()
            self._tcp.server_close()
            self._thread.join(5)
            self._thread = None


class FakeCluster:
    """`n` fake instances, brand new and marked so (`init fresh`, rule E1, storing
    `rejoin_ms`): a DLM on `urls` grants at once, with leases up to `rejoin_ms`.

        with FakeCluster(3) as cluster:
            dlm = DLM(cluster.urls, "ns")

    Instances are independent (their own data, clock and run_id), as real ones are."""

    def __init__(self, n: int = 3, *, rejoin_ms: int = DEFAULT_REJOIN_MS) -> None:
        self.n = check_int("n", n, 1, 99)
        if self.n % 2 == 0:
            raise InvalidArgument(f"n must be odd (a majority of the instances is the "
                                  f"quorum), got {n}")
        self.rejoin_ms = check_int("rejoin_ms", rejoin_ms, 0, 86_400_000)
        self.instances: list[FakeInstance] = []

    @property
    def urls(self) -> list[str]:
        """The instances' redis:// URLs (empty until `start`)."""
        return [i.url for i in self.instances]

    def start(self) -> FakeCluster:
        """Start the instances and mark each fresh. Raises FakesUnavailable without
        fakeredis and lupa; anything started is stopped again if a later one fails."""
        from .engine.instance import Engine

        try:
            while len(self.instances) < self.n:
                inst = FakeInstance()
                self.instances.append(inst)
                client = inst.client()
                try:
                    Engine(client).init_fresh(self.rejoin_ms)
                finally:
                    client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every instance (idempotent)."""
        while self.instances:
            self.instances.pop().stop()

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def fake_dlm(n: int = 3, namespace: str = "default", **options: Any) -> Iterator[Any]:
    """A `redlockdlm.DLM` on `n` fresh fake instances of its own, closed (its locks
    released) and the instances stopped on exit. `options` go to DLM (lease_ms, owner,
    ...). For several clients on one set of instances use `FakeCluster`."""
    from .client import DLM

    with FakeCluster(n) as cluster, DLM(cluster.urls, namespace, **options) as dlm:
        yield dlm


@contextlib.asynccontextmanager
async def fake_async_dlm(n: int = 3, namespace: str = "default",
                         **options: Any) -> AsyncIterator[Any]:
    """As `fake_dlm`, an `redlockdlm.AsyncDLM` (``async with fake_async_dlm() as dlm``)."""
    from .aio import AsyncDLM

    with FakeCluster(n) as cluster:
        async with AsyncDLM(cluster.urls, namespace, **options) as dlm:
            yield dlm
