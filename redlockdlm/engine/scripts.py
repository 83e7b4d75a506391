"""The server-side Lua scripts: loading, SHA1 and calling with a NOSCRIPT fallback.

Each script is `lua/lib/core.lua` followed by the script's own file. With N independent
instances each may have restarted and forgotten a script, so every call goes by SHA and falls
back to sending the source on NOSCRIPT, per instance (redis-py `Script` does the same).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SCRIPT_NAMES = ("request", "convert", "release", "cancel", "yield", "renew", "break",
                "inspect", "init")
_STANDALONE = ("inspect", "init")  # read-only or epoch-only: no core needed


def _lua_dir() -> Path:
    """`redlockdlm/_lua` in an installed wheel, or `lua/` of a source checkout."""
    pkg = Path(__file__).resolve().parents[1]
    for d in (pkg / "_lua", pkg.parent / "lua"):
        if (d / "request.lua").is_file():
            return d
    raise FileNotFoundError("the redlockdlm Lua scripts are not installed")


@dataclass(frozen=True)
class Script:
    name: str
    source: bytes
    sha: str


@cache
def load(name: str) -> Script:
    """The script `name` with core.lua prepended, and its SHA1."""
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    d = _lua_dir()
    body = (d / f"{name}.lua").read_bytes()
    if name not in _STANDALONE:
        body = (d / "lib" / "core.lua").read_bytes() + b"\n" + body
    return Script(name, body, hashlib.sha1(body).hexdigest())


def all_scripts() -> dict[str, Script]:
    return {n: load(n) for n in SCRIPT_NAMES}


def command(name: str, keys: list[bytes], args: list[bytes]) -> tuple:
    """The Redis command that runs script `name` (by SHA). Every caller that talks to an
    instance, pipelined or not, builds its commands here, so how scripts are invoked is
    decided in one place."""
    s = load(name)
    return ("EVALSHA", s.sha, len(keys), *keys, *args)


def fallback(name: str, keys: list[bytes], args: list[bytes]) -> tuple:
    """The command to send after the instance answered NOSCRIPT (it restarted or flushed)."""
    s = load(name)
    return ("EVAL", s.source, len(keys), *keys, *args)
