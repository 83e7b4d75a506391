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


# ----------------------------------------------------------------- Redis Cluster members (H2c)
#
# A quorum member that is a Redis Cluster keeps the standalone layout's three per-instance
# names once per hash slot, so that every script touches the keys (and the shard channel) of
# ONE slot: the epoch, the waiter index and the event channels of slot s carry the hash tag
# `{<slot_tag(s)>}`, the canonical tag of slot s below. A tree `dlm:{<ns>:<root>}` in slot s
# uses `dlm:epoch:{T}`, `dlm:<ns>:waiters:{T}` and channels `dlm:<ns>:ch:{T}:<owner>`, T =
# slot_tag(s). A standalone member keeps `dlm:epoch`, `dlm:<ns>:waiters`, `dlm:<ns>:ch:<owner>`.

SLOTS = 16384


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of `key` (CRC16 of its hash tag, mod 16384)."""
    from redis.crc import key_slot as _slot

    return _slot(key)


_TAGS: list[bytes] | None = None


def slot_tag(slot: int) -> bytes:
    """The canonical hash tag of `slot`: the smallest decimal number whose slot it is. One
    tag per slot, the same in every client (so one epoch per slot, never two); computed once
    per process (about 110,000 CRC16s, ~50 ms)."""
    global _TAGS
    if _TAGS is None:
        from redis.crc import key_slot as _slot

        tags: list[bytes | None] = [None] * SLOTS
        left, j = SLOTS, 0
        while left:
            t = b"%d" % j
            s = _slot(t)
            if tags[s] is None:
                tags[s] = t
                left -= 1
            j += 1
        _TAGS = tags  # type: ignore[assignment]
    if not 0 <= slot < SLOTS:
        raise InvalidArgument(f"a hash slot is 0..{SLOTS - 1}, got {slot}")
    return _TAGS[slot]  # type: ignore[index]


def epoch_key(slot: int | None = None) -> bytes:
    """The epoch hash: `dlm:epoch` on a standalone member (slot None), `dlm:epoch:{T}` for
    hash slot `slot` of a cluster member."""
    if slot is None:
        return EPOCH_KEY
    return EPOCH_KEY + b":{" + slot_tag(slot) + b"}"


def slot_waiters_key(namespace: bytes, slot: int | None = None) -> bytes:
    """The waiter index of `namespace` (standalone, slot None) or of one hash slot of it."""
    if slot is None:
        return waiters_key(namespace)
    return waiters_key(namespace) + b":{" + slot_tag(slot) + b"}"


def slot_channel_prefix(namespace: bytes, slot: int | None = None) -> bytes:
    """Events for owner O go to this prefix + O: `dlm:<ns>:ch:` standalone, and the shard
    channel `dlm:<ns>:ch:{T}:` (SPUBLISH, SSUBSCRIBE) for hash slot `slot` of a cluster."""
    if slot is None:
        return channel_prefix(namespace)
    return channel_prefix(namespace) + b"{" + slot_tag(slot) + b"}:"
