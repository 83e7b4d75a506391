"""The server-side Lua code: assembling, loading and invoking it (one place decides how).

Every script is one file `lua/<name>.lua`; `lua/lib/core.lua` holds the code they share.
They reach an instance as ONE Redis Functions library (Redis >= 7.0), assembled here:

    #!lua name=redlockdlm_<hash>
    local register = redis.register_function
    local KEYS, ARGV                      -- set by every call (core.lua `call`)
    <lua/lib/core.lua>
    local function script_<name>() <lua/<name>.lua> end      -- for each script
    register('dlm_<hash>_<name>', function(keys, args)
      return call(script_<name>, keys, args) end)              -- for each script

so the ~50 functions of core.lua are defined once, at FUNCTION LOAD, instead of on every
call as with EVAL (where the whole chunk runs each time). `<hash>` is derived from the
library's source: an instance that holds another version of redlockdlm (a rolling upgrade)
never runs this version's calls with that code, and versions can coexist on one instance.

The contract every caller follows (the Engine here, the quorum client, pipelined or not):

- send `command(name, keys, args)` (FCALL of the library's function), or the same packed
  as RESP by `packed_command(name, keys, args)` for a connection's `send_packed_command`;
- an error reply for which `is_missing(error)` is true ("ERR Function not found": the
  instance restarted with an empty data set, or FUNCTION FLUSH) means that call did nothing
  at all. Send `load_command()` (FUNCTION LOAD REPLACE of the library; `ensure_loaded(client)`
  does it), then the same `command(...)` again - both may go in one pipeline, the load
  first. In a pipeline every FCALL that met the missing library got this error and did
  nothing, so resend exactly those (the other replies stand). Loading is idempotent and safe
  to race with other clients; do not send it before every call (it carries the whole
  library), and give up after a retry or two (an instance restarting in a loop);
- where FUNCTION LOAD is refused (an ACL without +function), send `fallback(name, keys,
  args)` instead: an EVAL of the same code, needing nothing loaded, with the same reply and
  effects, only slower.

`redlockdlm.wire.Round` is this decision, once and without I/O: every transport (the
quorum clients, `engine.instance.call_script`, the detector's pipelined scan) only writes
what it asks and feeds the replies back.

Any other error reply is the script's own (`DLM_*`, see `redlockdlm.errors`) or a real
failure; a script either applies whole or not at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SCRIPT_NAMES = ("request", "convert", "release", "cancel", "yield", "renew", "break",
                "inspect", "scan", "init")
_MISSING = "Function not found"


def _lua_dir() -> Path:
    """`redlockdlm/_lua` in an installed wheel, or `lua/` of a source checkout."""
    pkg = Path(__file__).resolve().parents[1]
    for d in (pkg / "_lua", pkg.parent / "lua"):
        if (d / "request.lua").is_file():
            return d
    raise FileNotFoundError("the redlockdlm Lua scripts are not installed")


@dataclass(frozen=True)
class Script:
    """The EVAL form of one script (the fallback): self-contained source and its SHA1."""

    name: str
    source: bytes
    sha: str


@dataclass(frozen=True)
class Library:
    """The Functions library: its name, source and each script's function name."""

    name: str
    source: bytes
    functions: dict[str, bytes]


def _wrapped(name: str, body: bytes) -> bytes:
    return (b"local function script_" + name.encode() + b"()\n" + body.rstrip(b"\n")
            + b"\nend\n")


@cache
def _core() -> bytes:
    return (_lua_dir() / "lib" / "core.lua").read_bytes()


@cache
def _body(name: str) -> bytes:
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    return (_lua_dir() / f"{name}.lua").read_bytes()


@cache
def library() -> Library:
    """The library holding every script, named after a hash of its source."""
    parts = [_core()] + [_wrapped(n, _body(n)) for n in SCRIPT_NAMES]
    digest = hashlib.sha1(b"\n".join(parts)).hexdigest()[:16]
    lib = f"redlockdlm_{digest}"
    functions = {n: f"dlm_{digest}_{n}".encode() for n in SCRIPT_NAMES}
    reg = [b"register('" + functions[n] + b"', function(keys, args) "
           b"return call(script_" + n.encode() + b", keys, args) end)\n" for n in SCRIPT_NAMES]
    source = (f"#!lua name={lib}\n".encode()
              + b"local register = redis.register_function\nlocal KEYS, ARGV\n"
              + b"\n".join(parts) + b"".join(reg))
    return Library(lib, source, functions)


