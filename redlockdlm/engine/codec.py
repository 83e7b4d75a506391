"""Arguments and replies of the scripts: pure functions, no I/O.

Shared by the single-instance `Engine`, the quorum client and the CLI, so every caller
builds the same ARGV and reads replies the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import InvalidArgument, InvalidType, ProtocolError
from .modes import Mode, Status

NONE = -1


def _s(v: int, what: str = "an integer argument") -> bytes:
    """An int argument as ARGV bytes. Strict: a bool, float or numeric string is a caller's
    mistake (InvalidType), never silently truncated; the range is the script's to check."""
    if type(v) is int:  # the common case, first: b"%d" is the same digits as str(), faster
        return b"%d" % v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(int(v)).encode()
    raise InvalidType(f"{what} must be an int, not {type(v).__name__}")


def _t(v: str, what: str) -> bytes:
    """A str argument (owner, lock id, reason) as UTF-8; its syntax is the script's to check."""
    if not isinstance(v, str):
        raise InvalidType(f"{what} must be a str, not {type(v).__name__}")
    try:
        return v.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {v!r} is not encodable as UTF-8") from None


def _b(v: bytes, what: str) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise InvalidType(f"{what} must be bytes, not {type(v).__name__}")


def _value(v: bytes | None) -> tuple[bytes, bytes]:
    """(write flag, value) of an optional value block."""
    return (b"0", b"") if v is None else (b"1", _b(v, "a value block"))


def as_mode(mode: object) -> Mode:
    """Accept a Mode, an int 0..5 or a mode name ('EX'); raise a typed error otherwise."""
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, bool):
        raise InvalidType("mode must be a Mode, not a bool")
    if isinstance(mode, int):
        try:
            return Mode(mode)
        except ValueError:
            raise InvalidArgument(f"mode {mode} is not 0..5 (NL CR CW PR PW EX)") from None
    if isinstance(mode, str):
        try:
            return Mode[mode.upper()]
        except KeyError:
            raise InvalidArgument(f"unknown mode {mode!r}; use NL CR CW PR PW EX") from None
    raise InvalidType(f"mode must be a Mode, int or str, not {type(mode).__name__}")


def _mode_or_none(v: int) -> Mode | None:
    return None if v == NONE else Mode(v)


# Replies are parsed by dict lookups (an Enum call costs ~10x more); an unknown code is a
# KeyError, reported as a ProtocolError like the ValueError of Mode(9).
_STATUS = {int(s): s for s in Status}
_MODE = {int(m): m for m in Mode}
_MODE_OR_NONE = {NONE: None, **_MODE}


@dataclass(frozen=True, slots=True)
class Blocker:
    owner: str
    lock_id: str
    mode: Mode


class LockReply(NamedTuple):
    """One instance's answer about one lock. Immutable. A named tuple rather than a frozen
    dataclass: built by one C call (`parse_lock_reply`), where the dataclass's `__init__`
    cost ~21 k instructions, as much as the rest of the parse (docs/performance.md)."""

    status: Status
    epoch: str
    mode: Mode | None  #: granted mode (None while waiting as a new request)
    token: int  #: fencing token of the current grant on this instance
    position: int  #: place in the wait or conversion queue (0 = first), -1 if none
    value: bytes | None  #: value block (granted in CR or stronger)
    version: int
    valid: bool  #: False after a PW/EX holder expired or was broken (V4)
    wait_ms: int  #: ms until the earliest lease of a lock ahead expires; -1 if none
    #: RECOVERING: ms to wait; RELEASED: locks released; QUEUED: the resource's fencing
    #: sequence (a grant made after this reply has a larger token)
    extra: int
    blockers_count: int
    blockers: tuple[Blocker, ...]
    #: V5: this instance restarted empty and may have forgotten a newer value
    forgotten: bool = False


