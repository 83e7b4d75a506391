"""D1, the detector's read of the instances (rules in docs/detector.md): the waiter index,
then `lua/scan.lua` on the resources it names, parsed off the wire into `Lock` and
`Resource` tuples, with a `ScanMemo` so that only what changed is decoded again.

    snap = scan(engines)   # read-only: waiter index + scan.lua, instances in parallel
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, groupby, islice, repeat
from operator import itemgetter, sub
from typing import NamedTuple

from ..engine.codec import LockView, ResourceView
from ..engine.instance import Engine
from ..engine.keys import key_slot
from ..engine.modes import Mode
from ..errors import ProtocolError
from ..fanout import InstanceResult, Target, fan_out, label_of
from ..protocol import quorum as quorum_of

# ----------------------------------------------------------------- D1: the scan


class ScannedLock(NamedTuple):
    """One lock as the detector reads it: the fields of `codec.LockView` the graph needs
    (a LockView may stand in for it). A plain tuple: a scan builds tens of thousands."""

    queue: str  #: 'G' granted, 'C' converting, 'W' waiting
    lock_id: str
    owner: str
    mode: Mode | None  #: granted mode
    requested: Mode | None
    flags: int
    ticket: int
    cticket: int
    #: on the instance's clock, when the scan script last decoded the resource (a later
    #: scan may hand back the same tuple, D1); a scan returns live locks only (> 0).
    #: (`inspect`: <= 0 for a lock expired, not yet purged)
    lease_left_ms: int
    parent: str
    priority: int = 0  #: of the lock's latest request or conversion (D8)


class ScannedResource(NamedTuple):
    """One resource as the detector reads it (a `codec.ResourceView` may stand in)."""

    key: bytes
    name: bytes
    locks: tuple[ScannedLock, ...]

    @property
    def path(self) -> tuple[bytes, ...]:
        return tuple(self.name.split(b"\x00")) if self.name else ()


@dataclass(frozen=True)
class InstanceScan:
    """What one instance showed: its live waiter-index entries and their resources."""

    label: str
    now_ms: int = 0  #: the instance's clock (ms) when its index was read
    waiters: tuple[tuple[str, bytes], ...] = ()  #: (lock id, resource key)
    resources: Mapping[bytes, ScannedResource | ResourceView] = field(default_factory=dict)
    error: str | None = None  #: set if the instance did not answer
    elapsed_s: float = field(default=0.0, compare=False)  #: how long its read took (s)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Snapshot:
    """One scan of every configured instance (including those that did not answer)."""

    instances: tuple[InstanceScan, ...]

    @property
    def quorum(self) -> int:
        return quorum_of(len(self.instances))

    @property
    def reachable(self) -> int:
        return sum(1 for i in self.instances if i.ok)

    @property
    def waiter_count(self) -> int:
        """Waiting requests (each counted once, however many instances index it)."""
        return len({w for i in self.instances for w in i.waiters})

    @property
    def longest_queue(self) -> int:
        """Waiting requests of the resource that has the most (each counted once)."""
        per: dict[bytes, set[str]] = {}
        for i in self.instances:
            for lock_id, key in i.waiters:
                per.setdefault(key, set()).add(lock_id)
        return max((len(ids) for ids in per.values()), default=0)

    @property
    def index_entries(self) -> int:
        """Waiter-index entries on all instances together (a request on N instances: N)."""
        return sum(len(i.waiters) for i in self.instances)

    def views_of(self, key: bytes, lock_id: str) -> list[tuple[int, ScannedLock | LockView]]:
        """Every instance's view of one lock: (instance index, view)."""
        out = []
        for i, inst in enumerate(self.instances):
            res = inst.resources.get(key)
            if res is not None:
                out.extend((i, lk) for lk in res.locks if lk.lock_id == lock_id)
        return out


#: ScannedResource keys per `scan` call. A scan sends all its calls in one pipeline (one round
#: trip), but each call runs alone on the instance (~4 ms per 500 one-waiter resources), so
#: clients' lock calls are served between them instead of waiting for one long script.
#: The size barely matters to the scan's own cost from ~100 keys up (benchmarks/detector.py
#: --chunks; below that the per-call overhead shows), so it is chosen for those clients.
SCAN_CHUNK = 500

_QUEUE = {b"G": "G", b"C": "C", b"W": "W"}
_MODE: dict[int, Mode | None] = {-1: None, **{int(m): m for m in Mode}}  # -1: none
_FIELDS = len(ScannedLock._fields)  # values per lock in a scan reply, in Lock's order
_new_lock = partial(tuple.__new__, ScannedLock)  # (a NamedTuple without its Python-level __new__)
_new_resource = partial(tuple.__new__, ScannedResource)
_ITEM0, _ITEM1, _ITEM2 = itemgetter(0), itemgetter(1), itemgetter(2)
_RESOURCE_OF = _ITEM1  # of a memo entry (stamp, ScannedResource)


