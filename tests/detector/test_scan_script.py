"""lua/scan.lua, the detector's lean read (docs/detector.md D1), against lua/inspect.lua.

scan.lua returns only what the wait-for graph needs, as one flat array, and leaves out locks
whose lease ran out; on any population it must show exactly inspect's live locks, field for
field, and refuse the keys inspect refuses (K1)."""

from __future__ import annotations

import gc
import random

import pytest
import redis

from redlockdlm.detector import wait_for_graph
from redlockdlm.detector.scanning import (
    _FIELDS,
    ScanMemo,
    ScannedLock,
    _gc_paused,
    _parse_scan,
    _read_resources,
    scan,
)
from redlockdlm.engine.instance import Engine, call_script
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.engine.modes import Flag, Mode, Status
from redlockdlm.errors import DLMError, InvalidArgument, ProtocolError

pytestmark = pytest.mark.timeout(60)


def populate(e: Engine, rng: random.Random, steps: int = 300) -> list[bytes]:
    """A random lock population: roots and children, every mode, conversions (some
    QUECVT), NODLCKWT, priorities, releases and cancels, short leases that run out.
    Returns the keys."""
    roots = [(f"R{i}",) for i in range(8)]
    paths = roots + [(r[0], f"k{j}") for r in roots[:4] for j in range(2)]
    held: dict[tuple, list[tuple[str, str]]] = {p: [] for p in paths}  # (owner, lock id)
    granted: list[tuple[tuple, str, str]] = []  # (path, owner, lock id), granted once
    ticket = 0
    for step in range(steps):
        ticket += 1
        path = rng.choice(paths)
        key = e.key(*path)
        owner = f"o{rng.randrange(6)}"
        op = rng.random()
        try:
            if op < 0.55 or not held[path]:
                lid = f"l{step}"
                kw = {}
                if len(path) == 2:
                    parents = held[(path[0],)]
                    if not parents:
                        continue
                    _, pid = rng.choice(parents)
                    kw = {"parent_key": e.key(path[0]), "parent_id": pid}
                lease = rng.choice([30_000, 30_000, 60_000, rng.randrange(1, 3_000)])
                flags = rng.choice([0, 0, 0, Flag.NODLCKWT])
                reply = e.request(key, owner, lid, rng.choice(list(Mode)), ticket=ticket,
                                  lease_ms=lease, flags=flags, name=e.name(*path),
                                  priority=rng.choice([0, 0, -5, 3]), **kw)
                held[path].append((owner, lid))
                if reply.status is Status.GRANTED:
                    granted.append((path, owner, lid))
            elif op < 0.8 and granted:  # up-conversions of granted locks: some must queue
                path, o, lid = rng.choice(granted)
                flags = rng.choice([0, Flag.QUECVT, Flag.NODLCKWT | Flag.QUECVT])
                e.convert(e.key(*path), o, lid, rng.choice([Mode.PR, Mode.PW, Mode.EX]),
                          ticket=ticket, flags=flags, priority=rng.choice([0, 2, -1]),
                          lease_ms=rng.choice([30_000, 30_000, rng.randrange(1, 3_000)]))
            elif op < 0.9:
                o, lid = held[path].pop(rng.randrange(len(held[path])))
                e.cancel(key, o, lid, parent_key=e.key(path[0]) if len(path) == 2 else None)
            else:
                o, lid = held[path].pop(rng.randrange(len(held[path])))
                e.release(key, o, lid, parent_key=e.key(path[0]) if len(path) == 2 else None)
        except DLMError:
            pass  # refused (e.g. a conversion while queued): the population is what it is
    return [e.key(*p) for p in paths] + [e.key("absent"), e.key("R0", "absent")]


def _scan_raw(e: Engine, keys: list[bytes], stamps: list[bytes] = ()) -> list:
    return call_script(e.client, "scan", [EPOCH_KEY, *keys], list(stamps))


def _fields(lk, now: int) -> list:
    """A live lock of `inspect` as scan.lua sends it."""
    return [lk.queue.encode(), lk.lock_id.encode(), lk.owner.encode(),
            -1 if lk.mode is None else int(lk.mode),
            -1 if lk.requested is None else int(lk.requested),
            lk.flags, lk.ticket, lk.cticket, now + lk.lease_left_ms, lk.parent.encode(),
            lk.priority]


