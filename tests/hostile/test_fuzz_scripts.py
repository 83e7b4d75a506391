"""Property-based fuzzing of every script and of the public Python API with hostile input.

Every script is called through `call_script` (FCALL, exactly what the clients send) with
random and malformed keys and arguments. Properties (docs/design.md §9, "Bad input"):

* the call succeeds or raises a typed redlockdlm error (a `DLMError`), never a raw redis
  `ResponseError` and never a Lua runtime error (`DLM_INTERNAL`, "attempt to ...",
  "user_function", "script:");
* it never changes other locks: a fixed background state (granted, converting and waiting
  locks of other owners, a parent and its child, a value block, the waiter index and the
  epoch hash) is byte-identical after every call aimed at other keys or other owners;
* a call that raised changed nothing at all (every key and value of the database).

The clock of the scripts is frozen (`Engine.set_clock`), so leases neither run out nor
show a different "lease left" between two snapshots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_harness import RedisServer

from redlockdlm import DLM
from redlockdlm.engine.codec import as_mode
from redlockdlm.engine.instance import Engine, call_script
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.engine.modes import Mode, Status
from redlockdlm.engine.scripts import SCRIPT_NAMES
from redlockdlm.errors import DLMError, InvalidArgument, InvalidType, NotOwner

T0 = 1_800_000_000_000  #: frozen clock of the scripts, ms
LEASE = 3_600_000
BG, FZ = "bg", "fz"  #: background namespace; the fuzzed calls' namespace

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

RAW_ERROR_MARKS = ("DLM_INTERNAL", "attempt to", "user_function", "user_script", "script:",
                   "WRONGTYPE", "Lua redis lib")


# ----------------------------------------------------------------- the background


@dataclass(frozen=True)
class BgLock:
    key: bytes
    lock_id: str
    owner: str
    parent_key: bytes | None = None


@dataclass
class World:
    c: redis.Redis
    bg: Engine
    fz: Engine
    keys: list[bytes]
    locks: list[BgLock]
    url: str = ""

    def bg_snapshot(self) -> tuple:
        """The background as inspect shows it, its raw blobs, index and epoch hash."""
        st_, views = self.bg.inspect(self.keys)
        blobs = [self.c.get(k) for k in self.keys]
        return (st_, views, blobs, self.bg.waiters(), sorted(self.c.hgetall(EPOCH_KEY).items()))

    def full_snapshot(self) -> dict:
        """Every key and its value (DUMP-free: GET, HGETALL or ZRANGE by type)."""
        keys = list(self.c.scan_iter(count=1000))
        p = self.c.pipeline(transaction=False)
        for k in keys:
            p.type(k)
        types = p.execute()
        for k, t in zip(keys, types):
            {b"string": p.get, b"hash": p.hgetall, b"zset": lambda k: p.zrange(
                k, 0, -1, withscores=True)}.get(t, p.type)(k)
        return {k: sorted(v.items()) if isinstance(v, dict) else v
                for k, v in zip(keys, p.execute())}

    def restore_clock(self) -> None:
        self.bg.set_clock(T0, 0)

    def trim(self) -> None:
        """Keep the fuzz namespace small (its state carries over between examples), and
        its keys from expiring by Redis's own clock (tombstones live 60 s of real time)
        while a long run compares snapshots."""
        fz = list(self.c.scan_iter(match=b"dlm:{fz:*", count=1000))
        if len(fz) > 300:
            self.c.delete(*fz, self.fz.wkey)
        elif fz:
            p = self.c.pipeline(transaction=False)
            for k in fz:
                p.persist(k)
            p.execute()


def _build_background(e: Engine) -> list[BgLock]:
    """Granted, converting and waiting locks of several owners; a parent with a child
    (granted and waiting); a value block; an NL lock."""
    kw = {"lease_ms": LEASE}
    shared, parent, value = e.key("shared"), e.key("parent"), e.key("value")
    child = e.key("parent", "child")
    ok = {Status.GRANTED, Status.QUEUED}

    def req(key: bytes, owner: str, lid: str, mode: Mode, ticket: int, name: bytes,
            **extra: object) -> None:
        assert e.request(key, owner, lid, mode, ticket=ticket, name=name, **kw,
                         **extra).status in ok

    req(shared, "ob1", "a1", Mode.PR, 1, e.name("shared"))
    req(shared, "ob2", "a2", Mode.PR, 2, e.name("shared"))
    assert e.convert(shared, "ob2", "a2", Mode.EX, ticket=3, **kw).status == Status.QUEUED
    req(shared, "ob3", "a3", Mode.EX, 4, e.name("shared"))
    req(parent, "ob1", "p1", Mode.PR, 5, e.name("parent"))
    req(parent, "ob4", "p4", Mode.PR, 6, e.name("parent"))
    req(child, "ob1", "c1", Mode.EX, 7, e.name("parent", "child"), parent_key=parent,
        parent_id="p1")
    req(child, "ob4", "c4", Mode.EX, 8, e.name("parent", "child"), parent_key=parent,
        parent_id="p4")
    req(value, "ob5", "v5", Mode.EX, 9, e.name("value"))
    assert e.convert(value, "ob5", "v5", Mode.PW, ticket=10, value=b"vb-hello", version=1,
                     **kw).status == Status.GRANTED
    req(value, "ob6", "n6", Mode.NL, 11, e.name("value"))
    return [BgLock(shared, "a1", "ob1"), BgLock(shared, "a2", "ob2"),
            BgLock(shared, "a3", "ob3"), BgLock(parent, "p1", "ob1"),
            BgLock(parent, "p4", "ob4"), BgLock(child, "c1", "ob1", parent),
            BgLock(child, "c4", "ob4", parent), BgLock(value, "v5", "ob5"),
            BgLock(value, "n6", "ob6")]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with RedisServer() as srv:
        c = srv.client()
        bg = Engine(c, BG, rejoin_ms=0)
        bg.init_fresh()
        bg.set_clock(T0, 0)
        locks = _build_background(bg)
        keys = sorted({lk.key for lk in locks})
        w = World(c, bg, Engine(c, FZ, rejoin_ms=0), keys, locks, srv.url)
        # the background is what we think it is
        _, views = bg.inspect(keys)
        queues = {lk.lock_id: lk.queue for v in views for lk in v.locks}
        assert queues == {"a1": "G", "a2": "C", "a3": "W", "p1": "G", "p4": "G", "c1": "G",
                          "c4": "W", "v5": "G", "n6": "G"}
        assert len(bg.waiters()) == 3
        yield w


# ----------------------------------------------------------------- hostile values

HOSTILE_NUMBERS = [b"", b"-1", b"-0", b"+1", b"0x10", b" 1", b"1 ", b"1.5", b"nan", b"inf",
                   b"-inf", b"1e400", b"1e3", str(2**64).encode(), str(2**53 + 1).encode(),
                   str(2**52 + 1).encode(), b"9" * 17, b"9" * 300, "\uff11".encode(),
                   b"\x00", b"1\x00", b"\xff\xfe"]
NAMES = [b"{", b"}", b"{}", b":", b"/", b"%", b"%7B", b"\n", b"a\r\nb", b"\x00", b"a\x00b",
         b"x" * 10_000, b"\xff\xfe\xfd", "\u00e9\u4e2d".encode(), b"*", b"?", b"[a]", b"|",
         b"dlm:{bg:shared}", b" ", b"-"]
IDS = ["o1", "o2", "i1", "i2", "i3", "p", "x" * 64, "x" * 65, "a b", " a", "a\n", "a|b", "",
       "\u00e9", "ob1", "a1", "a{b}", "a/b", "a%b", "a\x00"]


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _num(n: int) -> bytes:
    return str(n).encode()


def _fz_key(name: bytes, child: bytes | None = None) -> bytes:
    key = b"dlm:{fz:" + name + b"}"
    return key if child is None else key + b"/" + child


@dataclass(frozen=True)
class Slot:
    """One key or argument: a well-formed value, or a hostile one."""

    valid: st.SearchStrategy
    hostile: st.SearchStrategy


V_IDS = st.sampled_from(["o1", "o2", "i1", "i2", "i3", "p"]).map(_utf8)
H_IDS = st.one_of(st.sampled_from(IDS).map(_utf8), st.binary(max_size=70),
                  st.text(st.characters(codec="utf-8"), max_size=70).map(_utf8))
H_NUMBERS = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS),
    st.one_of(st.integers(-2**64, -1), st.integers(2**52 + 1, 2**70)).map(_num),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).encode()))

EPOCH = Slot(st.just(EPOCH_KEY), st.sampled_from([b"dlm:epoch2", b"", b"dlm:fz:waiters",
                                                  _fz_key(b"r1"), b"dlm:bg:waiters"]))
WAITERS = Slot(st.just(b"dlm:fz:waiters"),
               st.sampled_from([b"dlm:bg:waiters", b"dlm:zz:waiters", b"dlm:fz:waiters:",
                                _fz_key(b"r1"), EPOCH_KEY, b"", b"dlm:" + b"n" * 65 + b":waiters"]))
RESOURCE = Slot(
    st.one_of(st.sampled_from([_fz_key(b"r1"), _fz_key(b"r2"), _fz_key(b"r1", b"k")]),
              st.builds(_fz_key, st.sampled_from(NAMES)),
              st.builds(_fz_key, st.binary(min_size=1, max_size=40)),
              st.builds(_fz_key, st.sampled_from(NAMES), st.sampled_from(NAMES))),
    st.sampled_from([b"", b"x", EPOCH_KEY, b"dlm:fz:waiters", b"dlm:{zz:other}",
                     b"dlm:zz:waiters", b"dlm:{fz", b"dlm:{fz:", b"dlm:{FZ:r1}",
                     b"dlm:bg:waiters", b"dlm:{fz:" + b"k" * 70_000 + b"}"]))
REJOIN = Slot(st.sampled_from([b"0", b"30000"]), st.one_of(H_NUMBERS, st.just(b"86400001")))
CHANNEL = Slot(st.just(b"dlm:fz:ch:"),
               st.sampled_from([b"", b"dlm:bg:ch:", b"dlm:fz:ch", b"x", b"dlm:fz:ch:\x00"]))
ID = Slot(V_IDS, H_IDS)
OPT_ID = Slot(st.one_of(st.just(b""), V_IDS), H_IDS)
MODE = Slot(st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5"]),
            st.sampled_from([b"6", b"-1", b"EX", b"", b"05", b"5 ", b"1.0", b"5\x00"]))
FLAGS = Slot(st.sampled_from([b"0", b"0", b"1", b"2", b"4", b"8", b"16", b"32", b"64"]),
             st.one_of(st.sampled_from([b"255", b"256", b"3", b"128", b"-1"]), H_NUMBERS))
NUMBER = Slot(st.integers(0, 2**52).map(_num), H_NUMBERS)
LEASE_MS = Slot(st.integers(1, 300_000).map(_num), st.one_of(H_NUMBERS, st.just(b"0")))
VBMAX = Slot(st.sampled_from([b"64", b"0", b"65536"]), st.sampled_from([b"65537", b"-1", b""]))
FLAG01 = Slot(st.sampled_from([b"0", b"1"]), st.sampled_from([b"2", b"", b"x", b"01"]))
VALUE = Slot(st.binary(max_size=70), st.just(b"v" * 65_537))
NAME = Slot(st.one_of(st.sampled_from(NAMES), st.binary(max_size=40)),
            st.just(b"n" * 16_400))
REASON = Slot(st.sampled_from([b"cancel", b"deadlock"]), st.sampled_from([b"", b"x", b"Cancel"]))
INIT_CMD = Slot(st.sampled_from([b"status", b"fresh", b"clock"]),
                st.sampled_from([b"", b"x", b"STATUS", b"fresh\x00"]))
CLOCK = Slot(st.sampled_from([str(T0).encode(), b"0", b""]), H_NUMBERS)

ARGS = {  # ARGV slots after (rejoin_ms, channel prefix), as in each script's header
    "request": [ID, ID, MODE, FLAGS, NUMBER, LEASE_MS, OPT_ID, NAME],
    "convert": [ID, ID, MODE, FLAGS, NUMBER, LEASE_MS, FLAG01, VALUE, NUMBER, VBMAX, NUMBER],
    "release": [ID, ID, FLAGS, FLAG01, VALUE, NUMBER, VBMAX, NUMBER],
    "cancel": [ID, ID, REASON, FLAG01],
    "yield": [ID, ID],
    "break": [OPT_ID, OPT_ID],
}
NKEYS = {"request": 2, "convert": 1, "release": 2, "cancel": 2, "yield": 1, "break": 1}


def either(slot: Slot) -> st.SearchStrategy:
    return st.one_of(slot.valid, slot.valid, slot.hostile)


modes, flags, numbers, small = either(MODE), either(FLAGS), either(NUMBER), either(LEASE_MS)
values, names = either(VALUE), either(NAME)


@st.composite
def call_of(draw: st.DrawFn, name: str) -> tuple[list[bytes], list[bytes]]:
    """Keys and arguments for script `name`. Either every slot may be hostile (one in four),
    or all are well-formed but one, or all are well-formed: so calls get past their first
    checks and the later ones are reached too. Sometimes too few or too many of either."""
    style = draw(st.sampled_from(["one hostile", "one hostile", "well-formed", "any"]))
    n = draw(st.integers(1, 3)) if name in ("release", "renew", "inspect", "scan") else 0
    if name in ("inspect", "scan"):  # read-only views: KEYS[1] the epoch, then resources
        key_slots, arg_slots = [EPOCH] + [RESOURCE] * n, []
    elif name == "init":
        key_slots, arg_slots = [EPOCH], [INIT_CMD, CLOCK, CLOCK]
    elif name == "renew":
        key_slots = [EPOCH, WAITERS] + [RESOURCE] * n
        arg_slots = [REJOIN, CHANNEL, ID, LEASE_MS] + [ID, NUMBER] * n
    elif name in ARGS:
        key_slots = [EPOCH, WAITERS] + [RESOURCE] * (NKEYS[name] + max(0, n - 1))
        arg_slots = [REJOIN, CHANNEL] + ARGS[name]
    else:  # a script this file does not know yet: the common layout, any arguments
        key_slots = [EPOCH, WAITERS, RESOURCE, RESOURCE]
        arg_slots = [REJOIN, CHANNEL, ID, ID, NUMBER, NUMBER, MODE, FLAGS]
    slots = key_slots + arg_slots
    bad = draw(st.integers(0, len(slots) - 1)) if style == "one hostile" else -1
    values = []
    for i, slot in enumerate(slots):
        hostile = i == bad or (style == "any" and draw(st.integers(0, 3)) == 0)
        values.append(draw(slot.hostile if hostile else slot.valid))
    keys, args = values[:len(key_slots)], values[len(key_slots):]
    how = draw(st.sampled_from(["as is"] * 14 + ["fewer keys", "more keys", "no keys",
                                                  "fewer args", "more args", "no args"]))
    if how == "fewer keys":
        keys = keys[:draw(st.integers(0, max(0, len(keys) - 1)))]
    elif how == "more keys":
        keys = keys + [draw(RESOURCE.valid) for _ in range(draw(st.integers(1, 3)))]
    elif how == "no keys":
        keys = []
    elif how == "fewer args":
        args = args[:draw(st.integers(0, max(0, len(args) - 1)))]
    elif how == "more args":
        args = args + [draw(st.one_of(NUMBER.valid, H_IDS)) for _ in range(draw(st.integers(1, 4)))]
    elif how == "no args":
        args = []
    return keys, args


# ----------------------------------------------------------------- the properties


def _typed_or_none(exc: BaseException | None) -> None:
    """The call either succeeded or raised a typed redlockdlm error (no Lua runtime error)."""
    if exc is None:
        return
    assert isinstance(exc, DLMError), f"untyped {type(exc).__name__}: {exc}"
    text = str(exc)
    for mark in RAW_ERROR_MARKS:
        assert mark not in text, f"Lua runtime error leaked: {type(exc).__name__}: {text}"


def _call(w: World, name: str, keys: list[bytes], args: list[bytes]) -> BaseException | None:
    try:
        call_script(w.c, name, keys, args)
    except Exception as exc:  # noqa: BLE001 - judged by _typed_or_none
        return exc
    return None


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_fuzzed_calls_are_typed_and_leave_other_locks_alone(world: World, name: str) -> None:
    bg_before = world.bg_snapshot()

    @FAST
    @given(call=call_of(name))
    def prop(call: tuple[list[bytes], list[bytes]]) -> None:
        keys, args = call
        before = world.full_snapshot()
        exc = _call(world, name, keys, args)
        _typed_or_none(exc)
        if name == "init" and exc is None and args[:1] == [b"clock"]:
            world.restore_clock()  # the test clock is the epoch hash's by design
        if exc is not None:
            assert world.full_snapshot() == before, "a call that raised changed something"
        assert world.bg_snapshot() == bg_before, "a fuzzed call changed the background"
        world.trim()

    prop()


@st.composite
def cross_call(draw: st.DrawFn) -> tuple[str, list[bytes], list[bytes]]:
    """A call on a background lock by another owner (possibly another background owner),
    with any other argument fuzzed: the lock id is guessed right, the owner is not."""
    lk: BgLock = draw(st.sampled_from(world_locks))
    owner = draw(st.one_of(st.sampled_from(["ob1", "ob2", "ob3", "ob4", "ob5", "ob6", "o1"]),
                           st.text("abc:._-", min_size=1, max_size=8)).filter(
        lambda o: o != lk.owner))
    name = draw(st.sampled_from(["request", "convert", "release", "cancel", "yield", "renew"]))
    head = [EPOCH_KEY, b"dlm:bg:waiters"]
    common = [draw(st.sampled_from([b"0", b"30000"])), b"dlm:bg:ch:", owner.encode(),
              lk.lock_id.encode()]
    pkey = lk.parent_key or lk.key
    if name == "request":
        keys = head + [lk.key, pkey]
        args = common + [draw(modes), draw(flags), draw(numbers), draw(small),
                         draw(st.sampled_from([b"", b"p1", b"p4"])), draw(names)]
    elif name == "convert":
        keys = head + [lk.key]
        args = common + [draw(modes), draw(flags), draw(numbers), draw(small),
                         draw(st.sampled_from([b"0", b"1"])), draw(values), draw(numbers),
                         draw(small), draw(numbers)]
    elif name == "release":
        keys = head + [lk.key, pkey] + ([lk.key + b"/child"] if lk.lock_id in ("p1", "p4")
                                        else [])
        args = common + [draw(st.sampled_from([b"0", b"32"])), draw(st.sampled_from([b"0", b"1"])),
                         draw(values), draw(numbers), draw(small), draw(numbers)]
    elif name == "cancel":
        keys = head + [lk.key, pkey]
        args = common + [draw(st.sampled_from([b"cancel", b"deadlock"])),
                         draw(st.sampled_from([b"0", b"1"]))]
    elif name == "yield":
        keys = head + [lk.key]
        args = common
    else:  # renew: the other's lock, alone or after one of the caller's own
        keys = head + [lk.key]
        args = common[:3] + [draw(small), lk.lock_id.encode(), draw(numbers)]
    return name, keys, args


#: filled by the fixture-free strategy above (the background's locks are fixed)
world_locks: list[BgLock] = []


def test_other_owners_cannot_touch_background_locks(world: World) -> None:
    world_locks[:] = world.locks
    bg_before = world.bg_snapshot()

    @settings(FAST, max_examples=150)
    @given(call=cross_call())
    def prop(call: tuple[str, list[bytes], list[bytes]]) -> None:
        name, keys, args = call
        before = world.full_snapshot()
        exc = _call(world, name, keys, args)
        assert exc is not None, f"{name} by another owner succeeded: {keys} {args}"
        _typed_or_none(exc)
        assert isinstance(exc, (NotOwner, InvalidArgument)), repr(exc)
        assert world.full_snapshot() == before
        assert world.bg_snapshot() == bg_before

    prop()


def test_regressions_found_by_fuzzing(world: World) -> None:
    """Each of these was a Lua runtime error, a partial write or damage to another
    namespace before rule K1 (docs/rules.md)."""
    fz, before = world.fz, world.bg_snapshot()
    good = [b"0", b"dlm:fz:ch:", b"o1", b"i1", b"5", b"0", b"1", b"1000", b"", b"n"]
    bad = [
        ("request", [EPOCH_KEY, fz.wkey], good),  # GET of a missing KEYS[3]: DLM_INTERNAL
        ("request", [EPOCH_KEY, fz.wkey, _fz_key(b"r")],  # a parent but no KEYS[4]
         good[:8] + [b"p", b"n"]),
        ("request", [EPOCH_KEY, fz.wkey, fz.wkey, fz.wkey], good),  # the index as a resource
        ("request", [EPOCH_KEY, b"dlm:bg:waiters", _fz_key(b"r"), _fz_key(b"r")], good),
        ("request", [_fz_key(b"r"), fz.wkey, _fz_key(b"r"), _fz_key(b"r")], good),
        ("request", [EPOCH_KEY, fz.wkey, _fz_key(b"r"), _fz_key(b"r")],
         good[:1] + [b"dlm:bg:ch:"] + good[2:]),  # events into another namespace
        ("break", [EPOCH_KEY, fz.wkey], [b"0", b"dlm:fz:ch:", b"i1", b""]),
        ("inspect", [EPOCH_KEY, fz.wkey], []),  # GET of a zset: WRONGTYPE
        ("init", [fz.wkey], [b"status"]),
        ("init", [EPOCH_KEY], [b"clock", b"9" * 30, b"0"]),  # a clock beyond a double
    ]
    for name, keys, args in bad:
        snap = world.full_snapshot()
        exc = _call(world, name, keys, args)
        assert isinstance(exc, InvalidArgument), (name, keys, args, exc)
        _typed_or_none(exc)
        assert world.full_snapshot() == snap, (name, keys, args)
    assert world.bg_snapshot() == before


def test_a_huge_fencing_floor_is_refused_so_tokens_keep_increasing(world: World) -> None:
    """F1: sequences are Lua doubles; a floor of 2**53 - 1 used to freeze them (seq + 1 ==
    seq), so two conflicting holders got the same token."""
    e = world.fz
    k = e.key("floor")
    kw = {"ticket": 1, "lease_ms": LEASE}
    e.request(k, "o1", "f1", Mode.EX, **kw)
    for floor in (2**53 - 1, 2**52 + 1):
        with pytest.raises(InvalidArgument):
            e.release(k, "o1", "f1", floor=floor)
    e.release(k, "o1", "f1", floor=2**52)  # the largest floor accepted
    tokens = []
    for i in range(3):
        tokens.append(e.request(k, "o1", f"g{i}", Mode.EX, **kw).token)
        e.release(k, "o1", f"g{i}")
    assert tokens[0] > 2**52 and tokens == sorted(set(tokens)), tokens
    assert all(math.isfinite(t) for t in tokens)


def test_another_owners_request_does_not_rename_a_resource(world: World) -> None:
    """K2: a request with the wrong display name (here refused with NOTQUEUED) leaves the
    resource's name as it was, so `dlm ls PREFIX` still finds it."""
    e = world.fz
    k = e.key("named")
    e.request(k, "o1", "n1", Mode.EX, ticket=1, lease_ms=LEASE, name=e.name("named"))
    rep = e.request(k, "o2", "n2", Mode.EX, ticket=2, lease_ms=LEASE, name=b"hidden",
                    flags=1)
    assert rep.status == Status.NOTQUEUED
    rep = e.request(k, "o2", "n3", Mode.NL, ticket=3, lease_ms=LEASE, name=b"hidden")
    assert rep.status == Status.GRANTED
    assert e.inspect([k])[1][0].name == b"named"
    e.release(k, "o1", "n1")
    e.release(k, "o2", "n3")