@cache
def load(name: str) -> Script:
    """The EVAL form of script `name` (core.lua, the script, a call of it), and its SHA1.
    `register` is nil there: core.lua tells the forms apart by it (E2 is checked by the
    library only, which keeps state between calls)."""
    body = (b"local KEYS, ARGV = KEYS, ARGV\nlocal register = nil\n" + _core() + b"\n"
            + _wrapped(name, _body(name))
            + b"return call(script_" + name.encode() + b", KEYS, ARGV)\n")
    return Script(name, body, hashlib.sha1(body).hexdigest())


def all_scripts() -> dict[str, Script]:
    return {n: load(n) for n in SCRIPT_NAMES}


def command(name: str, keys: list[bytes], args: list[bytes]) -> tuple:
    """The Redis command that runs script `name` (FCALL of the library's function). Every
    caller that talks to an instance, pipelined or not, builds its commands here, so how
    scripts are invoked is decided in one place."""
    return ("FCALL", library().functions[name], len(keys), *keys, *args)


class _BulkHeads(dict):
    """len -> b"$<len>" (the RESP bulk string header), filled on first use."""

    def __missing__(self, n: int) -> bytes:
        head = self[n] = b"$%d" % n
        return head


_HEADS = _BulkHeads()
_head = _HEADS.__getitem__
_PREFIX: dict[tuple[str, int, int], bytes] = {}


def packed_command(name: str, keys: list[bytes], args: list[bytes]) -> bytes:
    """`command(name, keys, args)` as the bytes redis-py would send (RESP2 array of bulk
    strings), for `send_packed_command`. Keys and args must be bytes. The constant part
    (FCALL, function name, key count) is packed once per (script, number of keys, number of
    args); the rest by C-level joins, about a third of redis-py's generic packer's cost."""
    nk = len(keys)
    na = len(args)
    prefix = _PREFIX.get((name, nk, na))
    if prefix is None:
        fname = library().functions[name]
        count = b"%d" % nk
        prefix = _PREFIX[(name, nk, na)] = b"*%d\r\n$5\r\nFCALL\r\n$%d\r\n%b\r\n$%d\r\n%b" % (
            3 + nk + na, len(fname), fname, len(count), count)
    items = [*keys, *args]
    out = [prefix] * (2 * (nk + na) + 2)
    try:
        out[1:-1:2] = map(_head, map(len, items))
        out[2:-1:2] = items
        out[-1] = b""
        return b"\r\n".join(out)
    except TypeError:  # not all bytes: encode as redis-py would (str as UTF-8, int as digits)
        return packed_command(name, [_encode(k) for k in keys], [_encode(a) for a in args])


def _encode(v: object) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(v).encode()
    raise TypeError(f"a script argument must be bytes, str, int or float, not "
                    f"{type(v).__name__}")


def fallback(name: str, keys: list[bytes], args: list[bytes]) -> tuple:
    """A command with the same effect and reply as `command(...)` that needs nothing loaded
    on the instance (EVAL of the script's source): for an instance that answered
    `is_missing` and where the library cannot be loaded."""
    s = load(name)
    return ("EVAL", s.source, len(keys), *keys, *args)


def load_command() -> tuple:
    """The command that loads the library (idempotent: REPLACE of the same code)."""
    return ("FUNCTION", "LOAD", "REPLACE", library().source)


def ensure_loaded(client) -> None:
    """Load the library on `client`'s instance (a redis.Redis or anything with a
    compatible `execute_command`). Cheap to repeat; call it after `is_missing`."""
    client.execute_command(*load_command())


def is_missing(error: object) -> bool:
    """True if an error reply (exception, str or bytes) means the instance does not have
    the library: load it (`load_command`) and send the command again."""
    if isinstance(error, (bytes, bytearray)):
        error = bytes(error).decode("utf-8", "replace")
    msg = str(error)
    if msg.startswith("ERR "):
        msg = msg[4:]
    return msg.startswith(_MISSING)
