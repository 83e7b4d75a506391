"""Key, channel and name conventions shared by every instance (rule H2).

Keys of one resource tree share one Redis Cluster hash slot: the hash tag is the namespace
and the root resource, ``dlm:{<ns>:<root>}``; a child's key extends its parent's with
``/<name>``. Inside the tag ``%``, ``{``, ``}`` and ``/`` are escaped so no name can end the
tag early or collide with another tree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InvalidArgument, InvalidType

EPOCH_KEY = b"dlm:epoch"
MAX_NAME_BYTES = 1024
MAX_DEPTH = 16

_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def check_namespace(namespace: str) -> bytes:
    """Return the namespace as bytes; raise InvalidArgument unless it is 1..64 of [A-Za-z0-9_.-]."""
    if not isinstance(namespace, str):
        raise InvalidType(f"namespace must be a str, not {type(namespace).__name__}")
    if not _NAMESPACE.fullmatch(namespace):
        raise InvalidArgument(f"namespace {namespace!r} must be 1..64 characters of [A-Za-z0-9_.-]")
    return namespace.encode()


def check_id(what: str, value: str) -> str:
    """Lock ids and owners: 1..64 characters of [A-Za-z0-9_.:-]."""
    if not isinstance(value, str):
        raise InvalidType(f"{what} must be a str, not {type(value).__name__}")
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r} must be 1..64 characters of [A-Za-z0-9_.:-]")
    return value


def check_name(name: str | bytes) -> bytes:
    """A resource name: str (UTF-8) or bytes, 1..1024 bytes, no NUL byte."""
    if isinstance(name, str):
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"resource name {name!r} is not encodable as UTF-8") from exc
    elif isinstance(name, (bytes, bytearray, memoryview)):
        raw = bytes(name)
    else:
        raise InvalidType(f"resource name must be str or bytes, not {type(name).__name__}")
    if not 0 < len(raw) <= MAX_NAME_BYTES:
        raise InvalidArgument(f"resource name must be 1..{MAX_NAME_BYTES} bytes, got {len(raw)}")
    if b"\x00" in raw:
        raise InvalidArgument("resource name must not contain a NUL byte")
    return raw


def _esc(raw: bytes) -> bytes:
    return (
        raw.replace(b"%", b"%25").replace(b"{", b"%7B").replace(b"}", b"%7D").replace(b"/", b"%2F")
    )


def resource_key(namespace: bytes, path: Sequence[bytes]) -> bytes:
    """The key of the resource at `path` (root first), names already checked."""
    if not path or len(path) > MAX_DEPTH:
        raise InvalidArgument(f"a resource path has 1..{MAX_DEPTH} names")
    key = b"dlm:{" + namespace + b":" + _esc(path[0]) + b"}"
    for part in path[1:]:
        key += b"/" + _esc(part)
    return key


def parent_key(key: bytes) -> bytes | None:
    """The resource key of a child's parent (H2: a child's key extends its parent's with
    ``/<escaped name>``; ``/`` inside the hash tag is escaped), or None for a root."""
    slash = key.rfind(b"/")
    return key[:slash] if slash > key.find(b"}") else None


def display_name(path: Sequence[bytes]) -> bytes:
    """What the database stores as the resource's name: the path joined by NUL."""
    return b"\x00".join(path)


def show_name(path: Sequence[bytes]) -> str:
    """A resource path for people: components joined by ' / ', root first (bytes that are
    not UTF-8 shown as backslash escapes). Every message and view naming a resource uses it."""
    return " / ".join(p.decode("utf-8", "backslashreplace") for p in path)


def waiters_key(namespace: bytes) -> bytes:
    """The waiter index read by the deadlock detector (one zset per namespace)."""
    return b"dlm:" + namespace + b":waiters"


def channel_prefix(namespace: bytes) -> bytes:
    """Events for owner O are published on channel_prefix + O."""
    return b"dlm:" + namespace + b":ch:"