# ----------------------------------------------------------------- the Python API


WRONG = [None, 1.5, float("nan"), [], ["EX"], {}, True, b"\xff", object(), -1, 2**70, "",
         "x" * 65, "a b", "\udc80"]


@st.composite
def engine_call(draw: st.DrawFn) -> tuple[str, dict]:
    op = draw(st.sampled_from(["request", "convert", "release", "cancel", "yield_", "renew",
                               "break_", "inspect"]))
    good = {"key": b"dlm:{fz:api}", "owner": "o1", "lock_id": "l1", "mode": Mode.EX,
            "ticket": 5, "lease_ms": 1000, "flags": 0, "name": b"api", "value": None,
            "version": 0, "floor": 0, "reason": "cancel", "child_keys": (),
            "parent_key": None, "parent_id": ""}
    params = {
        "request": ["key", "owner", "lock_id", "mode", "ticket", "lease_ms", "flags", "name",
                    "parent_key", "parent_id"],
        "convert": ["key", "owner", "lock_id", "mode", "ticket", "lease_ms", "flags", "value",
                    "version", "floor"],
        "release": ["key", "owner", "lock_id", "child_keys", "value", "version", "floor",
                    "parent_key"],
        "cancel": ["key", "owner", "lock_id", "reason", "parent_key"],
        "yield_": ["key", "owner", "lock_id"],
        "renew": ["owner", "lease_ms", "items"],
        "break_": ["key", "lock_id", "owner"],
        "inspect": ["keys"],
    }[op]
    kw = {p: good.get(p) for p in params}
    if op == "renew":
        kw["items"] = [(b"dlm:{fz:api}", "l1", 0)]
    if op == "inspect":
        kw["keys"] = [b"dlm:{fz:api}"]
    bad = draw(st.sampled_from(params))
    kw[bad] = draw(st.sampled_from(WRONG))
    return op, kw


