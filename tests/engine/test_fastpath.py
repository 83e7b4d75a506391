"""The fast path (request, release and renew of a lone lock on a compact record, core.lua
`lone_get`) decides exactly as the full path does, and the compact records are what the
full path reads.

The reference is the same library built with `FAST = false` (no fast path, every resource
stored as the msgpack map of before): random operation sequences that mix fast-path calls
(requests on free or tombstoned resources, releases and renewals of a resource's only
lock, repeated requests, G12) with full-path ones (a second holder, queues, conversions,
cancels, children, expired leases, value blocks, fencing floors, wrong owners) run on both,
in two namespaces of one server under one frozen clock, and every reply, error, resource
state (inspect) and waiter index entry must be equal after every step.

tests/engine/test_model_vs_lua.py checks the same library against the reference model.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from redlockdlm.engine import scripts
from redlockdlm.engine.instance import Engine
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.errors import CorruptKey, DLMError
from redlockdlm.wire import script_reply

T0 = 1_800_000_000_000
EXAMPLES = int(os.environ.get("DLM_FASTPATH_EXAMPLES", "300"))
OWNERS = ("o1", "o1", "o2")  # (weights: the same lock met again often)
IDS = ("l0", "l0", "l0", "l1", "l2")
ROOTS = (("A",), ("B",))
CHILD = ("A", "x")
PATHS = (*ROOTS, CHILD)
PICK_PATH = ROOTS[0], ROOTS[0], ROOTS[1], CHILD


def full_path_library() -> tuple[str, dict[str, bytes]]:
    """The library with the fast path switched off, under names of its own."""
    lib = scripts.library()
    digest = lib.name.removeprefix("redlockdlm_")
    src = lib.source
    assert src.count(b"local FAST = true\n") == 1
    src = src.replace(b"local FAST = true\n", b"local FAST = false\n")
    src = src.replace(f"redlockdlm_{digest}".encode(), f"redlockdlmfull_{digest}".encode())
    src = src.replace(f"dlm_{digest}_".encode(), f"dlmfull_{digest}_".encode())
    funcs = {n: f.replace(f"dlm_{digest}_".encode(), f"dlmfull_{digest}_".encode())
             for n, f in lib.functions.items()}
    return src.decode(), funcs


class FullPathEngine(Engine):
    """An Engine whose scripts are the full-path library (`full_path_library`)."""

    functions: dict[str, bytes] = {}

    def _call(self, script, keys, args):
        ks = [EPOCH_KEY, self.wkey, *keys]
        try:
            raw = self.client.execute_command("FCALL", self.functions[script], len(ks), *ks,
                                              *args)
        except ResponseError as exc:
            raw = exc
        return script_reply(raw)


def is_compact(blob: bytes | None) -> bool:
    """A compact record (core.lua): a msgpack fixarray of 2 or 15 fields."""
    return blob is not None and blob[:1] in (b"\x92", b"\x9f")


@pytest.fixture
def pair(r):
    src, funcs = full_path_library()
    r.execute_command("FUNCTION", "LOAD", "REPLACE", src)
    FullPathEngine.functions = funcs
    fast = Engine(r, "nsfast", rejoin_ms=5000)
    full = FullPathEngine(r, "nsfull", rejoin_ms=5000)
    fast.init_fresh()
    return r, fast, full


ops = st.one_of(
    st.tuples(st.just("req"), st.sampled_from(PICK_PATH), st.sampled_from(OWNERS),
              st.sampled_from(IDS), st.sampled_from([0, 1, 3, 3, 4, 5, 5]),
              st.sampled_from([0, 0, 0, 1, 2, 64]), st.integers(0, 20),
              st.sampled_from([5000, 5000, 300, 20000]), st.booleans(),
              st.sampled_from([0, 0, 2])),
    st.tuples(st.just("rel"), st.sampled_from(PICK_PATH), st.sampled_from(OWNERS),
              st.sampled_from(IDS), st.one_of(st.none(), st.binary(max_size=8)),
              st.integers(0, 3), st.sampled_from([0, T0 * 1000 + 5 * 10**9])),
    st.tuples(st.just("renew"), st.sampled_from(OWNERS),
              st.lists(st.tuples(st.sampled_from(PICK_PATH), st.sampled_from(IDS),
                                 st.sampled_from([0, 0, T0 * 1000 + 9 * 10**9])),
                       min_size=1, max_size=3),
              st.sampled_from([5000, 100, 20000])),
    st.tuples(st.just("conv"), st.sampled_from(PICK_PATH), st.sampled_from(OWNERS),
              st.sampled_from(IDS), st.sampled_from([0, 3, 5]), st.integers(0, 20)),
    st.tuples(st.just("cancel"), st.sampled_from(PICK_PATH), st.sampled_from(OWNERS),
              st.sampled_from(IDS)),
    st.tuples(st.just("tick"), st.sampled_from([1, 200, 400, 6000])),
)

SEEN = {"fast_records": 0, "fast_calls": 0, "steps": 0}


def apply(e: Engine, now: int, op: tuple):
    """Run `op` on engine `e`: its reply, or the type and message of its error (with the
    namespace taken out)."""
    kind = op[0]
    key = {p: e.key(*p) for p in PATHS}
    try:
        if kind == "req":
            _, path, owner, lid, mode, flags, ticket, lease, child, prio = op
            parent = {}
            if child and path == CHILD:
                parent = {"parent_key": key[("A",)], "parent_id": "l0"}
            if flags & 2:
                mode = 0  # EXPEDITE is for NL requests (G3)
            return e.request(key[path], owner, lid, mode, ticket=ticket, lease_ms=lease,
                             flags=flags, name=e.name(*path), priority=prio, **parent)
        if kind == "rel":
            _, path, owner, lid, value, version, floor = op
            kw = {"parent_key": key[("A",)]} if path == CHILD else {}
            if path == ("A",):
                kw = {"child_keys": [key[CHILD]], "subtree": version == 3}
            return e.release(key[path], owner, lid, value=value, version=version,
                             floor=floor, **kw)
        if kind == "renew":
            _, owner, items, lease = op
            return e.renew(owner, lease, [(key[p], lid, f) for p, lid, f in items])[1]
        if kind == "conv":
            _, path, owner, lid, mode, ticket = op
            return e.convert(key[path], owner, lid, mode, ticket=100 + ticket, lease_ms=5000)
        if kind == "cancel":
            _, path, owner, lid = op
            kw = {"parent_key": key[("A",)]} if path == CHILD else {}
            return e.cancel(key[path], owner, lid, **kw)
    except DLMError as exc:
        return type(exc), str(exc).replace(e.ns.decode(), "NS")
    raise AssertionError(op)


def state(r, e: Engine) -> tuple:
    keys = [e.key(*p) for p in PATHS]
    _, views = e.inspect(keys)  # (the fast library's inspect reads both forms)
    prefix = b"dlm:{" + e.ns + b":"  # (keys.py: the namespace's key prefix)

    def lock(lk):
        return dataclasses.replace(lk, kids=tuple((k.replace(prefix, b"K"), i)
                                                  for k, i in lk.kids))
    views = [v and dataclasses.replace(v, key=b"", locks=tuple(lock(lk) for lk in v.locks))
             for v in views]
    waiters = [(m.replace(prefix, b"K"), s) for m, s in e.waiters()]
    return views, waiters


@pytest.mark.timeout(300)
def test_fast_path_decides_as_the_full_path(pair) -> None:
    r, fast, full = pair
    SEEN.update(fast_records=0, fast_calls=0, steps=0)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.booleans(), st.lists(ops, min_size=8, max_size=40))
    def run(restarted, seq):
        for e in (fast, full):
            r.delete(*[e.key(*p) for p in PATHS], e.wkey)
        now = T0
        if restarted:  # E1, V5: the first call creates the epoch, recovering for 5 s
            r.delete(EPOCH_KEY)
        else:
            fast.init_fresh(force=True)
        fast.set_clock(frozen_ms=now)  # (one clock: the instance's)
        for op in seq:
            if op[0] == "tick":
                now += op[1]
                fast.set_clock(frozen_ms=now)
                continue
            if op[0] in ("req", "rel"):  # the fast path's calls, on what it handles
                blob = r.get(fast.key(*op[1]))
                SEEN["fast_calls"] += blob is None or is_compact(blob)
            a = apply(fast, now, op)
            b = apply(full, now, op)
            assert a == b, (op, a, b)
            sa, sb = state(r, fast), state(r, full)
            assert sa == sb, (op, "\n", sa, "\n", sb)
            SEEN["steps"] += 1
            for p in PATHS:
                SEEN["fast_records"] += is_compact(r.get(fast.key(*p)))
                assert not is_compact(r.get(full.key(*p)))

    run()
    # the sequences did reach the fast path's records (not only the full path's maps)
    assert SEEN["fast_records"] > SEEN["steps"] // 4, SEEN
    assert SEEN["fast_calls"] > SEEN["steps"] // 4, SEEN


# ----------------------------------------------------------------------------- storage


def test_lone_lock_and_tombstone_are_compact_records(r) -> None:
    """A resource with one granted lock is a 15-field array, its tombstone a 2-field one
    with the tombstone's TTL; a second lock or a queue turns it back into the map, and
    the release of the other lock into a record again; the lock keeps every field."""
    e = Engine(r, "c", rejoin_ms=5000)
    e.init_fresh()
    k = e.key("R")
    a = e.request(k, "o1", "a", 5, ticket=1, lease_ms=60000, name=e.name("R"), priority=7)
    blob = r.get(k)
    assert blob[:1] == b"\x9f" and r.pttl(k) == -1
    b = e.request(k, "o2", "b", 5, ticket=2, lease_ms=60000)
    assert b.status.name == "QUEUED" and r.get(k)[:1] != b"\x9f"
    e.cancel(k, "o2", "b")
    assert r.get(k)[:1] == b"\x9f"
    _, (view,) = e.inspect([k])
    (lk,) = view.locks
    assert (lk.lock_id, lk.owner, int(lk.mode), lk.priority) == ("a", "o1", 5, 7)
    assert view.seq == a.token and view.name == e.name("R")
    e.release(k, "o1", "a", floor=a.token + 10)
    blob = r.get(k)
    assert blob[:1] == b"\x92" and 0 < r.pttl(k) <= 60000
    _, (view,) = e.inspect([k])
    assert view.seq == a.token + 10 and view.locks == ()
    again = e.request(k, "o1", "c", 3, ticket=3, lease_ms=60000)
    assert again.token > a.token + 10  # F1: the floor kept by the tombstone


def test_a_lone_record_is_smaller_than_the_map(r, pair) -> None:
    """Memory per held lock: the compact record of a lone lock is smaller than the map."""
    _, fast, full = pair
    for e in (fast, full):
        e.request(e.key("M"), "owner-0001", "lock-0000000001", 5, ticket=1, lease_ms=60000,
                  name=e.name("M"))
    f, g = r.get(fast.key("M")), r.get(full.key("M"))
    assert is_compact(f) and not is_compact(g)
    assert len(f) < len(g) - 30, (len(f), len(g))


@pytest.mark.parametrize("blob", [
    b"\x92\x01\x02",  # a 2-array whose name is not a string
    b"\x9f" + b"\x01" * 15,  # 15 fields of the wrong types
    b"\x93\xa1n\x01\xa1v",  # 3 fields, the third not a version: neither form
    b"\x94\xa1n\x01\x02\x03",  # 4 fields: neither form
])
def test_a_malformed_compact_record_is_corrupt(r, blob: bytes) -> None:
    """K1: bytes that look like a compact record but are not one are DLM_CORRUPT on every
    path (fast: request, release, renew; and the full path's scripts), and stay as they
    were."""
    e = Engine(r, "k", rejoin_ms=5000)
    e.init_fresh()
    k = e.key("C")
    r.set(k, blob)
    with pytest.raises(CorruptKey):
        e.request(k, "o1", "a", 5, ticket=1, lease_ms=1000)
    with pytest.raises(CorruptKey):
        e.release(k, "o1", "a")
    with pytest.raises(CorruptKey):
        e.convert(k, "o1", "a", 3, ticket=1, lease_ms=1000)
    _, (entry,) = e.renew("o1", 1000, [(k, "a", 0)])
    assert entry.status.name == "CORRUPT"
    assert r.get(k) == blob


# ----------------------------------------------------------------------------- epoch


def test_the_epoch_is_read_from_one_joined_field_that_follows_the_others(r) -> None:
    """E1: `all` joins id, safe, rejoin, tfix and toff, and every script that changes one of
    them rewrites it; a hash without it (written before it existed) is read field by field
    and gets it from the next call, with the same decisions."""
    e = Engine(r, "ep", rejoin_ms=5000)
    e.init_fresh(rejoin_ms=7000)

    def joined() -> bytes:
        h = r.hgetall("dlm:epoch")
        return b"|".join([h[b"id"], h[b"safe"], h.get(b"rejoin", b""), h.get(b"tfix", b""),
                          h.get(b"toff", b"")])

    assert r.hget("dlm:epoch", "all") == joined()
    e.set_clock(frozen_ms=T0, offset_ms=0)
    assert r.hget("dlm:epoch", "all") == joined() and b"|%d|" % T0 in joined()
    k = e.key("E")
    assert e.request(k, "o1", "a", 5, ticket=1, lease_ms=1000).status.name == "GRANTED"
    e.raise_rejoin(9000)
    assert r.hget("dlm:epoch", "all") == joined() and b"|9000|" in joined()
    r.hdel("dlm:epoch", "all")
    rep = e.request(k, "o1", "a", 5, ticket=1, lease_ms=1000)  # G12, the clock still frozen
    assert (rep.status.name, rep.epoch) == ("GRANTED", r.hget("dlm:epoch", "id").decode())
    assert r.hget("dlm:epoch", "all") == joined()
    e.set_clock(frozen_ms=T0 + 2000)  # the lease is over: expired on the fast path's read
    assert e.release(k, "o1", "a").status.name == "NOTFOUND"
    assert r.hget("dlm:epoch", "all") == joined()
    e.set_clock()  # unfrozen: tfix gone from both
    assert r.hget("dlm:epoch", "all") == joined() and not r.hexists("dlm:epoch", "tfix")


def test_a_restarted_instance_creates_its_epoch_on_the_fast_path(r) -> None:
    """E1: the first request on an instance without an epoch creates it (recovering), on a
    free resource: RECOVERING, nothing granted, and the joined field written."""
    e = Engine(r, "rs", rejoin_ms=5000)
    k = e.key("S")
    rep = e.request(k, "o1", "a", 5, ticket=1, lease_ms=1000)
    assert rep.status.name == "RECOVERING" and r.get(k) is None
    h = r.hgetall("dlm:epoch")
    assert h[b"all"] == b"|".join([h[b"id"], h[b"safe"], h[b"rejoin"], b"", b""])