def _str(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


_new = tuple.__new__


# The lock reply's layout is written once, in lua/lib/core.lua (R_STATUS .. R_NBLOCKERS,
# R_LEN, beside `reply`): _LOCK_REPLY_LEN head fields, unpacked below in that order (status,
# epoch, mode, token, position, value, version, invalid, wait_ms, extra, nblockers), then
# _BLOCKER_FIELDS per blocker reported (owner, id, mode) or, after a break, _BROKEN_FIELDS
# per lock broken (lua/break.lua). The short forms of the common outcomes (`short`,
# `granted_reply` there), told apart by their length, leave the other fields at their
# defaults: 3 = (status, epoch, extra); 4 = (status, epoch, mode, token), granted at
# position 0 without a value block; 7 = the 4 and (value, version, invalid).
_LOCK_REPLY_LEN = 11  # R_LEN
_BLOCKER_FIELDS = 3
_BROKEN_FIELDS = 7


def _short_reply(raw: list) -> LockReply:
    n = len(raw)
    if n == 4:
        status, epoch, mode, token = raw
        value, version, invalid, position, extra = None, 0, 0, 0, 0
    elif n == 3:
        status, epoch, extra = raw
        mode, token, value, version, invalid, position = NONE, 0, None, 0, 0, -1
    elif n == 7:
        status, epoch, mode, token, value, version, invalid = raw
        position, extra = 0, 0
    else:
        raise ValueError(f"a lock reply of {n} fields")
    return _new(LockReply, (
        _STATUS[int(status)], epoch.decode() if type(epoch) is bytes else str(epoch),
        _MODE_OR_NONE[int(mode)], int(token), position, value, int(version),
        not int(invalid), -1, int(extra), 0, (), invalid == 2 or invalid == b"2"))


def parse_lock_reply(raw: list) -> LockReply:
    try:
        if len(raw) < _LOCK_REPLY_LEN:  # a short form (the fast path's)
            return _short_reply(raw)
        if len(raw) == _LOCK_REPLY_LEN:  # no blockers
            (status, epoch, mode, token, position, value, version, invalid, wait_ms, extra,
             nblockers) = raw
            blockers: tuple[Blocker, ...] = ()
        else:
            (status, epoch, mode, token, position, value, version, invalid, wait_ms, extra,
             nblockers) = raw[:_LOCK_REPLY_LEN]
            blockers = tuple(
                Blocker(_str(raw[i]), _str(raw[i + 1]), _MODE[int(raw[i + 2])])
                for i in range(_LOCK_REPLY_LEN, len(raw), _BLOCKER_FIELDS)
            )
        return _new(LockReply, (
            _STATUS[int(status)],
            epoch.decode() if type(epoch) is bytes else str(epoch),
            _MODE_OR_NONE[int(mode)], int(token), int(position), value, int(version),
            not int(invalid), int(wait_ms), int(extra), int(nblockers), blockers,
            invalid == 2 or invalid == b"2"))  # V5: forgotten
    except (IndexError, TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"unexpected lock reply {raw!r}") from exc


class BrokenLock(NamedTuple):
    """One lock an operator's break removed from one instance (H4)."""

    key: bytes
    name: bytes  #: the resource's path, names joined by NUL (as in ResourceView.name)
    lock_id: str
    owner: str
    mode: Mode | None  #: granted mode (None while waiting as a new request)
    requested: Mode | None
    queue: str  #: 'G', 'C' or 'W': where it was

    @property
    def path(self) -> tuple[bytes, ...]:
        return tuple(self.name.split(b"\x00")) if self.name else ()


class BreakReply(NamedTuple):
    """An instance's answer to a break: status RELEASED, `extra` the number of locks broken,
    `broken` each of them in the order they went (children first, depth first)."""

    status: Status
    epoch: str
    extra: int
    broken: tuple[BrokenLock, ...]


def parse_break_reply(raw: list) -> BreakReply:
    try:
        head = parse_lock_reply(raw[:_LOCK_REPLY_LEN])
        tail = raw[_LOCK_REPLY_LEN:]
        if len(tail) % _BROKEN_FIELDS:
            raise ValueError("break reply tail is not 7 fields per lock")
        broken = tuple(BrokenLock(tail[i], tail[i + 1] or b"", _str(tail[i + 2]),
                                  _str(tail[i + 3]), _MODE_OR_NONE[int(tail[i + 4])],
                                  _MODE_OR_NONE[int(tail[i + 5])], _str(tail[i + 6]))
                       for i in range(0, len(tail), _BROKEN_FIELDS))
        return BreakReply(head.status, head.epoch, head.extra, broken)
    except (IndexError, TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"unexpected break reply {raw!r:.200}") from exc


@dataclass(frozen=True, slots=True)
class RenewEntry:
    status: Status
    mode: Mode | None
    token: int
    position: int
    wait_ms: int


def parse_renew_reply(raw: list) -> tuple[str, list[RenewEntry]]:
    try:
        epoch = _str(raw[0])
        out = []
        for i in range(1, len(raw), 5):
            out.append(RenewEntry(_STATUS[int(raw[i])], _MODE_OR_NONE[int(raw[i + 1])],
                                  int(raw[i + 2]), int(raw[i + 3]), int(raw[i + 4])))
        return epoch, out
    except (IndexError, TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"unexpected renew reply {raw!r}") from exc


@dataclass(frozen=True, slots=True)
class LockView:
    queue: str  #: 'G' granted, 'C' converting, 'W' waiting
    lock_id: str
    owner: str
    mode: Mode | None
    requested: Mode | None
    flags: int
    ticket: int
    cticket: int
    lease_left_ms: int
    parent: str
    token: int
    previous: Mode | None
    kids: tuple[tuple[bytes, str], ...]
    priority: int = 0  #: of the lock's latest request or conversion (P1)


@dataclass(frozen=True, slots=True)
class ResourceView:
    key: bytes
    name: bytes
    seq: int
    value: bytes | None
    version: int
    valid: bool
    locks: tuple[LockView, ...]
    forgotten: bool = False  #: V5

    @property
    def path(self) -> tuple[bytes, ...]:
        return tuple(self.name.split(b"\x00")) if self.name else ()


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    epoch: str | None
    now_ms: int
    recovering_ms: int
    #: the instance's rejoin wait (E1) stored in its epoch hash; None: none stored
    rejoin_ms: int | None = None
    #: `init hello` only: the server's run_id and maxmemory-policy (None otherwise)
    run_id: str | None = None
    maxmemory_policy: str | None = None


def _opt(raw: list, i: int) -> object:
    return raw[i] if len(raw) > i and raw[i] is not None else None


def parse_status(raw: list) -> InstanceStatus:
    try:
        rejoin, run, policy = _opt(raw, 3), _opt(raw, 4), _opt(raw, 5)
        return InstanceStatus(None if raw[0] is None else _str(raw[0]), int(raw[1]),
                              int(raw[2]), None if rejoin is None else int(rejoin),
                              None if run is None else _str(run),
                              None if policy is None else _str(policy))
    except (IndexError, TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"unexpected status reply {raw!r:.200}") from exc


def parse_inspect(keys: list[bytes], raw: list) -> tuple[InstanceStatus, list[ResourceView | None]]:
    try:
        return _parse_inspect(keys, raw)
    except (IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"unexpected inspect reply {raw!r:.200}") from exc


def _parse_inspect(keys: list[bytes], raw: list
                   ) -> tuple[InstanceStatus, list[ResourceView | None]]:
    st = parse_status(raw[:3])
    out: list[ResourceView | None] = []
    for key, item in zip(keys, raw[3:]):
        if item is None:
            out.append(None)
            continue
        locks = []
        for lk in item[5:]:
            kids = tuple((lk[i], _str(lk[i + 1])) for i in range(13, len(lk), 2))
            locks.append(LockView(_str(lk[0]), _str(lk[1]), _str(lk[2]),
                                  _mode_or_none(int(lk[3])), _mode_or_none(int(lk[4])),
                                  int(lk[5]), int(lk[6]), int(lk[7]), int(lk[8]), _str(lk[9]),
                                  int(lk[10]), _mode_or_none(int(lk[11])), kids,
                                  int(lk[12])))
        out.append(ResourceView(key, item[0] or b"", int(item[1]), item[2], int(item[3]),
                                not int(item[4]), tuple(locks), int(item[4]) == 2))
    return st, out


# ----------------------------------------------------------------- ARGV builders
# Every argument is type-checked here (InvalidType / InvalidArgument, nothing sent): the
# Engine and the quorum client both build their ARGV with these.

# The hot builders first try a fast path: when every argument has its usual exact type,
# one chained type test and direct encoding (~4 k instructions instead of ~19 k for ten
# checking calls); anything else, or a str that is not UTF-8, takes the checked path, which
# raises the typed error naming the argument.
_INTS = frozenset((int, Mode))  # exact types: a bool is never an int argument


def request_args(rejoin_ms: int, chan: bytes, owner: str, lock_id: str, mode: int, flags: int,
                 ticket: int, lease_ms: int, parent_id: str, name: bytes,
                 priority: int = 0) -> list[bytes]:
    if (type(owner) is str and type(lock_id) is str and type(parent_id) is str
            and type(chan) is bytes and type(name) is bytes and type(rejoin_ms) is int
            and type(ticket) is int and type(lease_ms) is int and type(flags) is int
            and type(priority) is int and type(mode) in _INTS):
        try:
            out = [b"%d" % rejoin_ms, chan, owner.encode(), lock_id.encode(), b"%d" % mode,
                   b"%d" % flags, b"%d" % ticket, b"%d" % lease_ms, parent_id.encode(), name]
            if priority:  # (P1: an absent priority is 0; one argument less to send and read)
                out.append(b"%d" % priority)
            return out
        except UnicodeEncodeError:
            pass
    out = [_s(rejoin_ms, "rejoin_ms"), _b(chan, "channel prefix"), _t(owner, "owner"),
           _t(lock_id, "lock id"), _s(mode, "mode"), _s(flags, "flags"), _s(ticket, "ticket"),
           _s(lease_ms, "lease_ms"), _t(parent_id, "parent id"), _b(name, "resource name")]
    p = _s(priority, "priority")
    if p != b"0":
        out.append(p)
    return out


def convert_args(rejoin_ms: int, chan: bytes, owner: str, lock_id: str, mode: int, flags: int,
                 cticket: int, lease_ms: int, value: bytes | None, version: int, vbmax: int,
                 floor: int, priority: int = 0) -> list[bytes]:
    if (value is None and type(owner) is str and type(lock_id) is str and type(chan) is bytes
            and type(rejoin_ms) is int and type(flags) is int and type(cticket) is int
            and type(lease_ms) is int and type(version) is int and type(vbmax) is int
            and type(floor) is int and type(priority) is int and type(mode) in _INTS):
        try:
            return [b"%d" % rejoin_ms, chan, owner.encode(), lock_id.encode(), b"%d" % mode,
                    b"%d" % flags, b"%d" % cticket, b"%d" % lease_ms, b"0", b"",
                    b"%d" % version, b"%d" % vbmax, b"%d" % floor, b"%d" % priority]
        except UnicodeEncodeError:
            pass
    return [_s(rejoin_ms, "rejoin_ms"), _b(chan, "channel prefix"), _t(owner, "owner"),
            _t(lock_id, "lock id"), _s(mode, "mode"), _s(flags, "flags"),
            _s(cticket, "ticket"), _s(lease_ms, "lease_ms"), *_value(value),
            _s(version, "version"), _s(vbmax, "vbmax"), _s(floor, "floor"),
            _s(priority, "priority")]


def release_args(rejoin_ms: int, chan: bytes, owner: str, lock_id: str, flags: int,
                 value: bytes | None, version: int, vbmax: int, floor: int) -> list[bytes]:
    if (value is None and type(owner) is str and type(lock_id) is str and type(chan) is bytes
            and type(rejoin_ms) is int and type(flags) is int and type(version) is int
            and type(vbmax) is int and type(floor) is int):
        try:
            return [b"%d" % rejoin_ms, chan, owner.encode(), lock_id.encode(), b"%d" % flags,
                    b"0", b"", b"%d" % version, b"%d" % vbmax, b"%d" % floor]
        except UnicodeEncodeError:
            pass
    return [_s(rejoin_ms, "rejoin_ms"), _b(chan, "channel prefix"), _t(owner, "owner"),
            _t(lock_id, "lock id"), _s(flags, "flags"), *_value(value),
            _s(version, "version"), _s(vbmax, "vbmax"), _s(floor, "floor")]


def cancel_args(rejoin_ms: int, chan: bytes, owner: str, lock_id: str, reason: str,
                notify: bool) -> list[bytes]:
    return [_s(rejoin_ms, "rejoin_ms"), _b(chan, "channel prefix"), _t(owner, "owner"),
            _t(lock_id, "lock id"), _t(reason, "reason"), b"1" if notify else b"0"]


def yield_args(rejoin_ms: int, chan: bytes, owner: str, lock_id: str) -> list[bytes]:
    return [_s(rejoin_ms, "rejoin_ms"), _b(chan, "channel prefix"), _t(owner, "owner"),
            _t(lock_id, "lock id")]


def renew_args(rejoin_ms: int, chan: bytes, owner: str, lease_ms: int,
               items: list[tuple[str, int]]) -> list[bytes]:
    out = [_s(rejoin_ms, "rejoin_ms"), _b(chan, "channel prefix"), _t(owner, "owner"),
           _s(lease_ms, "lease_ms")]
    for lock_id, floor in items:
        out += [_t(lock_id, "lock id"), _s(floor, "floor")]
    return out


def break_args(rejoin_ms: int, chan: bytes, lock_id: str, owner: str) -> list[bytes]:
    return [_s(rejoin_ms, "rejoin_ms"), _b(chan, "channel prefix"), _t(lock_id, "lock id"),
            _t(owner, "owner")]


# ----------------------------------------------------------------- events

class Event(NamedTuple):
    """A message on an owner's channel (N1-N3). (A named tuple, as `LockReply`: immutable,
    and built in a fraction of a frozen dataclass's time, three per contended grant.)"""

    kind: str  #: 'G' granted, 'B' blocking, 'C' cancelled/broken
    lock_id: str
    mode: Mode | None = None  #: G: granted mode; B: the blocked request's mode
    token: int = 0
    version: int = 0
    valid: bool = True
    value: bytes | None = None
    ticket: int = 0  #: B: the blocked request's ticket
    other: str = ""  #: B: the blocked lock's id
    reason: str = ""  #: C: cancel, deadlock or broken
    forgotten: bool = False  #: G: V5


def parse_event(data: bytes) -> Event:
    kind = data[:1]
    try:
        if kind == b"G":
            _, lid, gr, tok, vv, vi, hasv, value = data.split(b"|", 7)
            return _new(Event, ("G", lid.decode(), _MODE[int(gr)], int(tok), int(vv),
                                vi == b"0", value if hasv == b"1" else None, 0, "", "",
                                vi == b"2"))
        if kind == b"B":
            _, lid, rq, ticket, other = data.split(b"|", 4)
            return _new(Event, ("B", lid.decode(), _MODE[int(rq)], 0, 0, True, None,
                                int(ticket), other.decode(), "", False))
        if kind == b"C":
            _, lid, reason = data.split(b"|", 2)
            return _new(Event, ("C", lid.decode(), None, 0, 0, True, None, 0, "",
                                reason.decode(), False))
    except (ValueError, KeyError) as exc:
        raise ProtocolError(f"unexpected event {data!r}") from exc
    raise ProtocolError(f"unexpected event {data!r}")