def _invoke(e: Engine, op: str, kw: dict) -> None:
    kw = dict(kw)
    if op in ("request", "convert", "release", "cancel", "yield_"):
        getattr(e, op)(kw.pop("key"), kw.pop("owner"), kw.pop("lock_id"),
                       *([kw.pop("mode")] if op in ("request", "convert") else []), **kw)
    elif op == "renew":
        e.renew(kw["owner"], kw["lease_ms"], kw["items"])
    elif op == "break_":
        e.break_(kw.pop("key"), **kw)
    else:
        e.inspect(kw["keys"])


def test_engine_api_with_wrong_types_raises_typed_errors(world: World) -> None:
    before = world.bg_snapshot()

    @settings(FAST, max_examples=200)
    @given(call=engine_call())
    def prop(call: tuple[str, dict]) -> None:
        op, kw = call
        snap = world.full_snapshot()
        try:
            _invoke(world.fz, op, kw)
        except (InvalidArgument, InvalidType) as exc:
            assert isinstance(exc, (ValueError, TypeError))
            assert world.full_snapshot() == snap
        except NotOwner:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{op}({kw}) raised untyped {type(exc).__name__}: {exc}")
        finally:
            view = world.fz.inspect([b"dlm:{fz:api}"])[1][0]
            for lk in view.locks if view else ():
                world.fz.break_(b"dlm:{fz:api}", lock_id=lk.lock_id)

    prop()
    assert world.bg_snapshot() == before