def _split_member(member: bytes) -> tuple[str, bytes]:
    lock_id, _, key = member.partition(b"|")  # ids never contain '|'; names may
    return lock_id.decode(), key


def _split_members(members: list[bytes]) -> tuple[tuple[str, bytes], ...]:
    """`_split_member` of every index member, column by column (C loops, no Python call per
    member)."""
    parts = [m.partition(b"|") for m in members]
    return tuple(zip(map(bytes.decode, map(_ITEM0, parts)), map(_ITEM2, parts)))


#: What a scan of one instance decoded: resource key -> (stamp, ScannedResource) (D1, scan.lua).
Held = dict[bytes, tuple[bytes, ScannedResource]]
_PLUS, _SAME, _GONE = 43, 61, 45  # b"+", b"=", b"-": a resource's status in a scan reply


class ScanMemo:
    """What earlier scans decoded, per instance, so that `scan` asks `lua/scan.lua` only for
    the resources that changed since (D1): for the others the script answers "unchanged"
    after a GET, and the `Resource` tuples of the earlier scan are handed back as they are
    (their `lease_left_ms` is then that of the earlier read). The script says "unchanged"
    only for the very bytes it decoded then and while every lock it returned is still
    live, so a memo never changes what a scan shows, only what it costs.

    One per detector (the `Detector` keeps one); a full scan keeps only the resources it
    read, a partial read (`Detector.confirm_pending`) adds to it. Not for two scans at once."""

    def __init__(self) -> None:
        self._held: dict[Engine, Held] = {}
        #: per instance, the waiter-index members of its last read (`Detector.watch`)
        self.members: dict[Engine, set[bytes]] = {}

    def held(self, engine: Engine) -> Held:
        """The memo of one instance (an Engine is one instance; keyed by the object)."""
        h = self._held.get(engine)
        if h is None:
            h = self._held[engine] = {}
        return h

    def replace(self, engine: Engine, held: Held) -> None:
        self._held[engine] = held

    def __len__(self) -> int:
        return sum(len(h) for h in self._held.values())


def _parse_scan(keys: Sequence[bytes], raw: list,
                held: Mapping[bytes, tuple[bytes, ScannedResource]] | None = None
                ) -> tuple[int, dict[bytes, ScannedResource], Held]:
    """The instance clock, the resources of a `scan` reply (layout: lua/scan.lua; absent
    resources left out, live locks only), and (stamp, ScannedResource) of those decoded anew.
    `held` is what the caller sent stamps from: resources reported unchanged come from it.

    The locks come as one flat run of `_FIELDS` values each, in `Lock`'s field order, so
    they are read column by column (strided slices, `map` of C functions), and grouped into
    resources by runs of equal lock counts (`zip` of one iterator), not with a Python call
    per lock or per resource: at 10,000 resources per instance this is what keeps the
    client's share of a scan small. tests/detector checks that it reads what
    `codec.parse_inspect` reads."""
    n = len(keys)
    try:
        now, status = raw[0], raw[1]
        if not isinstance(status, bytes) or len(status) != n:
            raise ValueError(f"a status of {len(status)} bytes for {n} keys")
        if len(raw) == 2 and held is not None and status.count(_SAME) == n:
            # nothing changed (a detector's usual chunk): the caller's copies, in C loops
            return now, dict(zip(keys, map(_RESOURCE_OF, map(held.__getitem__, keys)))), {}
        plus = status.count(_PLUS)
        if plus + status.count(_SAME) + status.count(_GONE) != n:
            raise ValueError(f"unknown status in {status[:40]!r}")
        head = 2 + 3 * plus
        stamps, counts, names, body = raw[2:head:3], raw[3:head:3], raw[4:head:3], raw[head:]
        if len(names) != plus or len(body) != _FIELDS * sum(counts) or (
                counts and min(counts) < 0):
            raise ValueError(f"{len(raw)} values for {n} keys, {plus} of them read")
        d, f, mode = bytes.decode, _FIELDS, _MODE.__getitem__
        locks = map(_new_lock, zip(
            map(_QUEUE.__getitem__, body[0::f]), map(d, body[1::f]), map(d, body[2::f]),
            map(mode, body[3::f]), map(mode, body[4::f]), body[5::f], body[6::f],
            body[7::f], map(sub, body[8::f], repeat(now)), map(d, body[9::f]),
            body[10::f]))
        pkeys = list(compress(keys, map(_PLUS.__eq__, status)))
        fresh: list[ScannedResource] = []
        at = 0
        for count, run in groupby(counts):  # resources with `count` locks each
            m = len(list(run))
            ks = pkeys[at:at + m]
            groups = islice(zip(*[locks] * count), m) if count else repeat((), m)
            fresh.extend(map(_new_resource, zip(ks, names[at:at + m], groups)))
            at += m
        if plus + status.count(_GONE) == n:
            out = dict(zip(pkeys, fresh))
        else:  # some are unchanged: the caller's copy stands (all in key order)
            if held is None:
                raise ValueError("'unchanged' for a resource the caller did not send")
            out = dict.fromkeys(compress(keys, map(_GONE.__ne__, status)))
            out.update(zip(pkeys, fresh))
            same = list(compress(keys, map(_SAME.__eq__, status)))
            out.update(zip(same, map(_RESOURCE_OF, map(held.__getitem__, same))))
        new: Held = dict(zip(pkeys, zip(stamps, fresh)))
    except (IndexError, KeyError, TypeError, ValueError, UnicodeDecodeError,
            AttributeError) as exc:
        raise ProtocolError(f"unexpected scan reply: {exc!r}") from exc
    return now, out, new