@pytest.mark.parametrize("seed", range(6))
def test_scan_shows_exactly_the_live_locks_of_inspect(r, seed):
    e = Engine(r, "sc")
    e.init_fresh()
    rng = random.Random(seed)
    keys = populate(e, rng)
    rng.shuffle(keys)
    keys.append(keys[0])  # a key named twice is read twice, the same way
    e.set_clock(frozen_ms=e.status().now_ms + 1_500)  # some short leases run out, unpurged
    st, views = e.inspect(keys)
    raw = _scan_raw(e, keys)
    now, parsed, stamps = _parse_scan(keys, raw)
    assert now == st.now_ms
    assert raw[1] == bytes(b"-+"[v is not None] for v in views)  # no stamps sent: all read
    expired = live = 0
    heads = raw[2:2 + 3 * raw[1].count(b"+")]
    at = 2 + len(heads)
    present = [(k, v) for k, v in zip(keys, views) if v is not None]
    assert len(heads) == 3 * len(present)
    for i, (key, view) in enumerate(present):
        stamp, count, name = heads[3 * i:3 * i + 3]
        want = [lk for lk in view.locks if lk.lease_left_ms > 0]
        expired += len(view.locks) - len(want)
        live += len(want)
        assert (count, name) == (len(want), view.name)
        got = raw[at:at + _FIELDS * count]
        at += _FIELDS * count
        assert got == [v for lk in want for v in _fields(lk, now)]
        res = parsed[key]
        assert stamps[key] == (stamp, res)
        assert (res.key, res.name, res.path) == (view.key, view.name, view.path)
        assert res.locks == tuple(ScannedLock(*(getattr(lk, f) for f in ScannedLock._fields))
                                  for lk in want)
    assert at == len(raw)
    assert set(parsed) == {k for k, _ in present}
    # the population has what the comparison is about
    assert expired and live
    locks = [lk for v in views if v for lk in v.locks]
    assert {lk.queue for lk in locks} == {"G", "C", "W"}
    assert any(lk.parent for lk in locks)
    assert any(lk.priority for lk in locks)
    assert any(lk.queue == "C" and lk.flags & Flag.QUECVT for lk in locks)
    # the detector's reader, in chunks of any size, reads the same; with the stamps it was
    # given, again: nothing is decoded anew, and the same tuples come back
    keys.pop()
    keep: dict = {}
    first = _read_resources(e, keys, {}, keep)
    assert first == {k: parsed[k] for k in keys if k in parsed}
    again: dict = {}
    second = _read_resources(e, keys, keep, again)
    assert second == first and again == keep
    assert all(second[k] is keep[k][1] for k in second)
    raw = _scan_raw(e, keys, [keep[k][0] if k in keep else b"" for k in keys])
    assert raw[1] == bytes(b"-="[k in keep] for k in keys) and len(raw) == 2
    e.set_clock()