def test_engine_constructor_and_keys_with_wrong_types(world: World) -> None:
    for bad in (None, 5, b"ns", "a b", "", "x" * 65):
        with pytest.raises((InvalidArgument, InvalidType)):
            Engine(world.c, bad)  # type: ignore[arg-type]
    for bad in (None, 5, ["a"], b"", "a\x00", "x" * 1025, "\udc80"):
        with pytest.raises((InvalidArgument, InvalidType)):
            world.fz.key(bad)  # type: ignore[arg-type]
    e = Engine(world.c, FZ, rejoin_ms="1")  # type: ignore[arg-type]
    with pytest.raises(InvalidType):
        e.request(e.key("r"), "o1", "i1", Mode.EX, ticket=1, lease_ms=10)


LOCK_KW = {"resource": "api", "mode": Mode.EX, "timeout": 5, "noqueue": False,
           "expedite": False, "no_deadlock_wait": False, "on_blocking": None,
           "on_lost": None, "lease_ms": 10_000, "parent": None}


def _no_lock_left(w: World, d: DLM) -> bool:
    view = w.fz.inspect([w.fz.key("api")])[1][0]
    return not d._core.locks and (view is None or not view.locks)


def test_dlm_lock_with_wrong_types_raises_typed_errors(world: World) -> None:
    """DLM.lock (and Lock.convert) with a wrong value in one argument: InvalidArgument or
    InvalidType (also ValueError / TypeError), or it works; never another exception, and
    nothing left behind in the client or on the instance."""
    before = world.bg_snapshot()
    with DLM([world.url], FZ) as d:

        @settings(FAST, max_examples=120)
        @given(bad=st.sampled_from(list(LOCK_KW)), value=st.sampled_from(WRONG),
               convert_to=st.sampled_from(WRONG + ["PR", Mode.NL]))
        def prop(bad: str, value: object, convert_to: object) -> None:
            kw = dict(LOCK_KW, **{bad: value})
            try:
                lk = d.lock(**kw)
            except (InvalidArgument, InvalidType) as exc:
                assert isinstance(exc, (ValueError, TypeError))
                assert _no_lock_left(world, d)
                return
            try:
                lk.convert(convert_to, timeout=1)
            except (InvalidArgument, InvalidType):
                assert lk.valid and lk.mode == as_mode(kw["mode"])  # kept its mode
            lk.release()
            assert _no_lock_left(world, d)

        prop()
    assert world.bg_snapshot() == before


DLM_KW = {"namespace": FZ, "lease_ms": 10_000, "socket_timeout": 1.0, "connect_timeout": 1.0,
          "rejoin_ms": None, "vbmax": 64, "owner": None}


def test_dlm_constructor_with_wrong_types_raises_typed_errors(world: World) -> None:
    @settings(FAST, max_examples=80)
    @given(bad=st.sampled_from(["urls", *DLM_KW]), value=st.sampled_from(WRONG + [0, 0.0]))
    def prop(bad: str, value: object) -> None:
        kw = dict(DLM_KW)
        urls: object = [world.url]
        if bad == "urls":
            urls = value
        else:
            kw[bad] = value
        try:
            d = DLM(urls, **kw)  # type: ignore[arg-type]
        except (InvalidArgument, InvalidType) as exc:
            assert isinstance(exc, (ValueError, TypeError))
            return
        d.close()

    prop()