def _read_resources(engine: Engine, keys: list[bytes], held: Held | None = None,
                    keep: Held | None = None) -> dict[bytes, ScannedResource]:
    """`keys`' resources on one instance, live locks only: `scan` calls of SCAN_CHUNK keys,
    all sent in one pipeline. With `held` (what earlier scans of this instance decoded),
    the script is sent its stamps and decodes only what changed (D1); what it read is
    recorded in `keep` (stamps and resources of every key read, unchanged ones included)."""
    chunks = [part[i:i + SCAN_CHUNK] for part in _by_slot(engine, keys)
              for i in range(0, len(part), SCAN_CHUNK)]
    none = (b"",)
    calls = [[] if not held else [held.get(k, none)[0] for k in chunk] for chunk in chunks]
    out: dict[bytes, ScannedResource] = {}
    for chunk, raw in zip(chunks, engine.scan_resources(chunks, calls)):
        _, got, new = _parse_scan(chunk, raw, held)
        out.update(got)
        if keep is not None:
            if held:  # the unchanged ones: the entries they were answered from
                same = list(compress(chunk, map(_SAME.__eq__, raw[1])))
                keep.update(zip(same, map(held.__getitem__, same)))
            keep.update(new)
    return out


def _by_slot(engine: Engine, keys: list[bytes]) -> list[list[bytes]]:
    """`keys` as one list on a standalone server; on a Redis Cluster member one list per
    hash slot (a `scan` call runs on one slot's primary, with that slot's epoch: H2c)."""
    if not engine.cluster:
        return [keys]
    parts: dict[int, list[bytes]] = {}
    for k in keys:
        parts.setdefault(key_slot(k), []).append(k)
    return list(parts.values())


def _scan_one(engine: Engine, memo: ScanMemo | None = None) -> tuple[int, tuple, dict]:
    # The index is scored by lease expiry on the clock of the server that holds it (test
    # clocks included; each shard's own on a cluster member), so "still alive" is asked
    # of that clock, not ours. (Members only: scores would cost more to convert than the
    # whole read.)
    now, members = engine.live_waiters_now()
    waiters = _split_members(members)
    keys = list(dict.fromkeys(key for _, key in waiters))  # a resource is read once
    if memo is None:
        return now, waiters, _read_resources(engine, keys) if keys else {}
    keep: Held = {}
    got = _read_resources(engine, keys, memo.held(engine), keep) if keys else {}
    memo.replace(engine, keep)  # a full scan: only what it read is worth keeping
    memo.members[engine] = set(members)
    return now, waiters, got


def scan(engines: Sequence[Engine | Target], *, executor: Executor | None = None,
         memo: ScanMemo | None = None) -> Snapshot:
    """D1: read every instance's waiter index (entries whose lease has not run out on that
    instance's clock), then read the distinct resources it names (lua/scan.lua: live locks
    only), in chunks sent in one pipeline per instance. Never KEYS or SCAN on a standalone
    server. A Redis Cluster member (H2c): every shard's index (found by SCAN for index keys
    on each primary), each judged by that shard's own clock, and chunks of one hash slot
    each, sent to the slot's primary. Instances are
    read in parallel; one that fails shows as an `InstanceScan` with `error`. With `memo`
    (kept from scan to scan), only the resources that changed since are decoded and sent:
    the snapshot is the same, cheaper."""
    targets = [t if isinstance(t, Target) else Target(label_of(t), t) for t in engines]
    with _gc_paused():
        return _snapshot(fan_out(targets, partial(_scan_one, memo=memo), executor=executor))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a scan builds its records: ~100,000
    tuples per instance at 10,000 waiters, none of them in a reference cycle. Left on, the
    collector runs every few hundred of them and walks the growing snapshot again and
    again (about a third of the client's CPU in a scan, benchmarks/detector.py); paused,
    it catches up in one pass afterwards. Memory is still freed as usual (reference
    counts). If the collector is already off (another scan, or the application), it is
    left as it is."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _snapshot(outcomes: Sequence[InstanceResult]) -> Snapshot:
    return Snapshot(tuple(
        InstanceScan(o.label, *o.value, elapsed_s=o.elapsed_s) if o.ok
        else InstanceScan(o.label, error=o.error, elapsed_s=o.elapsed_s)
        for o in outcomes))