def test_a_stamp_says_unchanged_only_for_the_same_live_locks(r):
    """D1: '=' only for the bytes the stamp was given for, while every lock it named is
    live, and never when the clock went back; a stamp of another resource or instance
    life is not '='."""
    e = Engine(r, "sc")
    e.init_fresh()
    a, b = e.key("A"), e.key("B")
    t = e.set_clock(frozen_ms=e.status().now_ms).now_ms
    e.request(a, "o1", "a1", Mode.EX, ticket=1, lease_ms=1_000, name=e.name("A"))
    e.request(a, "o2", "a2", Mode.EX, ticket=2, lease_ms=30_000, name=e.name("A"),
              priority=-7)
    e.request(b, "o3", "b1", Mode.PR, ticket=3, lease_ms=30_000, name=e.name("B"))

    def read(stamps):
        raw = _scan_raw(e, [a, b], stamps)
        return raw[1], dict(zip((a, b), raw[2:8:3])) if raw[1] == b"++" else raw

    status, st = read([])
    assert status == b"++"
    assert _scan_raw(e, [a, b], [st[a], st[b]])[1] == b"=="
    assert _scan_raw(e, [a, b], [st[b], st[a]])[1] == b"++"  # another resource's stamp
    assert _scan_raw(e, [a, b], [b"1.2:3", b""])[1] == b"++"
    e.set_clock(frozen_ms=t + 999)
    assert _scan_raw(e, [a, b], [st[a], st[b]])[1] == b"=="
    e.set_clock(frozen_ms=t + 1_000)  # a1's lease ran out: A is read again, without it
    raw = _scan_raw(e, [a, b], [st[a], st[b]])
    assert raw[1] == b"+=" and raw[3] == 1 and raw[5:7] == [b"W", b"a2"]
    assert raw[-1] == -7  # its priority
    a_later = raw[2]
    e.set_clock(frozen_ms=t + 500)  # the clock went back: a1 is live again
    raw = _scan_raw(e, [a, b], [a_later, st[b]])
    assert raw[1] == b"+=" and raw[3] == 2
    e.release(b, "o3", "b1")  # B changed (a tombstone): read again
    raw = _scan_raw(e, [a, b], [raw[2], st[b]])
    assert raw[1] == b"=+" and raw[2:5] == [raw[2], 0, e.name("B")]
    e.set_clock()


def test_a_memo_that_misses_a_key_the_script_calls_unchanged_is_a_protocol_error(r):
    e = Engine(r, "sc")
    e.init_fresh()
    a = e.key("A")
    e.request(a, "o1", "a1", Mode.EX, ticket=1, lease_ms=30_000, name=e.name("A"))
    raw = _scan_raw(e, [a])
    again = _scan_raw(e, [a], [raw[2]])
    assert again[1] == b"="
    with pytest.raises(ProtocolError):
        _parse_scan([a], again, {})
    with pytest.raises(ProtocolError):
        _parse_scan([a], again)


def test_scan_reads_nothing_and_writes_nothing(r):
    e = Engine(r, "sc")
    e.init_fresh()
    key = e.key("R")
    now = e.set_clock(frozen_ms=e.status().now_ms).now_ms
    e.request(key, "a", "a1", Mode.EX, ticket=1, lease_ms=5, name=e.name("R"))
    e.request(key, "b", "b1", Mode.EX, ticket=2, lease_ms=30_000, name=e.name("R"))
    e.set_clock(frozen_ms=now + 10)
    before = r.get(key), r.zrange(e.wkey, 0, -1, withscores=True)
    raw = _scan_raw(e, [key, e.key("absent")])
    assert raw[1] == b"+-" and raw[3:5] == [1, e.name("R")]  # a1's lease ran out: left out
    assert raw[5:7] == [b"W", b"b1"]  # b1 is still waiting: nothing was purged
    assert (r.get(key), r.zrange(e.wkey, 0, -1, withscores=True)) == before
    assert _scan_raw(e, []) == [e.status().now_ms, b""]
    e.set_clock()


FOREIGN = [
    ([b"dlm:epochs", b"dlm:{sc:R}"], "KEYS[1]"),
    ([b"dlm:{sc:R}"], "KEYS[1]"),
    ([EPOCH_KEY, b"dlm:sc:waiters"], "KEYS[2]"),  # the waiter index is not a resource
    ([EPOCH_KEY, b"dlm:{sc:R}", EPOCH_KEY], "KEYS[3]"),
    ([EPOCH_KEY, b"dlm:{sc:R}", b"user:1"], "KEYS[3]"),
    ([EPOCH_KEY, b""], "KEYS[2]"),
]


@pytest.mark.parametrize(("keys", "names"), FOREIGN)
def test_scan_refuses_foreign_keys_like_inspect(r, keys, names):
    r.zadd(b"dlm:sc:waiters", {b"x|dlm:{sc:R}": 1})
    r.set(b"user:1", b"not ours")
    errors = []
    for script in ("inspect", "scan"):
        with pytest.raises(InvalidArgument) as info:
            call_script(r, script, keys, [])
        errors.append(str(info.value))
    assert errors[0] == errors[1] and names in errors[0]
    assert r.get(b"user:1") == b"not ours" and r.zcard(b"dlm:sc:waiters") == 1


