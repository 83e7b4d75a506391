"""Pure-Python reference model of one instance's lock database (docs/design.md §5, the
rules of docs/rules.md), a test oracle: not part of the shipped package.

It implements the same rules as the Lua scripts in `lua/`, written for clarity rather than
speed, and is driven side by side with them by the property-based tests
(`tests/engine/test_model_vs_lua.py`), which compare the full state after every step. Rule ids
(G1, H1, V3, ...) refer to `docs/rules.md`.

Time is explicit: every operation takes `now` in milliseconds of the instance clock. The model
does no I/O.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from redlockdlm.engine.modes import (
    COMPAT,
    CONVERT_FLAGS,
    MAX_PRIORITY,
    MIN_PRIORITY,
    RELEASE_FLAGS,
    REQUEST_FLAGS,
    Flag,
    Mode,
    Status,
    is_down_conversion,
)
from redlockdlm.errors import (
    BadArgument,
    HasChildren,
    LockStateError,
    MissingKeys,
    NotOwner,
)
from redlockdlm.errors import DLMError as EngineError

TOMBSTONE_MS = 60_000  #: G9: how long a fencing sequence outlives its resource
MAX_LEASE_MS = 86_400_000
MAX_INT = 2**53 - 1
MAX_TOKEN = 2**52  #: F1: the largest fencing floor (above 2**53 a Lua `seq + 1` == seq)
MAX_NAME = 16 * 1024 + 15  #: a display name: 16 names of 1024 bytes joined by NUL
MAX_VBMAX = 65_536
MAX_ID_LEN = 64
VI_INVALID = 1  #: V4: a PW/EX holder expired or was broken
VI_FORGOTTEN = 2  #: V5: this instance restarted empty and may have lost a newer value
BLOCKERS_REPORTED = 8  #: how many blockers a reply lists (their count is always given)

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


@dataclass
class Lock:
    id: str
    owner: str
    gr: int | None  #: granted mode, None while waiting as a new request
    rq: int | None  #: requested mode while waiting or converting
    flags: int
    ticket: int
    cticket: int  #: ticket of the current conversion
    exp: int  #: lease expiry, ms of the instance clock
    parent: str  #: parent lock id or ""
    pkey: bytes  #: parent resource key or b""
    kids: list[tuple[bytes, str]] = field(default_factory=list)
    token: int = 0
    pm: int | None = None  #: mode before a granted up-conversion (for yield, Y1)
    priority: int = 0  #: of the latest request or queued/granted up-conversion (P1)


@dataclass
class Resource:
    name: bytes
    seq: int = 0
    vb: bytes | None = None
    vv: int = 0
    vi: int = 0  #: 0 valid, VI_INVALID (V4), VI_FORGOTTEN (V5)
    g: list[Lock] = field(default_factory=list)  #: granted, in grant order
    c: list[Lock] = field(default_factory=list)  #: converting, by (cticket, id)
    w: list[Lock] = field(default_factory=list)  #: waiting, by (ticket, id)

    def empty(self) -> bool:
        return not (self.g or self.c or self.w)

    def find(self, lock_id: str) -> tuple[list[Lock] | None, Lock | None]:
        for q in (self.g, self.c, self.w):
            for lk in q:
                if lk.id == lock_id:
                    return q, lk
        return None, None


@dataclass
class Reply:
    """What a script returns about one lock (fields as in the Lua reply)."""

    status: Status
    gr: int | None = None
    token: int = 0
    pos: int = -1
    vb: bytes | None = None
    vv: int = 0
    vi: int = 0
    wait_ms: int = -1
    nblockers: int = 0
    blockers: list[tuple[str, str, int]] = field(default_factory=list)
    #: RECOVERING: ms to wait; RELEASED: locks released; QUEUED: the fencing sequence
    extra: int = 0
    #: break (H4): (key, name, id, owner, gr, rq, queue) per lock broken, in order
    broken: list[tuple] = field(default_factory=list)


def event_bytes(event: tuple) -> bytes:
    """An event of `Model.events` as the scripts publish it (lua/lib/core.lua grant_event and
    blocking, cancel.lua, break.lua): what `codec.parse_event` reads."""
    kind = event[0]
    if kind == "G":
        _, lid, gr, tok, vb, vv, vi = event
        return (b"G|%s|%d|%d|%d|%d|" % (lid.encode(), gr, tok, vv, vi)
                + (b"1|" + vb if vb is not None else b"0|"))
    if kind == "B":
        _, lid, rq, ticket, other = event
        return b"B|%s|%d|%d|%s" % (lid.encode(), rq, ticket, other.encode())
    _, lid, reason = event
    return b"C|%s|%s" % (lid.encode(), reason.encode())


def check_id(what: str, value: str) -> None:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_ID_LEN
        or not set(value) <= _ID_CHARS
    ):
        raise BadArgument(f"{what} must be 1..{MAX_ID_LEN} characters of [A-Za-z0-9_.:-]")


def check_int(what: str, value: int, lo: int = 0, hi: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadArgument(f"{what} must be an integer in {lo}..{hi}")


def check_mode(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
        raise BadArgument("mode must be an integer 0..5 (NL CR CW PR PW EX)")


def check_priority(value: int) -> None:
    check_int("priority", value, MIN_PRIORITY, MAX_PRIORITY)


def check_flags(value: int, allowed: int) -> None:
    check_int("flags", value, 0, 255)
    if value & ~int(allowed):
        raise BadArgument(f"flags {value} not allowed here (allowed mask {int(allowed)})")


class Model:
    """One instance. `res` maps resource key to Resource (tombstones are empty Resources)."""

    def __init__(self) -> None:
        self.res: dict[bytes, Resource] = {}
        self.windex: dict[tuple[str, bytes], int] = {}  #: waiter index: (id, key) -> expiry
        self.epoch_safe: int | None = None  #: None: no epoch yet (E1)
        self.epoch_restarted = False  #: the epoch was created by a script, not `init fresh`
        #: E2: the server process restarted with its data (`reload`) and no call has
        #: committed since: the next one that does replaces the epoch, as if it were lost
        self.reloaded = False
        #: (owner, event) in publish order, as the scripts publish them (N1-N3): ("G", id,
        #: mode, token, value, version, invalid), ("B", id, rq, ticket, other id),
        #: ("C", id, reason); `tests/engine/test_model_vs_lua.py` compares them
        self.events: list[tuple[str, tuple]] = []

    # ----------------------------------------------------------------- epoch (E1)

    def init_fresh(self, now: int) -> None:
        if self.epoch_safe is None:
            self.epoch_safe = now

    def reload(self) -> None:
        """E2: the server restarted with its data (AOF, RDB): what it reloaded may lack the
        last writes before the restart, so its first call that commits opens a new epoch."""
        self.reloaded = True

    def _epoch(self, now: int, rejoin_ms: int) -> int:
        """Ms still to wait before this instance may grant (0 when safe)."""
        if self.reloaded:  # E2 (`_run` restores the flag if the call fails)
            self.reloaded = False
            self.epoch_safe = None
        if self.epoch_safe is None:
            self.epoch_safe = now + rejoin_ms
            self.epoch_restarted = True
        return max(0, self.epoch_safe - now)

    def _forgets_values(self, now: int, rejoin_ms: int) -> bool:
        """V5: within rejoin_ms after a restarted epoch became safe."""
        return (self.epoch_restarted and self.epoch_safe is not None
                and now < self.epoch_safe + rejoin_ms)

    # ----------------------------------------------------------------- helpers

    def _load(self, key: bytes, now: int, ev: list) -> Resource | None:
        r = self.res.get(key)
        if r is not None:
            self._purge(key, r, now, ev)
        return r

    def _purge(self, key: bytes, r: Resource, now: int, ev: list) -> None:
        """G10: drop expired locks, V4: invalidate the value of an expired writer; G13: a
        purge that removes the last lock drops the value block (also when the same call
        then adds a lock). G8: then the queues are processed, a lock gone or not, so every
        call finds them processed (one left unprocessed by older scripts is repaired)."""
        removed = False
        for q in (r.g, r.c, r.w):
            keep = []
            for lk in q:
                if lk.exp <= now:
                    removed = True
                    if lk.gr is not None and lk.gr >= Mode.PW and not r.vi:
                        r.vi = VI_INVALID
                    self.windex.pop((lk.id, key), None)
                else:
                    keep.append(lk)
            q[:] = keep
        if removed and r.empty():
            r.vb, r.vi = None, 0  # G16: the version stays
        self._process(key, r, now, ev)

    def _bump(self, r: Resource, now: int) -> int:
        """F1: hybrid logical clock per resource."""
        r.seq = max(r.seq + 1, now * 1000)
        return r.seq

    @staticmethod
    def _compatible_with_granted(r: Resource, lk: Lock, mode: int) -> bool:
        for other in r.g:
            if other is not lk and not COMPAT[other.gr][mode]:
                return False
        for other in r.c:
            if other is not lk and not COMPAT[other.gr][mode]:
                return False
        return True

    def _grant_event(self, r: Resource, lk: Lock, ev: list) -> None:
        """N2: the grant with the value block as it is when granted (lua grant_event)."""
        ev.append((lk.owner, ("G", lk.id, lk.gr, lk.token, r.vb, r.vv, r.vi)))

    def _process(self, key: bytes, r: Resource, now: int, ev: list) -> None:
        """G8: conversions first, repeatedly; then waiters in order while no conversion."""
        changed = True
        while changed:
            changed = False
            for lk in list(r.c):
                if lk.flags & Flag.QUECVT and r.c[0] is not lk:
                    continue
                if self._compatible_with_granted(r, lk, lk.rq):
                    r.c.remove(lk)
                    lk.pm, lk.gr, lk.rq = lk.gr, lk.rq, None
                    lk.token = self._bump(r, now)
                    r.g.append(lk)
                    self.windex.pop((lk.id, key), None)
                    self._grant_event(r, lk, ev)
                    changed = True
        while not r.c and r.w:
            lk = r.w[0]
            if not self._compatible_with_granted(r, lk, lk.rq):
                break
            r.w.pop(0)
            lk.gr, lk.rq = lk.rq, None
            lk.token = self._bump(r, now)
            r.g.append(lk)
            self.windex.pop((lk.id, key), None)
            self._grant_event(r, lk, ev)

    @staticmethod
    def _insert(q: list[Lock], lk: Lock, conv: bool) -> None:
        k = (lk.cticket, lk.id) if conv else (lk.ticket, lk.id)
        i = 0
        while i < len(q):
            o = q[i]
            if ((o.cticket, o.id) if conv else (o.ticket, o.id)) > k:
                break
            i += 1
        q.insert(i, lk)

    def _blocking(self, r: Resource, lk: Lock, ev: list) -> None:
        """N1: tell holders whose granted mode blocks the queued request, those that read
        it: a holder that asked (BLKAST), or one whose ticket or conversion ticket is
        younger than the queued request's (the split-vote yield reads it, Y1)."""
        ticket = lk.cticket if lk.gr is not None else lk.ticket
        for q in (r.g, r.c):
            for o in q:
                if (o is not lk and not COMPAT[o.gr][lk.rq]
                        and (ticket < o.ticket or ticket < o.cticket
                             or o.flags & Flag.BLKAST)):
                    ev.append((o.owner, ("B", o.id, lk.rq, ticket, lk.id)))

    def _state(self, r: Resource, lk: Lock, now: int) -> Reply:
        if lk in r.g:
            rep = Reply(Status.GRANTED, gr=lk.gr, token=lk.token, pos=0)
            if lk.gr != Mode.NL:  # V2
                rep.vb, rep.vv, rep.vi = r.vb, r.vv, r.vi
            return rep
        conv = lk in r.c
        q = r.c if conv else r.w
        pos = q.index(lk)
        rep = Reply(Status.QUEUED, gr=lk.gr, token=lk.token, pos=pos, extra=r.seq)
        # Who may be holding it up: every other granted or converting lock, and the
        # waiters ahead of it; wait_ms is the earliest lease among them (re-check time).
        ahead = [o for o in r.g + r.c if o is not lk]
        if not conv:
            ahead += q[:pos]
        if ahead:
            rep.wait_ms = max(0, min(o.exp for o in ahead) - now)
        blockers = [o for o in r.g + r.c if o is not lk and not COMPAT[o.gr][lk.rq]]
        rep.nblockers = len(blockers)
        rep.blockers = [(o.owner, o.id, o.gr) for o in blockers[:BLOCKERS_REPORTED]]
        return rep

    def _finish(self, key: bytes, r: Resource) -> None:
        """G9: an empty resource keeps only its fencing sequence (tombstone) and, G16, the
        version of the value block that went with its last lock."""
        if r.empty():
            r.vb, r.vi = None, 0

    def _run(self, fn, *args):
        """Run an operation atomically: on error nothing changes and nothing is published."""
        saved = copy.deepcopy((self.res, self.windex, self.epoch_safe, self.epoch_restarted,
                               self.reloaded))
        ev: list = []
        try:
            out = fn(ev, *args)
        except EngineError:
            (self.res, self.windex, self.epoch_safe, self.epoch_restarted,
             self.reloaded) = saved
            raise
        for key, r in self.res.items():
            self._finish(key, r)
        self.events.extend(ev)
        return out

    # ----------------------------------------------------------------- operations

    def request(self, key: bytes, name: bytes, owner: str, lock_id: str, mode: int,
                flags: int, ticket: int, lease_ms: int, now: int, rejoin_ms: int,
                parent_key: bytes = b"", parent_id: str = "", priority: int = 0) -> Reply:
        check_id("owner", owner)
        check_id("lock id", lock_id)
        check_mode(mode)
        check_flags(flags, REQUEST_FLAGS)
        check_int("ticket", ticket)
        check_int("lease_ms", lease_ms, 1, MAX_LEASE_MS)
        check_int("rejoin_ms", rejoin_ms, 0, MAX_LEASE_MS)
        check_priority(priority)
        if parent_id:
            check_id("parent id", parent_id)
        if len(name) > MAX_NAME:
            raise BadArgument(f"resource name of {len(name)} bytes exceeds {MAX_NAME}")
        if flags & Flag.EXPEDITE and mode != Mode.NL:
            raise BadArgument("EXPEDITE is only for NL requests (G3)")
        return self._run(self._request, key, name, owner, lock_id, mode, flags, ticket,
                         lease_ms, now, rejoin_ms, parent_key, parent_id, priority)

    def _request(self, ev, key, name, owner, lock_id, mode, flags, ticket, lease_ms, now,
                 rejoin_ms, parent_key, parent_id, priority) -> Reply:
        wait = self._epoch(now, rejoin_ms)
        if wait:
            return Reply(Status.RECOVERING, extra=wait)
        pr = self._load(parent_key, now, ev) if parent_id else None
        r = self._load(key, now, ev)
        if r is not None:
            q, lk = r.find(lock_id)
            if lk is not None:  # G12, and its lease renewed as renew would
                if lk.owner != owner:
                    raise NotOwner(f"lock id {lock_id} belongs to another owner")
                if lk.exp < now + lease_ms:
                    lk.exp = now + lease_ms
                    if q is not r.g:
                        self.windex[(lock_id, key)] = lk.exp
                return self._state(r, lk, now)
        plk = None
        if parent_id:  # H1
            plk = pr.find(parent_id)[1] if pr is not None else None
            if plk is None or plk.owner != owner or plk.gr is None:
                return Reply(Status.NOPARENT)
        if r is None:
            r = self.res[key] = Resource(name=name)
        if r.empty() and self._forgets_values(now, rejoin_ms):  # V5
            r.vi = VI_FORGOTTEN
        lk = Lock(lock_id, owner, None, mode, flags, ticket, 0, now + lease_ms,
                  parent_id, parent_key if parent_id else b"", priority=priority)
        if (flags & Flag.EXPEDITE) or (  # G3
            not r.c and not r.w and self._compatible_with_granted(r, lk, mode)  # G1
        ):
            lk.gr, lk.rq = mode, None
            lk.token = self._bump(r, now)
            r.g.append(lk)
        elif flags & Flag.NOQUEUE:  # G2
            return Reply(Status.NOTQUEUED)
        else:
            self._insert(r.w, lk, conv=False)  # G11
            self.windex[(lock_id, key)] = lk.exp
            self._process(key, r, now, ev)
            if lk.gr is None:
                self._blocking(r, lk, ev)
        if not r.name:  # K2: only a tombstone of a release floor takes a name
            r.name = name
        if plk is not None:
            plk.kids.append((key, lock_id))
        return self._state(r, lk, now)

    def convert(self, key: bytes, owner: str, lock_id: str, mode: int, flags: int,
                cticket: int, lease_ms: int, now: int, rejoin_ms: int,
                value: bytes | None = None, version: int = 0, vbmax: int = 64,
                floor: int = 0, priority: int = 0) -> Reply:
        check_id("owner", owner)
        check_id("lock id", lock_id)
        check_mode(mode)
        check_flags(flags, CONVERT_FLAGS)
        check_priority(priority)
        check_int("ticket", cticket)
        check_int("lease_ms", lease_ms, 1, MAX_LEASE_MS)
        check_int("rejoin_ms", rejoin_ms, 0, MAX_LEASE_MS)
        check_int("vbmax", vbmax, 0, MAX_VBMAX)
        check_int("version", version)
        check_int("floor", floor, 0, MAX_TOKEN)
        if value is not None and len(value) > vbmax:
            raise BadArgument(f"value block of {len(value)} bytes exceeds {vbmax} (V1)")
        return self._run(self._convert, key, owner, lock_id, mode, flags, cticket, lease_ms,
                         now, rejoin_ms, value, version, floor, priority)

    @staticmethod
    def _own(r: Resource | None, owner: str, lock_id: str) -> tuple[list[Lock] | None,
                                                                  Lock | None]:
        """The queue and lock `lock_id` of `r` ((None, None) if absent); NotOwner if the
        lock is another owner's."""
        q, lk = r.find(lock_id) if r is not None else (None, None)
        if lk is not None and lk.owner != owner:
            raise NotOwner(f"lock {lock_id} belongs to another owner")
        return q, lk

    def _convert(self, ev, key, owner, lock_id, mode, flags, cticket, lease_ms, now,
                 rejoin_ms, value, version, floor, priority) -> Reply:
        self._epoch(now, rejoin_ms)
        r = self._load(key, now, ev)
        q, lk = self._own(r, owner, lock_id)
        if lk is None:
            return Reply(Status.NOTFOUND)
        if q is r.w:
            raise LockStateError(f"lock {lock_id} is not granted yet")
        if q is r.c:
            raise LockStateError(f"lock {lock_id} is already converting")
        if cticket < lk.cticket:  # G15: a late conversion, overtaken by a newer one
            return self._state(r, lk, now)
        down = is_down_conversion(lk.gr, mode)
        if value is not None and not (lk.gr >= Mode.PW and down):
            raise BadArgument("the value block is written only converting down from PW/EX (V3)")
        r.seq = max(r.seq, floor)
        if mode == lk.gr:  # G4
            lk.exp = now + lease_ms
            return self._state(r, lk, now)
        if down:  # G4
            if value is not None and version >= r.vv:  # V6
                r.vb, r.vv, r.vi = value, version, 0
            lk.pm = None
            lk.gr = mode
            lk.exp = now + lease_ms
            self._process(key, r, now, ev)
            return self._state(r, lk, now)
        wait = self._epoch(now, rejoin_ms)  # E1: only if the epoch was lost, not the data
        if wait:
            return Reply(Status.RECOVERING, gr=lk.gr, token=lk.token, extra=wait)
        # G5
        if self._compatible_with_granted(r, lk, mode) and not (flags & Flag.QUECVT and r.c):
            lk.pm, lk.gr = lk.gr, mode
            lk.token = self._bump(r, now)
            lk.exp = now + lease_ms
            lk.flags, lk.cticket = flags, cticket  # Y1 returns it to this ticket
            lk.priority = priority  # P1
            self._process(key, r, now, ev)  # G8: a middle conversion may let others through
            return self._state(r, lk, now)
        if flags & Flag.NOQUEUE:  # G2
            return Reply(Status.NOTQUEUED)
        old = (lk.rq, lk.cticket, lk.flags, lk.priority)
        lk.rq, lk.cticket, lk.flags, lk.priority = mode, cticket, flags, priority  # P1
        trial = list(r.c)
        self._insert(trial, lk, conv=True)
        if self._conversion_deadlock(trial, lk):  # G7
            if not flags & Flag.CONVDEADLK:
                lk.rq, lk.cticket, lk.flags, lk.priority = old
                return Reply(Status.DEADLOCK, gr=lk.gr, token=lk.token)
            lk.gr = Mode.NL
        lk.pm = None
        lk.exp = now + lease_ms
        r.g.remove(lk)
        self._insert(r.c, lk, conv=True)  # G6
        self.windex[(lock_id, key)] = lk.exp
        self._process(key, r, now, ev)
        if lk in r.c:
            self._blocking(r, lk, ev)
        return self._state(r, lk, now)

    @staticmethod
    def _conversion_deadlock(c: list[Lock], lk: Lock) -> bool:
        """G7, after fs/dlm conversion_deadlock_detect()."""
        behind = False
        for o in c:
            if o is lk:
                behind = True
                continue
            if not behind:
                if not COMPAT[lk.gr][o.rq]:
                    return True
            elif not COMPAT[lk.gr][o.rq] and not COMPAT[o.gr][lk.rq]:
                return True
        return False

    def release(self, key: bytes, owner: str, lock_id: str, flags: int, now: int,
                rejoin_ms: int, parent_key: bytes = b"", child_keys: tuple[bytes, ...] = (),
                value: bytes | None = None, version: int = 0, vbmax: int = 64,
                floor: int = 0) -> Reply:
        check_id("owner", owner)
        check_id("lock id", lock_id)
        check_flags(flags, RELEASE_FLAGS)
        check_int("rejoin_ms", rejoin_ms, 0, MAX_LEASE_MS)
        check_int("vbmax", vbmax, 0, MAX_VBMAX)
        check_int("version", version)
        check_int("floor", floor, 0, MAX_TOKEN)
        if value is not None and len(value) > vbmax:
            raise BadArgument(f"value block of {len(value)} bytes exceeds {vbmax} (V1)")
        return self._run(self._release, key, owner, lock_id, flags, now, rejoin_ms,
                         parent_key, child_keys, value, version, floor)

    def _release(self, ev, key, owner, lock_id, flags, now, rejoin_ms, parent_key,
                 child_keys, value, version, floor) -> Reply:
        self._epoch(now, rejoin_ms)
        r = self._load(key, now, ev)
        q, lk = self._own(r, owner, lock_id)
        if lk is None:
            if floor:
                if r is None:
                    r = self.res[key] = Resource(name=b"")
                r.seq = max(r.seq, floor)
            return Reply(Status.NOTFOUND)
        if value is not None and not (lk.gr is not None and lk.gr >= Mode.PW):
            raise BadArgument("the value block is written only releasing PW/EX (V3)")
        allowed = {key, parent_key or key, *child_keys}
        n = self._release_kids(ev, lk, allowed, bool(flags & Flag.SUBTREE), now)
        if value is not None and version >= r.vv:  # V6
            r.vb, r.vv, r.vi = value, version, 0
        r.seq = max(r.seq, floor)
        self._remove(key, r, q, lk, now, ev, declared={key, parent_key or key, *child_keys})
        return Reply(Status.RELEASED, extra=n + 1)

    def _release_kids(self, ev, lk: Lock, allowed: set, subtree: bool, now: int) -> int:
        """H3: refuse live children unless subtree; release them depth first."""
        n = 0
        for ckey, cid in list(lk.kids):
            if ckey not in allowed:
                raise MissingKeys(f"child resource key {ckey!r} not passed in KEYS (H3)")
            cr = self._load(ckey, now, ev)
            cq, clk = cr.find(cid) if cr is not None else (None, None)
            if clk is None:
                continue
            if not subtree:
                raise HasChildren(f"lock {lk.id} has children; release them or ask SUBTREE")
            n += self._release_kids(ev, clk, allowed, subtree, now) + 1
            self._remove(ckey, cr, cq, clk, now, ev, unlink_parent=False)
        lk.kids = []
        return n

    def _remove(self, key, r, q, lk, now, ev, unlink_parent=True, declared=()) -> None:
        q.remove(lk)
        self.windex.pop((lk.id, key), None)
        if unlink_parent and lk.parent and lk.pkey in declared:
            pr = self._load(lk.pkey, now, ev)  # (loaded as the scripts do: purged, G10)
            plk = pr.find(lk.parent)[1] if pr is not None else None
            if plk is not None:
                plk.kids = [kd for kd in plk.kids if kd != (key, lk.id)]
        self._process(key, r, now, ev)

    def cancel(self, key: bytes, owner: str, lock_id: str, now: int, rejoin_ms: int,
               reason: str = "cancel", notify: bool = False, parent_key: bytes = b"") -> Reply:
        check_id("owner", owner)
        check_id("lock id", lock_id)
        check_int("rejoin_ms", rejoin_ms, 0, MAX_LEASE_MS)
        if reason not in ("cancel", "deadlock"):
            raise BadArgument("reason must be cancel or deadlock")
        return self._run(self._cancel, key, owner, lock_id, now, rejoin_ms, reason, notify,
                         parent_key)

    def _cancel(self, ev, key, owner, lock_id, now, rejoin_ms, reason, notify,
                parent_key) -> Reply:
        self._epoch(now, rejoin_ms)
        r = self._load(key, now, ev)
        q, lk = self._own(r, owner, lock_id)
        if lk is None:
            return Reply(Status.NOTFOUND)
        if q is r.g:
            return Reply(Status.CANCELGRANT, gr=lk.gr, token=lk.token)
        if q is r.w:
            self._remove(key, r, q, lk, now, ev, declared={key, parent_key or key})
        else:  # a conversion returns to the granted set with its old mode
            r.c.remove(lk)
            lk.rq = None
            r.g.append(lk)
            self.windex.pop((lock_id, key), None)
            self._process(key, r, now, ev)
        if notify:
            ev.append((owner, ("C", lock_id, reason)))
        return Reply(Status.CANCELLED, gr=lk.gr, token=lk.token)

    def yield_(self, key: bytes, owner: str, lock_id: str, now: int, rejoin_ms: int) -> Reply:
        check_id("owner", owner)
        check_id("lock id", lock_id)
        check_int("rejoin_ms", rejoin_ms, 0, MAX_LEASE_MS)
        return self._run(self._yield, key, owner, lock_id, now, rejoin_ms)

    def _yield(self, ev, key, owner, lock_id, now, rejoin_ms) -> Reply:
        self._epoch(now, rejoin_ms)
        r = self._load(key, now, ev)
        q, lk = self._own(r, owner, lock_id)
        if lk is None:
            return Reply(Status.NOTFOUND)
        if q is r.g:  # Y1
            r.g.remove(lk)
            if lk.pm is not None:
                lk.rq, lk.gr, lk.pm = lk.gr, lk.pm, None
                self._insert(r.c, lk, conv=True)
            else:
                lk.rq, lk.gr = lk.gr, None
                self._insert(r.w, lk, conv=False)
            self.windex[(lock_id, key)] = lk.exp
            self._process(key, r, now, ev)
        return self._state(r, lk, now)

    def renew(self, keys: list[bytes], owner: str, lease_ms: int,
              items: list[tuple[str, int]], now: int, rejoin_ms: int) -> list[Reply]:
        check_id("owner", owner)
        check_int("lease_ms", lease_ms, 1, MAX_LEASE_MS)
        check_int("rejoin_ms", rejoin_ms, 0, MAX_LEASE_MS)
        if len(keys) != len(items):
            raise BadArgument("renew needs one (lock id, floor) per key")
        for lock_id, floor in items:
            check_id("lock id", lock_id)
            check_int("floor", floor, 0, MAX_TOKEN)
        return self._run(self._renew, keys, owner, lease_ms, items, now, rejoin_ms)

    def _renew(self, ev, keys, owner, lease_ms, items, now, rejoin_ms) -> list[Reply]:
        self._epoch(now, rejoin_ms)
        loaded: dict[bytes, Resource | None] = {}
        out = []
        for key, (lock_id, floor) in zip(keys, items):
            if key not in loaded:
                loaded[key] = self._load(key, now, ev)
            r = loaded[key]
            q, lk = self._own(r, owner, lock_id)
            if lk is None:
                out.append(Reply(Status.NOTFOUND))
                continue
            lk.exp = now + lease_ms
            if q is not r.g:
                self.windex[(lock_id, key)] = lk.exp
            r.seq = max(r.seq, floor)
            out.append(self._state(r, lk, now))
        return out

    def break_(self, key: bytes, lock_id: str, owner: str, now: int, rejoin_ms: int,
               keys: tuple[bytes, ...] | None = None) -> Reply:
        """H4. `keys`: the keys the call declares besides `key` (None: every key)."""
        if lock_id:
            check_id("lock id", lock_id)
        if owner:
            check_id("owner", owner)
        if not lock_id and not owner:
            raise BadArgument("break needs a lock id or an owner")
        check_int("rejoin_ms", rejoin_ms, 0, MAX_LEASE_MS)
        return self._run(self._break, key, lock_id, owner, now, rejoin_ms, keys)

    def _break(self, ev, key, lock_id, owner, now, rejoin_ms, keys) -> Reply:
        self._epoch(now, rejoin_ms)
        r = self._load(key, now, ev)
        declared = None if keys is None else {key, *keys}
        broken: list[tuple] = []
        n = 0
        if r is not None:
            matched = [(q, qn, lk) for q, qn in ((r.g, "G"), (r.c, "C"), (r.w, "W"))
                       for lk in q
                       if (lock_id and lk.id == lock_id) or (owner and lk.owner == owner)]
            for q, qn, lk in matched:
                n += self._break_kids(ev, lk, declared, now, broken) + 1
                self._break_one(ev, key, r, qn, lk, broken)
                q.remove(lk)
                self.windex.pop((lk.id, key), None)
                if lk.parent and (declared is None or lk.pkey in declared):
                    pr = self.res.get(lk.pkey)
                    plk = pr.find(lk.parent)[1] if pr is not None else None
                    if plk is not None:
                        plk.kids = [kd for kd in plk.kids if kd != (key, lk.id)]
            self._process(key, r, now, ev)
        return Reply(Status.RELEASED, extra=n, broken=broken)

    @staticmethod
    def _break_one(ev, key, r, qn, lk, broken) -> None:
        if lk.gr is not None and lk.gr >= Mode.PW and not r.vi:  # V4
            r.vi = VI_INVALID
        ev.append((lk.owner, ("C", lk.id, "broken")))
        broken.append((key, r.name, lk.id, lk.owner, lk.gr, lk.rq, qn))

    def _break_kids(self, ev, lk: Lock, declared: set | None, now: int, broken: list) -> int:
        """H4: break every lock below `lk`, children first, depth first."""
        n = 0
        for ckey, cid in list(lk.kids):
            if declared is not None and ckey not in declared:
                raise MissingKeys(f"child resource key {ckey!r} not passed in KEYS (H3)")
            cr = self._load(ckey, now, ev)
            cq, clk = cr.find(cid) if cr is not None else (None, None)
            if clk is None:
                continue
            n += self._break_kids(ev, clk, declared, now, broken) + 1
            qn = "G" if cq is cr.g else "C" if cq is cr.c else "W"
            self._break_one(ev, ckey, cr, qn, clk, broken)
            self._remove(ckey, cr, cq, clk, now, ev, unlink_parent=False)
        lk.kids = []
        return n

    # ----------------------------------------------------------------- inspection

    def dump(self, now: int) -> dict:
        """The full state in the shape `Engine.inspect_all` returns for the Lua side."""
        out = {}
        for key, r in sorted(self.res.items()):
            locks = []
            for qname, q in (("G", r.g), ("C", r.c), ("W", r.w)):
                for lk in q:
                    locks.append((qname, lk.id, lk.owner, lk.gr, lk.rq, lk.flags, lk.ticket,
                                  lk.cticket, lk.exp - now, lk.parent, lk.token, lk.pm,
                                  tuple(sorted(lk.kids)), lk.priority))
            out[key] = (r.name, r.seq, r.vb, r.vv, r.vi, tuple(locks))
        return out

    def waiters(self) -> dict[tuple[str, bytes], int]:
        return dict(self.windex)