def test_a_malformed_scan_reply_is_a_protocol_error():
    keys = [b"dlm:{sc:A}", b"dlm:{sc:B}", b"dlm:{sc:C}"]
    lock = [b"W", b"l1", b"o1", -1, 5, 0, 7, 0, 905, b"", 3]
    good = [5, b"+-+", b"s1", 1, b"A", b"s3", 0, b"C", *lock]
    now, res, new = _parse_scan(keys, good)
    assert now == 5 and list(res) == [keys[0], keys[2]] and res[keys[2]].locks == ()
    assert res[keys[0]].locks == (ScannedLock("W", "l1", "o1", None, Mode.EX, 0, 7, 0, 900, "", 3),)
    assert new == {keys[0]: (b"s1", res[keys[0]]), keys[2]: (b"s3", res[keys[2]])}
    for bad in (good[:-1], [*good, b"x"], good[:4], [5, b"+-+", b"s1", 2, b"A", b"s3", 0,
                                                     b"C", *lock],
                [5, b"+-", *good[2:]], [5, b"+-*", *good[2:]], [5, None, *good[2:]],
                [5, b"+-+", b"s1", -2, b"A", b"s3", 2, b"C", *lock, *lock],
                [5, b"+-+", b"s1", 1, b"A", b"s3", 0, b"C", b"X", *lock[1:]],
                [5, b"+-+", b"s1", 1, b"A", b"s3", 0, b"C", *lock[:3], 9, *lock[4:]],
                [5, b"+-+", b"s1", 1, b"A", b"s3", 0, b"C", lock[0], None, *lock[2:]]):
        with pytest.raises(ProtocolError):
            _parse_scan(keys, bad)


def test_the_gc_pause_of_a_scan_leaves_the_collector_as_it_found_it():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _gc_paused():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with _gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the application's choice stands
    finally:
        gc.enable()


def shown(snap) -> list:
    """A snapshot without the lease left of its locks (a memo hands back the value of the
    read that decoded them: positive, as every lock a scan shows)."""
    out = []
    for inst in snap.instances:
        res = {k: (v.name, tuple(lk._replace(lease_left_ms=lk.lease_left_ms > 0)
                                 for lk in v.locks)) for k, v in inst.resources.items()}
        out.append((inst.label, inst.now_ms, inst.waiters, res, inst.error))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_memos_change_nothing_a_scan_or_graph_shows(cluster3, seed):
    """D1: scans with a ScanMemo, and graphs with a memo, kept over rounds in which the
    instances change (the same operations everywhere, some on one instance only; leases
    running out; the clock going back) show exactly what fresh ones show."""
    engines = [Engine(redis.Redis.from_url(u), "mm") for u in cluster3.urls]
    for e in engines:
        e.init_fresh()
    rng = random.Random(seed)
    t = engines[0].status().now_ms
    memo, graph_memo = ScanMemo(), {}
    owners = [f"o{i}" for i in range(5)]
    live: list[tuple[str, str, str]] = []  # (resource, owner, lock id)
    for step in range(40):
        for _ in range(rng.randrange(1, 12)):
            on = engines if rng.random() < 0.8 else [rng.choice(engines)]
            res = f"R{rng.randrange(8)}"
            if rng.random() < 0.7 or not live:
                lid, owner = f"l{step}_{rng.randrange(10**6)}", rng.choice(owners)
                for e in on:
                    e.request(e.key(res), owner, lid, rng.choice(list(Mode)), ticket=step,
                              lease_ms=rng.choice([30_000, 30_000, 400]), name=e.name(res),
                              priority=rng.choice([0, 1, -1]))
                live.append((res, owner, lid))
            else:
                res, owner, lid = live.pop(rng.randrange(len(live)))
                for e in on:
                    e.release(e.key(res), owner, lid)
        t += rng.choice([0, 100, 300, -200])
        for e in engines:
            e.set_clock(frozen_ms=t)
        got = scan(engines, memo=memo)
        want = scan(engines)
        assert shown(got) == shown(want)
        assert wait_for_graph(got, memo=graph_memo) == wait_for_graph(want)
    assert len(memo) and len(graph_memo)
    for e in engines:
        e.set_clock()
