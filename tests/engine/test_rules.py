"""The grant rules of ONE instance (docs/rules.md) checked on a real redis-server.

Table-driven: every case id starts with the rule it checks (M1, G1..G12, H1-H3, V1-V4, F1,
E1, N1-N3, Y1) or with the script it feeds bad input to, so `pytest -k G7` runs one rule.

Most cases are scenarios: a list of setup operations, one operation under test, the fields
expected in its reply and the layout of the resource afterwards, written as
``G[granted=MODE ...] C[converting=OLD>NEW ...] W[waiting>MODE ...]`` (granted locks sorted by
id; the conversion and wait queues in queue order). The scripts' clock is frozen at T0
(`Engine.set_clock`), so leases and tokens are deterministic; `Tick(ms)` advances it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import product
from typing import Any

import pytest
import redis
from redis_harness import RedisServer

from redlockdlm.engine import codec, scripts
from redlockdlm.engine.codec import Event, LockReply, LockView, ResourceView, parse_event
from redlockdlm.engine.instance import Engine, call_script
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.engine.modes import Flag, Mode, Status
from redlockdlm.errors import (
    BadArgument,
    CorruptKey,
    HasChildren,
    InvalidArgument,
    InvalidType,
    LockStateError,
    MissingKeys,
    NotOwner,
)

NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX
GRANTED, QUEUED, NOTQUEUED = Status.GRANTED, Status.QUEUED, Status.NOTQUEUED
DEADLOCK, RECOVERING, NOPARENT = Status.DEADLOCK, Status.RECOVERING, Status.NOPARENT
NOTFOUND, RELEASED, CANCELLED, CANCELGRANT = (Status.NOTFOUND, Status.RELEASED,
                                              Status.CANCELLED, Status.CANCELGRANT)
NOQUEUE, EXPEDITE, QUECVT, CONVDEADLK = Flag.NOQUEUE, Flag.EXPEDITE, Flag.QUECVT, Flag.CONVDEADLK
BLKAST = Flag.BLKAST

NS = "t"
T0 = 1_000_000  # ms: the frozen script clock; grants take tokens max(seq + 1, T0 * 1000)
LEASE = 10_000
RES = ("res",)
OTHER = ("other",)
ROOT = ("db/orders",)
CHILD = ("db/orders", "row:42")
GRANDCHILD = ("db/orders", "row:42", "col:a")
CHAN = b"dlm:" + NS.encode() + b":ch:"

# The compatibility matrix of docs/concepts.md (rule M1), written out independently of
# modes.COMPAT.
# Rows: granted mode, columns: requested mode, NL CR CW PR PW EX.
M1_MATRIX = {
    NL: "yyyyyy",
    CR: "yyyyyn",
    CW: "yyynnn",
    PR: "yynynn",
    PW: "yynnnn",
    EX: "ynnnnn",
}


# ----------------------------------------------------------------------------- the world


class World:
    """An Engine on the test's redis-server, plus who owns which lock on which resource."""

    def __init__(self, r: redis.Redis, e: Engine) -> None:
        self.r = r
        self.e = e
        self.now = T0
        self.owner: dict[str, str] = {}
        self.res: dict[str, tuple[str, ...]] = {}
        self.parent_res: dict[str, tuple[str, ...]] = {}

    def key(self, res: tuple[str, ...] = RES) -> bytes:
        return self.e.key(*res)

    def tick(self, ms: int) -> None:
        self.now += ms
        self.e.set_clock(frozen_ms=self.now)

    def view(self, res: tuple[str, ...] = RES) -> ResourceView | None:
        return self.e.inspect([self.key(res)])[1][0]

    def lock(self, lid: str) -> LockView | None:
        v = self.view(self.res.get(lid, RES))
        if v is None:
            return None
        return next((lk for lk in v.locks if lk.lock_id == lid), None)

    def layout(self, res: tuple[str, ...] = RES) -> str:
        v = self.view(res)
        if v is None:
            return "absent"
        g = sorted(f"{lk.lock_id}={lk.mode.name}" for lk in v.locks if lk.queue == "G")
        c = [f"{lk.lock_id}={lk.mode.name}>{lk.requested.name}"
             for lk in v.locks if lk.queue == "C"]
        wq = [f"{lk.lock_id}>{lk.requested.name}" for lk in v.locks if lk.queue == "W"]
        parts = [f"{q}[{' '.join(x)}]" for q, x in (("G", g), ("C", c), ("W", wq)) if x]
        return " ".join(parts) or "tombstone"

    def snapshot(self) -> tuple:
        """What the scripts may write, as raw replies: the key names, inspect of every
        resource (raw script reply), the waiter index and the epoch hash. (Not DUMP: a
        script may re-pack an unchanged resource with another msgpack key order.)"""
        keys = sorted(self.r.keys(b"*"))
        rkeys = [k for k in keys if k.startswith(b"dlm:{")]
        raw = call_script(self.r, "inspect", [EPOCH_KEY, *rkeys], [])
        return keys, raw, self.e.waiters(), self.r.hgetall(EPOCH_KEY)

    def raw(self, script: str, keys: list[bytes], args: list[bytes]) -> Any:
        """Call a script with hand-built ARGV (bad input the Engine would not build)."""
        return call_script(self.r, script, [EPOCH_KEY, self.e.wkey, *keys], args)


@pytest.fixture
def w(r: redis.Redis) -> World:
    e = Engine(r, NS)
    e.init_fresh()
    e.set_clock(frozen_ms=T0)
    return World(r, e)


class Events:
    """Every event published to any owner of namespace NS, read up to a sentinel."""

    END = CHAN + b"__end__"

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.ps = r.pubsub()
        self.ps.psubscribe(CHAN + b"*")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the subscription is live before any action
            m = self.ps.get_message(timeout=1.0)
            if m is not None and m["type"] == "psubscribe":
                return
        raise AssertionError("no psubscribe confirmation")

    def drain(self) -> list[tuple[str, Event]]:
        self.r.publish(self.END, b"")
        out: list[tuple[str, Event]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            m = self.ps.get_message(timeout=1.0)
            if m is None or m["type"] != "pmessage":
                continue
            if m["channel"] == self.END:
                return out
            out.append((m["channel"][len(CHAN):].decode(), parse_event(m["data"])))
        raise AssertionError("event sentinel not received")

    def close(self) -> None:
        self.ps.close()


@pytest.fixture
def ev(w: World):
    events = Events(w.r)
    yield events
    events.close()


# ----------------------------------------------------------------------------- operations
# Each builder returns op(world) -> reply; `op.lid` names the lock it acts on.

Op = Callable[[World], Any]


def _op(fn: Op, lid: str | None, text: str) -> Op:
    fn.lid = lid  # type: ignore[attr-defined]
    fn.text = text  # type: ignore[attr-defined]
    return fn


def R(lid: str, mode: Mode, ticket: int, *, owner: str | None = None, flags: int = 0,
      lease: int = LEASE, res: tuple[str, ...] = RES, parent: str | None = None,
      parent_res: tuple[str, ...] | None = None, priority: Any = 0) -> Op:
    """Request lock `lid` (owner: given, else its parent's, else 'o<lid>')."""

    def op(w: World) -> LockReply:
        o = owner or w.owner.get(lid) or (parent and w.owner.get(parent)) or "o" + lid
        w.owner.setdefault(lid, o)
        w.res.setdefault(lid, res)
        pk = None
        if parent is not None:
            pres = parent_res or w.res.get(parent, ROOT)
            w.parent_res.setdefault(lid, pres)
            pk = w.key(pres)
        return w.e.request(w.key(res), o, lid, mode, ticket=ticket, lease_ms=lease, flags=flags,
                           name=w.e.name(*res), parent_key=pk, parent_id=parent or "",
                           priority=priority)

    return _op(op, lid, f"R {lid} {mode.name} t{ticket}")


def C(lid: str, mode: Mode, ticket: int, *, owner: str | None = None, flags: int = 0,
      lease: int = LEASE, value: bytes | None = None, version: int = 0, floor: int = 0,
      priority: Any = 0) -> Op:
    """Convert lock `lid` to `mode` with conversion ticket `ticket`."""

    def op(w: World) -> LockReply:
        o = owner or w.owner.get(lid) or "o" + lid
        return w.e.convert(w.key(w.res.get(lid, RES)), o, lid, mode, ticket=ticket,
                           lease_ms=lease, flags=flags, value=value, version=version,
                           floor=floor, priority=priority)

    return _op(op, lid, f"C {lid} {mode.name} t{ticket}")


def X(lid: str, *, owner: str | None = None, value: bytes | None = None, version: int = 0,
      floor: int = 0, subtree: bool = False, kids: tuple[tuple[str, ...], ...] = (),
      res: tuple[str, ...] | None = None) -> Op:
    """Release lock `lid` (passing its parent's key as a client would)."""

    def op(w: World) -> LockReply:
        o = owner or w.owner.get(lid) or "o" + lid
        pres = w.parent_res.get(lid)
        return w.e.release(w.key(res or w.res.get(lid, RES)), o, lid, subtree=subtree,
                           parent_key=w.key(pres) if pres else None,
                           child_keys=[w.key(k) for k in kids], value=value, version=version,
                           floor=floor)

    return _op(op, lid, f"X {lid}")


def Cancel(lid: str, *, owner: str | None = None, notify: bool = False,
           reason: str = "cancel") -> Op:
    def op(w: World) -> LockReply:
        o = owner or w.owner.get(lid) or "o" + lid
        pres = w.parent_res.get(lid)
        return w.e.cancel(w.key(w.res.get(lid, RES)), o, lid,
                          parent_key=w.key(pres) if pres else None, reason=reason,
                          notify=notify)

    return _op(op, lid, f"Cancel {lid}")


def Y(lid: str, *, owner: str | None = None) -> Op:
    def op(w: World) -> LockReply:
        o = owner or w.owner.get(lid) or "o" + lid
        return w.e.yield_(w.key(w.res.get(lid, RES)), o, lid)

    return _op(op, lid, f"Y {lid}")


def Tick(ms: int) -> Op:
    def op(w: World) -> None:
        w.tick(ms)

    return _op(op, None, f"Tick {ms}")


def Brk(lid: str = "", owner: str = "", res: tuple[str, ...] = RES) -> Op:
    def op(w: World) -> LockReply:
        return w.e.break_(w.key(res), lock_id=lid, owner=owner)

    return _op(op, lid or None, f"Break {lid or owner}")


def run(w: World, ops: list[Op]) -> None:
    for op in ops:
        op(w)


# ----------------------------------------------------------------------------- M1


@pytest.mark.parametrize(
    "held,requested",
    [pytest.param(h, q, id=f"M1-{h.name}-held-{q.name}-requested-"
                  + ("granted" if M1_MATRIX[h][q] == "y" else "queued"))
     for h, q in product(Mode, Mode)],
)
def test_m1_compatibility_matrix(w: World, held: Mode, requested: Mode) -> None:
    assert R("a", held, 1)(w).status == GRANTED
    rep = R("b", requested, 2)(w)
    if M1_MATRIX[held][requested] == "y":
        assert (rep.status, rep.mode) == (GRANTED, requested)
        assert w.layout() == " ".join(["G[" + " ".join(
            sorted([f"a={held.name}", f"b={requested.name}"])) + "]"])
    else:
        assert (rep.status, rep.mode, rep.position) == (QUEUED, None, 0)
        assert w.layout() == f"G[a={held.name}] W[b>{requested.name}]"


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Case:
    setup: list[Op]
    act: Op
    expect: dict[str, Any]
    layout: str | None
    token: str | None  # 'kept': same token as before the act; 'new': a greater one


def case(cid: str, setup: list[Op], act: Op, *, layout: str | None = None,
         token: str | None = None, xfail: str | None = None, **expect: Any):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Case(setup, act, expect, layout, token), id=cid, marks=marks)



SCENARIOS = [
    # G1: new requests
    case("G1-compatible-granted-at-once", [R("a", PR, 1)], R("b", PR, 2),
         status=GRANTED, mode=PR, position=0, layout="G[a=PR b=PR]"),
    case("G1-first-request-creates-resource-granted", [], R("a", EX, 1),
         status=GRANTED, mode=EX, layout="G[a=EX]"),
    case("G1-incompatible-queued", [R("a", PR, 1)], R("b", EX, 2),
         status=QUEUED, mode=None, position=0, layout="G[a=PR] W[b>EX]"),
    case("G1-wait-queue-nonempty-compatible-still-queued", [R("a", PR, 1), R("b", EX, 2)],
         R("c", PR, 3), status=QUEUED, position=1, layout="G[a=PR] W[b>EX c>PR]"),
    case("G1-conversion-queue-nonempty-compatible-still-queued",
         [R("a", PR, 1), R("b", CR, 2), C("b", EX, 3)], R("c", CR, 4),
         status=QUEUED, position=0, layout="G[a=PR] C[b=CR>EX] W[c>CR]"),
    case("G1-NL-without-expedite-queued-behind-waiters", [R("a", EX, 1), R("b", EX, 2)],
         R("c", NL, 3), status=QUEUED, position=1, layout="G[a=EX] W[b>EX c>NL]"),
    case("G1-blockers-reported-in-queued-reply", [R("a", PR, 1), R("b", CR, 2), R("n", NL, 3)],
         R("x", EX, 4), status=QUEUED, blockers_count=2),
    # G2: NOQUEUE
    case("G2-noqueue-incompatible-notqueued", [R("a", EX, 1)], R("b", PR, 2, flags=NOQUEUE),
         status=NOTQUEUED, mode=None, layout="G[a=EX]"),
    case("G2-noqueue-compatible-granted", [R("a", PR, 1)], R("b", PR, 2, flags=NOQUEUE),
         status=GRANTED, layout="G[a=PR b=PR]"),
    case("G2-noqueue-behind-waiter-notqueued", [R("a", PR, 1), R("b", EX, 2)],
         R("c", PR, 3, flags=NOQUEUE), status=NOTQUEUED, layout="G[a=PR] W[b>EX]"),
    case("G2-noqueue-up-conversion-notqueued", [R("a", PR, 1), R("b", PR, 2)],
         C("a", EX, 3, flags=NOQUEUE), status=NOTQUEUED, layout="G[a=PR b=PR]"),
    case("G2-noqueue-up-conversion-compatible-granted", [R("a", CR, 1), R("b", CR, 2)],
         C("a", PW, 3, flags=NOQUEUE), status=GRANTED, mode=PW, layout="G[a=PW b=CR]"),
    # G3: EXPEDITE
    case("G3-expedite-NL-granted-past-wait-queue", [R("a", EX, 1), R("b", EX, 2)],
         R("c", NL, 3, flags=EXPEDITE), status=GRANTED, mode=NL,
         layout="G[a=EX c=NL] W[b>EX]"),
    case("G3-expedite-NL-granted-past-conversion-queue",
         [R("a", PR, 1), R("b", CR, 2), C("b", EX, 3)], R("c", NL, 4, flags=EXPEDITE),
         status=GRANTED, layout="G[a=PR c=NL] C[b=CR>EX]"),
    *[case(f"G3-expedite-on-{m.name}-is-BadArgument", [R("a", EX, 1)],
           R("c", m, 3, flags=EXPEDITE), raises=BadArgument) for m in (CR, CW, PR, PW, EX)],
    # G4 / M2: down and same-mode conversions
    case("G4-down-conversion-immediate-token-kept", [R("a", EX, 1), R("b", EX, 2)],
         C("a", PR, 3), status=GRANTED, mode=PR, token="kept", layout="G[a=PR] W[b>EX]"),
    case("G4-down-conversion-granted-despite-queues",
         [R("a", EX, 1), R("b", PR, 2), R("c", EX, 3)], C("a", NL, 4),
         status=GRANTED, mode=NL, token="kept", layout="G[a=NL b=PR] W[c>EX]"),
    case("G4-down-conversion-processes-queue", [R("a", EX, 1), R("b", PR, 2)], C("a", PR, 3),
         status=GRANTED, token="kept", layout="G[a=PR b=PR]"),
    case("G4-same-mode-conversion-granted-token-kept", [R("a", PR, 1), R("b", EX, 2)],
         C("a", PR, 3), status=GRANTED, mode=PR, token="kept", layout="G[a=PR] W[b>EX]"),
    case("M2-PR-to-CW-is-not-down-queued", [R("a", PR, 1), R("b", PR, 2)], C("a", CW, 3),
         status=QUEUED, mode=PR, layout="G[b=PR] C[a=PR>CW]"),
    case("M2-CW-to-PR-is-up-queued", [R("a", CW, 1), R("b", CW, 2)], C("a", PR, 3),
         status=QUEUED, mode=CW, layout="G[b=CW] C[a=CW>PR]"),
    case("M2-PW-to-CW-is-down-granted", [R("a", PW, 1), R("b", CR, 2)], C("a", CW, 3),
         status=GRANTED, mode=CW, token="kept", layout="G[a=CW b=CR]"),
    case("M2-EX-to-NL-is-down-granted", [R("a", EX, 1)], C("a", NL, 2),
         status=GRANTED, mode=NL, token="kept", layout="G[a=NL]"),
    # G5: up-conversions
    case("G5-up-conversion-compatible-with-others-granted-new-token",
         [R("a", CR, 1), R("b", CR, 2)], C("a", PW, 3),
         status=GRANTED, mode=PW, token="new", layout="G[a=PW b=CR]"),
    case("G5-up-conversion-ignores-wait-queue", [R("a", CR, 1), R("b", CR, 2), R("c", EX, 3)],
         C("a", PW, 4), status=GRANTED, mode=PW, layout="G[a=PW b=CR] W[c>EX]"),
    case("G5-up-conversion-sole-holder-granted", [R("a", NL, 1)], C("a", EX, 2),
         status=GRANTED, mode=EX, token="new", layout="G[a=EX]"),
    case("G5-up-conversion-incompatible-queued", [R("a", CR, 1), R("b", PR, 2)],
         C("a", PW, 3), status=QUEUED, mode=CR, position=0, layout="G[b=PR] C[a=CR>PW]"),
    case("G5-QUECVT-waits-behind-queued-conversion",
         [R("h", PR, 1), R("x", CR, 2), R("y", NL, 3), C("x", EX, 5)],
         C("y", PR, 6, flags=QUECVT), status=QUEUED, mode=NL, position=1,
         layout="G[h=PR] C[x=CR>EX y=NL>PR]"),
    case("G5-without-QUECVT-granted-past-queued-conversion",
         [R("h", PR, 1), R("x", CR, 2), R("y", NL, 3), C("x", EX, 5)],
         C("y", PR, 6), status=GRANTED, mode=PR, layout="G[h=PR y=PR] C[x=CR>EX]"),
    case("G5-QUECVT-empty-conversion-queue-granted", [R("a", CR, 1), R("b", CR, 2)],
         C("a", PW, 3, flags=QUECVT), status=GRANTED, layout="G[a=PW b=CR]"),
    # G6: queued conversions
    case("G6-queued-conversion-keeps-old-mode-and-token", [R("a", PR, 1), R("b", PR, 2)],
         C("a", EX, 3), status=QUEUED, mode=PR, token="kept", layout="G[b=PR] C[a=PR>EX]"),
    case("G6-conversion-queue-in-conversion-ticket-order",
         [R("h", PR, 1), R("a", CR, 2), R("b", CR, 3), C("a", PW, 9)], C("b", PW, 5),
         status=QUEUED, position=0, layout="G[h=PR] C[b=CR>PW a=CR>PW]"),
    case("G6-converting-lock-cannot-convert-again", [R("a", PR, 1), R("b", PR, 2),
                                                     C("a", EX, 3)],
         C("a", CR, 4), raises=LockStateError),
    # G7: conversion deadlock
    case("G7-two-PR-to-EX-second-gets-DEADLOCK-keeps-PR",
         [R("a", PR, 1), R("b", PR, 2), C("a", EX, 3)], C("b", EX, 4),
         status=DEADLOCK, mode=PR, token="kept", layout="G[b=PR] C[a=PR>EX]"),
    case("G7-deadlock-with-older-ticket-mutually-incompatible-behind",
         [R("a", PR, 1), R("b", PR, 2), C("a", EX, 9)], C("b", EX, 4),
         status=DEADLOCK, mode=PR, layout="G[b=PR] C[a=PR>EX]"),
    case("G7-CONVDEADLK-demoted-to-NL-and-queued-other-granted",
         [R("a", PR, 1), R("b", PR, 2), C("a", EX, 3)], C("b", EX, 4, flags=CONVDEADLK),
         status=QUEUED, mode=NL, layout="G[a=EX] C[b=NL>EX]"),
    case("G7-QUECVT-behind-conversion-needing-our-mode-deadlocks",
         [R("h", PR, 1), R("x", CR, 2), R("y", CR, 3), C("x", EX, 5)],
         C("y", PR, 6, flags=QUECVT), status=DEADLOCK, mode=CR,
         layout="G[h=PR y=CR] C[x=CR>EX]"),
    case("G7-compatible-conversions-no-deadlock",
         [R("h", PR, 1), R("a", CR, 2), R("b", CR, 3), C("a", PW, 4)], C("b", PW, 5),
         status=QUEUED, position=1, layout="G[h=PR] C[a=CR>PW b=CR>PW]"),
    # G8: queue processing
    case("G8-conversions-processed-before-older-waiters",
         [R("x", PW, 1), R("a", CR, 2), R("w", PW, 3), C("a", PR, 100)], X("x"),
         status=RELEASED, layout="G[a=PR] W[w>PW]"),
    case("G8-waiters-strictly-in-order-stop-at-first-blocked",
         [R("h", EX, 1), R("a", PR, 2), R("b", PR, 3), R("c", EX, 4), R("d", PR, 5)], X("h"),
         layout="G[a=PR b=PR] W[c>EX d>PR]"),
    case("G8-no-barging-compatible-waiter-behind-incompatible",
         [R("h1", PR, 1), R("h2", PR, 2), R("w1", EX, 3), R("w2", CR, 4)], X("h1"),
         layout="G[h2=PR] W[w1>EX w2>CR]"),
    case("G8-waiters-wait-while-a-conversion-is-queued",
         [R("h", PR, 1), R("g", PR, 2), R("a", CR, 3), C("a", EX, 4), R("w", CR, 5)], X("g"),
         layout="G[h=PR] C[a=CR>EX] W[w>CR]"),
    case("G8-QUECVT-conversion-granted-only-when-first",
         [R("h", PR, 1), R("x", CR, 2), R("y", NL, 3), R("z", NL, 4), C("x", EX, 5),
          C("y", PR, 6, flags=QUECVT)], X("z"),
         layout="G[h=PR] C[x=CR>EX y=NL>PR]"),
    case("G8-conversion-queue-repeated-until-stable",
         [R("h", PR, 1), R("x", CR, 2), R("y", NL, 3), C("x", EX, 5),
          C("y", PR, 6, flags=QUECVT)], X("h"),
         layout="G[x=EX] C[y=NL>PR]"),
    case("G8-release-grants-all-compatible-waiters",
         [R("h", EX, 1), R("a", PR, 2), R("b", CR, 3), R("c", PR, 4)], X("h"),
         layout="G[a=PR b=CR c=PR]"),
    case("G8-break-processes-queue", [R("h", EX, 1), R("b", EX, 2)], Brk("h"),
         status=RELEASED, extra=1, layout="G[b=EX]"),
    # G10: expiry
    case("G10-expired-holder-purged-waiter-granted",
         [R("h", EX, 1, lease=1000), R("b", EX, 2), Tick(1000)], R("b", EX, 2),
         status=GRANTED, mode=EX, layout="G[b=EX]"),
    case("G10-holder-one-ms-before-expiry-still-blocks",
         [R("h", EX, 1, lease=1000), R("b", EX, 2), Tick(999)], R("b", EX, 2),
         status=QUEUED, wait_ms=1, layout="G[h=EX] W[b>EX]"),
    case("G10-expired-waiter-never-blocks-the-queue",
         [R("h", PR, 1), R("w1", EX, 2, lease=1000), R("w2", PR, 3), Tick(1000)],
         R("w2", PR, 3), status=GRANTED, layout="G[h=PR w2=PR]"),
    case("G10-expired-converting-lock-purged",
         [R("a", PR, 1, lease=1000), R("b", PR, 2, lease=5000), C("b", EX, 3),
          C("a", EX, 4, flags=CONVDEADLK, lease=1000), Tick(1000)],
         R("b", PR, 2), status=GRANTED, mode=EX, layout="G[b=EX]"),
    case("G10-expired-lock-is-notfound-for-its-owner",
         [R("a", EX, 1, lease=1000), R("k", NL, 2), Tick(1000)], C("a", NL, 3),
         status=NOTFOUND, layout="G[k=NL]"),
    # G11: ticket order
    case("G11-older-ticket-goes-to-head-and-is-granted", [R("h", PR, 1), R("w", EX, 10)],
         R("x", PR, 5), status=GRANTED, layout="G[h=PR x=PR] W[w>EX]"),
    case("G11-older-ticket-queued-at-head", [R("h", EX, 1), R("w", EX, 10)], R("x", PR, 5),
         status=QUEUED, position=0, layout="G[h=EX] W[x>PR w>EX]"),
    case("G11-ticket-tie-broken-by-lock-id", [R("h", EX, 1), R("b", EX, 10)], R("a", EX, 10),
         status=QUEUED, position=0, layout="G[h=EX] W[a>EX b>EX]"),
    case("G11-younger-ticket-queued-last", [R("h", EX, 1), R("a", EX, 10), R("b", EX, 20)],
         R("c", EX, 30), status=QUEUED, position=2, layout="G[h=EX] W[a>EX b>EX c>EX]"),
    # G12: idempotent retries
    case("G12-retry-of-granted-request-same-state", [R("a", EX, 1)], R("a", EX, 1),
         status=GRANTED, mode=EX, token="kept", layout="G[a=EX]"),
    case("G12-retry-of-waiting-request-same-position", [R("h", EX, 1), R("a", EX, 2)],
         R("a", EX, 2), status=QUEUED, position=0, layout="G[h=EX] W[a>EX]"),
    case("G12-retry-with-other-mode-returns-current-state", [R("a", PR, 1)], R("a", EX, 7),
         status=GRANTED, mode=PR, layout="G[a=PR]"),
    case("G12-retry-renews-the-lease-of-a-granted-lock",
         [R("a", EX, 1, lease=1000), Tick(600), R("a", EX, 1, lease=1000), Tick(600)],
         R("b", EX, 2), status=QUEUED, layout="G[a=EX] W[b>EX]"),
    case("G12-retry-renews-the-lease-of-a-waiting-lock",
         [R("h", EX, 1), R("a", EX, 2, lease=1000), Tick(600), R("a", EX, 2, lease=1000),
          Tick(600)], R("b", EX, 3), status=QUEUED, position=1,
         layout="G[h=EX] W[a>EX b>EX]"),
    case("G12-same-id-from-other-owner-NotOwner", [R("a", EX, 1)],
         R("a", EX, 1, owner="intruder"), raises=NotOwner),
    # H1: parents
    case("H1-child-granted-under-granted-parent", [R("p", EX, 1, res=ROOT)],
         R("c", EX, 2, res=CHILD, parent="p"), status=GRANTED),
    case("H1-child-under-converting-parent-accepted",
         [R("p", PR, 1, res=ROOT), R("q", PR, 2, res=ROOT), C("p", EX, 3)],
         R("c", EX, 4, res=CHILD, parent="p"), status=GRANTED),
    case("H1-parent-missing-NOPARENT", [R("p", EX, 1, res=ROOT)],
         R("c", EX, 2, res=CHILD, parent="ghost", parent_res=ROOT),
         status=NOPARENT, layout="absent"),
    case("H1-parent-resource-absent-NOPARENT", [],
         R("c", EX, 2, res=CHILD, parent="ghost", parent_res=ROOT),
         status=NOPARENT, layout="absent"),
    case("H1-parent-of-other-owner-NOPARENT", [R("p", EX, 1, res=ROOT, owner="o1")],
         R("c", EX, 2, res=CHILD, parent="p", owner="o2"), status=NOPARENT, layout="absent"),
    case("H1-parent-waiting-NOPARENT",
         [R("h", EX, 1, res=ROOT), R("p", EX, 2, res=ROOT, owner="o1")],
         R("c", EX, 3, res=CHILD, parent="p", owner="o1"), status=NOPARENT, layout="absent"),
    # Y1: yield
    case("Y1-granted-lock-goes-back-behind-older-ticket", [R("a", EX, 20), R("b", EX, 10)],
         Y("a"), status=QUEUED, mode=None, position=0, layout="G[b=EX] W[a>EX]"),
    case("Y1-yield-first-in-queue-granted-again-new-token", [R("a", EX, 10)], Y("a"),
         status=GRANTED, mode=EX, token="new", layout="G[a=EX]"),
    case("Y1-yield-compatible-with-holders-granted-again", [R("h", PR, 1), R("a", PR, 20)],
         Y("a"), status=GRANTED, mode=PR, layout="G[a=PR h=PR]"),
    case("Y1-yield-of-waiting-lock-leaves-it", [R("h", EX, 1), R("a", EX, 2)], Y("a"),
         status=QUEUED, position=0, layout="G[h=EX] W[a>EX]"),
    case("Y1-yield-of-converting-lock-leaves-it", [R("a", PR, 1), R("b", PR, 2),
                                                   C("a", EX, 3)], Y("a"),
         status=QUEUED, mode=PR, layout="G[b=PR] C[a=PR>EX]"),
    case("Y1-granted-conversion-regranted-at-once-if-first", [R("a", CR, 1), C("a", EX, 2)],
         Y("a"), status=GRANTED, mode=EX, token="new", layout="G[a=EX]"),
    case("Y1-down-converted-lock-yields-to-wait-queue", [R("a", EX, 20), C("a", PR, 21),
                                                         R("b", EX, 10)],
         Y("a"), status=QUEUED, mode=None, layout="G[b=EX] W[a>PR]"),
    case("Y1-granted-conversion-back-at-its-ticket-with-previous-mode",
         [R("a", CR, 1), R("b", CR, 2), C("a", PW, 10, flags=QUECVT), C("b", PR, 5)], Y("a"),
         status=QUEUED, mode=CR, position=0, layout="G[b=PR] C[a=CR>PW]",
         ),
    # cancel
    case("cancel-waiting-request-gone", [R("h", EX, 1), R("a", EX, 2)], Cancel("a"),
         status=CANCELLED, layout="G[h=EX]"),
    case("cancel-converting-back-to-granted-old-mode",
         [R("a", PR, 1), R("b", PR, 2), C("a", EX, 3)], Cancel("a"),
         status=CANCELLED, mode=PR, token="kept", layout="G[a=PR b=PR]"),
    case("cancel-granted-is-CANCELGRANT-nothing-done", [R("a", EX, 1), R("b", EX, 2)],
         Cancel("a"), status=CANCELGRANT, mode=EX, layout="G[a=EX] W[b>EX]"),
    case("cancel-unknown-lock-NOTFOUND", [R("a", EX, 1)], Cancel("zz"),
         status=NOTFOUND, layout="G[a=EX]"),
    case("cancel-head-waiter-lets-next-through-G8",
         [R("h", PR, 1), R("w1", EX, 2), R("w2", PR, 3)], Cancel("w1"),
         status=CANCELLED, layout="G[h=PR w2=PR]"),
    case("cancel-conversion-lets-waiters-through-G8",
         [R("a", PR, 1), R("b", PR, 2), C("a", EX, 3), R("w", CR, 4)], Cancel("a"),
         status=CANCELLED, layout="G[a=PR b=PR w=CR]"),
    case("cancel-CONVDEADLK-demoted-conversion-back-as-NL",
         [R("a", PR, 1), R("b", PR, 2), C("a", EX, 3), C("b", EX, 4, flags=CONVDEADLK)],
         Cancel("b"), status=CANCELLED, mode=NL, layout="G[a=EX b=NL]"),
]


@pytest.mark.parametrize("c", SCENARIOS)
def test_scenario(w: World, c: Case) -> None:
    run(w, c.setup)
    lid = c.act.lid  # type: ignore[attr-defined]
    before_lock = w.lock(lid) if lid else None
    expect = dict(c.expect)
    raises = expect.pop("raises", None)
    if raises is not None:
        before = w.snapshot()
        with pytest.raises(raises):
            c.act(w)
        assert w.snapshot() == before, "a refused call changed the database"
        return
    rep = c.act(w)
    got = {f: getattr(rep, f) for f in expect}
    assert got == expect
    if c.token == "kept":
        assert before_lock is not None and rep.token == before_lock.token
    elif c.token == "new":
        assert before_lock is not None and rep.token > before_lock.token
    if c.layout is not None:
        assert w.layout(w.res.get(lid, RES)) == c.layout


# ----------------------------------------------------------------------------- no trace

UNCHANGED_SETUP = [R("g1", PR, 1), R("g2", PR, 2), R("cv", CR, 3), C("cv", EX, 4),
                   R("wt", PW, 5), R("pw", PW, 6, res=OTHER), R("p", EX, 7, res=ROOT),
                   R("c", EX, 8, res=CHILD, parent="p")]


def unchanged(cid: str, act: Op, expect: object, *, xfail: str | None = None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(act, expect, id=cid, marks=marks)


def _raw_request(w: World, i: int, v: bytes, lid: str = "new") -> Any:
    a = codec.request_args(30_000, w.e.chan, "onew", lid, EX, 0, 9, LEASE, "", b"res")
    a += [b"0"] * (11 - len(a))  # (a priority of 0 is not sent: ARGV[11] set here)
    a[i] = v
    return w.raw("request", [w.key(), w.key()], a)


def _raw_convert(w: World, i: int, v: bytes) -> Any:
    a = codec.convert_args(30_000, w.e.chan, "opw", "pw", NL, 0, 9, LEASE, None, 0, 64, 0)
    a[i] = v
    return w.raw("convert", [w.key(OTHER)], a)


def _raw_release(w: World, i: int, v: bytes) -> Any:
    a = codec.release_args(30_000, w.e.chan, "opw", "pw", 0, None, 0, 64, 0)
    a[i] = v
    return w.raw("release", [w.key(OTHER), w.key(OTHER)], a)


def _raw_renew(w: World, args: list[bytes], keys: list[bytes]) -> Any:
    return w.raw("renew", keys, [b"30000", w.e.chan, *args])


def _raw_init(w: World, args: list[bytes]) -> Any:
    return call_script(w.r, "init", [EPOCH_KEY], args)


ID65 = "x" * 65
MAX_LEASE = 86_400_000
PW_OWNER = "opw"

UNCHANGED = [
    # request
    unchanged("request-bad-mode-7", lambda w: _raw_request(w, 4, b"7"), BadArgument),
    unchanged("request-bad-mode-name", lambda w: _raw_request(w, 4, b"EX"), BadArgument),
    unchanged("request-bad-mode-7-python-side",
              lambda w: w.e.request(w.key(), "o", "n", 7, ticket=1, lease_ms=LEASE),
              InvalidArgument),
    unchanged("request-bad-negative-lease", lambda w: _raw_request(w, 7, b"-1"), BadArgument),
    unchanged("request-bad-lease-0", R("n", EX, 9, lease=0), BadArgument),
    unchanged("request-bad-lease-over-max", R("n", EX, 9, lease=MAX_LEASE + 1), BadArgument),
    unchanged("request-bad-ticket-non-digit", lambda w: _raw_request(w, 6, b"12a"), BadArgument),
    unchanged("request-bad-ticket-negative", lambda w: _raw_request(w, 6, b"-5"), BadArgument),
    unchanged("request-bad-ticket-empty", lambda w: _raw_request(w, 6, b""), BadArgument),
    unchanged("request-bad-owner-with-space", R("n", EX, 9, owner="a b"), BadArgument),
    unchanged("request-bad-owner-with-pipe", R("n", EX, 9, owner="a|b"), BadArgument),
    unchanged("request-bad-owner-empty", lambda w: _raw_request(w, 2, b""), BadArgument),
    unchanged("request-bad-lock-id-65-chars", R(ID65, EX, 9), BadArgument),
    unchanged("request-bad-flags-QUECVT", R("n", EX, 9, flags=QUECVT), BadArgument),
    unchanged("request-bad-flags-SUBTREE", R("n", EX, 9, flags=Flag.SUBTREE), BadArgument),
    unchanged("request-bad-flags-256", lambda w: _raw_request(w, 5, b"256"), BadArgument),
    unchanged("G3-request-bad-EXPEDITE-on-EX", R("n", EX, 9, flags=EXPEDITE), BadArgument),
    unchanged("request-bad-parent-id",
              R("n", EX, 9, res=CHILD, parent="a b", parent_res=ROOT), BadArgument),
    unchanged("request-bad-rejoin-ms", lambda w: _raw_request(w, 0, b"x"), BadArgument),
    unchanged("P1-request-bad-priority-2**31", R("n", EX, 9, priority=2**31), BadArgument),
    unchanged("P1-request-bad-priority-below-min", R("n", EX, 9, priority=-(2**31) - 1),
              BadArgument),
    unchanged("P1-request-bad-priority-str-python-side", R("n", EX, 9, priority="1"),
              InvalidType),
    unchanged("P1-request-bad-priority-bool-python-side", R("n", EX, 9, priority=True),
              InvalidType),
    *[unchanged(f"P1-request-bad-priority-raw-{v.decode() or 'empty'}",
                partial(_raw_request, i=10, v=v), BadArgument)
      for v in (b"", b"1.5", b"--1", b"+1", b"1e3", b"-", b"12345678901", b" 1")],
    unchanged("G12-request-id-of-other-owner-NotOwner", R("g1", PR, 1, owner="intruder"),
              NotOwner),
    unchanged("G12-request-retry-changes-nothing", R("wt", PW, 5), QUEUED),
    unchanged("G2-noqueue-request-leaves-no-trace", R("n", PW, 9, flags=NOQUEUE), NOTQUEUED),
    unchanged("G2-noqueue-request-on-absent-child-of-other-owner",
              R("n", PW, 9, res=CHILD, flags=NOQUEUE, owner="o2"), NOTQUEUED),
    unchanged("H1-nonexistent-parent-NOPARENT-leaves-no-trace",
              R("n", EX, 9, res=("db/orders", "row:7"), parent="ghost", parent_res=ROOT),
              NOPARENT),
    unchanged("H1-parent-of-other-owner-NOPARENT-leaves-no-trace",
              R("n", EX, 9, res=("db/orders", "row:7"), parent="p", owner="intruder"),
              NOPARENT),
    unchanged("H1-waiting-parent-NOPARENT-leaves-no-trace",
              R("n", EX, 9, res=("res", "kid"), parent="wt", parent_res=RES, owner="owt"),
              NOPARENT),
    # convert
    unchanged("convert-bad-mode-7", lambda w: _raw_convert(w, 4, b"7"), BadArgument),
    unchanged("convert-bad-negative-lease", lambda w: _raw_convert(w, 7, b"-1"), BadArgument),
    unchanged("convert-bad-lease-0", C("g1", EX, 9, lease=0), BadArgument),
    unchanged("convert-bad-ticket-non-digit", lambda w: _raw_convert(w, 6, b"9x"), BadArgument),
    unchanged("convert-bad-owner", C("g1", EX, 9, owner="a b"), BadArgument),
    unchanged("convert-bad-lock-id-65-chars", C(ID65, EX, 9), BadArgument),
    unchanged("convert-bad-flags-EXPEDITE", C("g1", NL, 9, flags=EXPEDITE), BadArgument),
    unchanged("convert-bad-flags-SUBTREE", C("g1", NL, 9, flags=Flag.SUBTREE), BadArgument),
    unchanged("convert-bad-version", lambda w: _raw_convert(w, 10, b"-1"), BadArgument),
    unchanged("convert-bad-vbmax", lambda w: _raw_convert(w, 11, b"65537"), BadArgument),
    unchanged("convert-bad-floor", lambda w: _raw_convert(w, 12, b"1e9"), BadArgument),
    unchanged("P1-convert-bad-priority-2**31", C("g1", EX, 9, priority=2**31), BadArgument),
    unchanged("P1-convert-bad-priority-below-min", C("g1", EX, 9, priority=-(2**31) - 1),
              BadArgument),
    unchanged("P1-convert-bad-priority-float-python-side", C("g1", EX, 9, priority=1.0),
              InvalidType),
    unchanged("P1-convert-bad-priority-raw-x", lambda w: _raw_convert(w, 13, b"x"),
              BadArgument),
    unchanged("P1-convert-bad-priority-raw-minus-zero-point",
              lambda w: _raw_convert(w, 13, b"-0.0"), BadArgument),
    unchanged("convert-wrong-owner-NotOwner", C("g1", NL, 9, owner="intruder"), NotOwner),
    unchanged("convert-waiting-lock-LockStateError", C("wt", NL, 9), LockStateError),
    unchanged("convert-converting-lock-LockStateError", C("cv", NL, 9), LockStateError),
    unchanged("V1-convert-oversized-value-BadArgument",
              C("pw", NL, 9, value=b"v" * 65, version=1), BadArgument),
    unchanged("V3-convert-write-from-PR-BadArgument", C("g1", NL, 9, value=b"v", version=1),
              BadArgument),
    unchanged("V3-convert-write-going-up-BadArgument", C("pw", EX, 9, value=b"v", version=1),
              BadArgument),
    unchanged("V3-convert-write-same-mode-BadArgument", C("pw", PW, 9, value=b"v", version=1),
              BadArgument),
    unchanged("convert-unknown-lock-NOTFOUND", C("zz", NL, 9), NOTFOUND),
    unchanged("convert-absent-resource-NOTFOUND",
              lambda w: w.e.convert(w.key(("nowhere",)), "o", "zz", NL, ticket=1,
                                    lease_ms=LEASE), NOTFOUND),
    unchanged("G2-noqueue-up-conversion-leaves-no-trace", C("g1", EX, 9, flags=NOQUEUE),
              NOTQUEUED),
    unchanged("G7-DEADLOCK-leaves-no-trace", C("g1", EX, 9), DEADLOCK),
    # release
    unchanged("release-wrong-owner-NotOwner", X("g1", owner="intruder"), NotOwner),
    unchanged("release-bad-owner", X("g1", owner="a b"), BadArgument),
    unchanged("release-bad-lock-id-65-chars", X(ID65), BadArgument),
    unchanged("release-bad-flags-NOQUEUE", lambda w: _raw_release(w, 4, b"1"), BadArgument),
    unchanged("release-bad-version", lambda w: _raw_release(w, 7, b"v1"), BadArgument),
    unchanged("release-bad-floor-negative", lambda w: _raw_release(w, 9, b"-3"), BadArgument),
    unchanged("V1-release-oversized-value-BadArgument", X("pw", value=b"v" * 65, version=1),
              BadArgument),
    unchanged("V3-release-write-from-PR-BadArgument", X("g1", value=b"v", version=1),
              BadArgument),
    unchanged("V3-release-write-from-waiting-BadArgument", X("wt", value=b"v", version=1),
              BadArgument),
    unchanged("H3-release-parent-with-child-HasChildren", X("p", kids=(CHILD,)), HasChildren),
    unchanged("H3-subtree-release-without-child-key-MissingKeys", X("p", subtree=True),
              MissingKeys),
    unchanged("release-unknown-lock-NOTFOUND", X("zz"), NOTFOUND),
    # cancel
    unchanged("cancel-wrong-owner-NotOwner", Cancel("wt", owner="intruder"), NotOwner),
    unchanged("cancel-bad-owner", Cancel("wt", owner="a b"), BadArgument),
    unchanged("cancel-bad-reason", Cancel("wt", reason="because"), BadArgument),
    unchanged("cancel-unknown-lock-NOTFOUND", Cancel("zz"), NOTFOUND),
    unchanged("cancel-granted-CANCELGRANT-leaves-no-trace", Cancel("g1"), CANCELGRANT),
    # yield
    unchanged("yield-wrong-owner-NotOwner", Y("g1", owner="intruder"), NotOwner),
    unchanged("yield-bad-lock-id", Y("a b"), BadArgument),
    unchanged("yield-unknown-lock-NOTFOUND", Y("zz"), NOTFOUND),
    unchanged("Y1-yield-of-waiting-lock-leaves-no-trace", Y("wt"), QUEUED),
    # renew
    unchanged("renew-wrong-owner-NotOwner",
              lambda w: w.e.renew("intruder", LEASE, [(w.key(), "g1", 0)]), NotOwner),
    unchanged("renew-one-foreign-lock-in-batch-NotOwner-renews-none",
              lambda w: w.e.renew("og1", 2 * LEASE, [(w.key(), "g1", 0),
                                                     (w.key(), "g2", 0)]), NotOwner),
    unchanged("renew-bad-lease-0", lambda w: w.e.renew("og1", 0, [(w.key(), "g1", 0)]),
              BadArgument),
    unchanged("renew-bad-negative-lease",
              lambda w: _raw_renew(w, [b"og1", b"-1", b"g1", b"0"], [w.key()]), BadArgument),
    unchanged("renew-bad-pairs-count",
              lambda w: _raw_renew(w, [b"og1", b"100", b"g1"], [w.key()]), BadArgument),
    unchanged("renew-bad-floor",
              lambda w: _raw_renew(w, [b"og1", b"100", b"g1", b"-1"], [w.key()]), BadArgument),
    unchanged("renew-bad-lock-id", lambda w: w.e.renew("og1", LEASE, [(w.key(), ID65, 0)]),
              BadArgument),
    unchanged("renew-bad-owner", lambda w: w.e.renew("a b", LEASE, [(w.key(), "g1", 0)]),
              BadArgument),
    # break
    unchanged("break-needs-id-or-owner",
              lambda w: w.raw("break", [w.key()], [b"30000", w.e.chan, b"", b""]),
              BadArgument),
    unchanged("break-needs-id-or-owner-python-side", lambda w: w.e.break_(w.key()),
              InvalidArgument),
    unchanged("break-bad-owner", Brk(owner="a b"), BadArgument),
    unchanged("break-bad-lock-id", Brk(ID65), BadArgument),
    # init
    unchanged("init-unknown-command", lambda w: _raw_init(w, [b"reset"]), BadArgument),
    unchanged("init-clock-non-digit", lambda w: _raw_init(w, [b"clock", b"soon", b"0"]),
              BadArgument),
]


@pytest.mark.parametrize("act,expect", UNCHANGED)
def test_refused_or_no_op_changes_nothing(w: World, act: Op, expect: object) -> None:
    """Bad input raises its typed error, and outcomes that change nothing change nothing:
    inspect of every resource, the waiter index, the epoch and every key stay byte-identical."""
    run(w, UNCHANGED_SETUP)
    assert w.layout() == "G[g1=PR g2=PR] C[cv=CR>EX] W[wt>PW]"
    before = w.snapshot()
    if isinstance(expect, type) and issubclass(expect, Exception):
        with pytest.raises(expect):
            act(w)
    else:
        rep = act(w)
        assert rep.status == expect
    assert w.snapshot() == before




@pytest.mark.parametrize("act,expect", [
    pytest.param(C("a", EX, 9, flags=NOQUEUE), NOTQUEUED,
                 id="G2-noqueue-conversion-keeps-previous-mode-of-granted-up-conversion",
                 ),
    pytest.param(C("a", EX, 9), DEADLOCK,
                 id="G7-deadlock-keeps-previous-mode-of-granted-up-conversion",
                 ),
])
def test_refused_conversion_keeps_previous_mode(w: World, act: Op, expect: Status) -> None:
    # a: CR -> PR granted at once (previous mode CR, kept for Y1); b queues PR -> EX
    run(w, [R("a", CR, 1), R("b", PR, 2), C("a", PR, 3), C("b", EX, 4)])
    assert w.lock("a").previous == CR
    before = w.snapshot()
    assert act(w).status == expect
    assert w.snapshot() == before


@pytest.mark.parametrize("late", [
    pytest.param(C("a", NL, 3), id="G15-a-late-down-conversion-changes-nothing"),
    pytest.param(C("a", NL, 3, value=b"old", version=9),
                 id="G15-a-late-down-conversion-writes-no-value"),
    pytest.param(C("a", CR, 4, flags=NOQUEUE), id="G15-a-late-conversion-with-flags"),
])
def test_g15_a_conversion_older_than_the_last_up_conversion_changes_nothing(
        w: World, late: Op) -> None:
    """PR -> EX with ticket 5 granted; a conversion of the same lock sent before it (ticket
    3 or 4), delivered late on another connection, arrives: it must not take the lock down
    behind its holder's back (simulator, profile vminor seed 3: the holder's release then
    met V3 there and left the lock, and an older value with it, until its lease ended)."""
    run(w, [R("a", PR, 1), C("a", EX, 5)])
    before = w.snapshot()
    rep = late(w)
    assert (rep.status, rep.mode) == (GRANTED, EX)
    assert w.snapshot() == before


# ----------------------------------------------------------------------------- P1


@pytest.mark.parametrize("ops,lid,priority", [
    pytest.param([R("a", EX, 1)], "a", 0, id="P1-default-priority-is-0"),
    pytest.param([R("a", EX, 1, priority=5)], "a", 5, id="P1-granted-request-keeps-its-priority"),
    pytest.param([R("h", EX, 1), R("a", EX, 2, priority=-(2**31))], "a", -(2**31),
                 id="P1-waiting-request-stores-its-priority-lowest"),
    pytest.param([R("h", EX, 1), R("a", EX, 2, priority=2**31 - 1)], "a", 2**31 - 1,
                 id="P1-waiting-request-stores-its-priority-highest"),
    pytest.param([R("a", PR, 1, priority=1), R("b", PR, 2), C("a", EX, 3, priority=7)], "a", 7,
                 id="P1-queued-conversion-takes-its-priority"),
    pytest.param([R("a", CR, 1, priority=1), C("a", PR, 2, priority=-4)], "a", -4,
                 id="P1-up-conversion-granted-at-once-takes-its-priority"),
    pytest.param([R("a", PR, 1, priority=1), R("b", PR, 2), C("b", EX, 3),
                  C("a", EX, 4, priority=9)], "a", 1,
                 id="P1-G7-conversion-refused-with-DEADLOCK-keeps-the-priority"),
    pytest.param([R("a", PR, 1, priority=1), R("b", PR, 2),
                  C("a", EX, 3, flags=NOQUEUE, priority=9)], "a", 1,
                 id="P1-G2-conversion-refused-NOTQUEUED-keeps-the-priority"),
    pytest.param([R("a", EX, 1, priority=3), C("a", NL, 2, priority=9)], "a", 3,
                 id="P1-down-conversion-keeps-the-priority"),
    pytest.param([R("a", EX, 1, priority=3), C("a", EX, 2, priority=9)], "a", 3,
                 id="P1-same-mode-conversion-keeps-the-priority"),
    pytest.param([R("a", PR, 1, priority=2), R("b", PR, 2), C("a", EX, 3, priority=8), X("b")],
                 "a", 8, id="P1-conversion-granted-by-queue-processing-keeps-its-priority"),
    pytest.param([R("a", CR, 1, priority=2), C("a", PR, 2, priority=6), Y("a")], "a", 6,
                 id="P1-Y1-yielded-conversion-keeps-its-priority"),
])
def test_p1_priority_is_stored_with_the_lock(w: World, ops: list[Op], lid: str,
                                            priority: int) -> None:
    """P1: a request's priority is stored with its lock (inspect and the detector's scan
    read it); a conversion that is queued or granted at once stores its own, one that is
    refused, down or to the same mode leaves the lock's as it was."""
    run(w, ops)
    assert w.lock(lid).priority == priority


def test_p1_default_priority_stores_nothing_new(w: World) -> None:
    """P1: a lock of priority 0 is stored as before priorities existed (no field), so
    callers that never use them pay nothing."""
    run(w, [R("a", EX, 1), R("b", EX, 2, priority=3)])
    blob = w.r.get(w.key())
    assert blob.count(b"\xa2pr") == 1  # msgpack's "pr": b's lock only


# ----------------------------------------------------------------------------- G9


def test_g9_last_release_leaves_tombstone_with_seq(w: World) -> None:
    run(w, [R("a", EX, 1)])
    rep = X("a", value=b"val", version=3)(w)
    assert (rep.status, rep.extra) == (RELEASED, 1)
    v = w.view()
    assert v is not None, "G9: a tombstone keeps the fencing sequence"
    # (G16: and the version of the value that went, not the value)
    assert v.locks == () and v.value is None and v.version == 3 and v.valid
    assert v.seq == T0 * 1000  # the one grant's token
    assert 0 < w.r.pttl(w.key()) <= 60_000
    assert w.e.waiters() == []


@pytest.mark.parametrize("setup,last_op,layout", [
    pytest.param([], X("a"), "tombstone", id="G9-release-of-last-NL-lock"),
    pytest.param([], Brk(owner="oa"), "tombstone", id="G9-break-of-last-lock"),
    pytest.param([Tick(LEASE)], lambda w: w.e.renew("oa", LEASE, [(w.key(), "a", 0)]),
                 "tombstone", id="G9-expiry-of-last-lock-on-next-touch"),
    pytest.param([R("b", EX, 2), R("c", EX, 3), C("a", EX, 4)], Cancel("a"),
                 "G[a=NL b=EX] W[c>EX]", id="G9-resource-stays-while-any-lock-is-left"),
])
def test_g9_resource_disappears_when_last_lock_goes(w: World, setup: list[Op], last_op: Op,
                                                    layout: str) -> None:
    run(w, [R("a", NL, 1), *setup])
    last_op(w)
    assert w.layout() == layout
    v = w.view()
    assert v.value is None and v.seq >= T0 * 1000  # the fencing sequence is never lost
    if layout == "tombstone":
        assert v.locks == () and w.e.waiters() == []


def test_g9_nl_lock_keeps_resource_and_value(w: World) -> None:
    run(w, [R("k", NL, 1), R("a", EX, 2), X("a", value=b"keep", version=5)])
    v = w.view()
    assert (v.value, v.version, v.valid) == (b"keep", 5, True)
    assert w.layout() == "G[k=NL]"
    assert R("b", PR, 3)(w).value == b"keep"


@pytest.mark.parametrize("extra,act,layout", [
    pytest.param([], R("b", PR, 4), "G[b=PR]",
                 id="G13-expired-last-NL-lock-purged-by-a-request-drops-the-value"),
    pytest.param([R("h", EX, 3, lease=1000)], R("b", PR, 4), "G[b=PR]",
                 id="G13-expired-last-EX-lock-purged-by-a-request-drops-the-value"),
    pytest.param([], R("b", EX, 4, flags=NOQUEUE), "G[b=EX]",
                 id="G13-expired-last-lock-purged-by-a-noqueue-request-drops-the-value"),
    pytest.param([R("q", EX, 3, lease=1000), C("k", EX, 5, lease=1000)], R("b", CR, 6),
                 "G[b=CR]", id="G13-expired-holder-waiter-and-conversion-drop-the-value"),
])
def test_g13_purge_of_last_lock_drops_value(w: World, extra: list[Op], act: Op,
                                            layout: str) -> None:
    run(w, [R("k", NL, 1, lease=1000), R("wr", EX, 2), X("wr", value=b"old", version=7),
            *extra])
    assert w.view().value == b"old"
    w.tick(1000)
    rep = act(w)
    assert rep.status == GRANTED
    assert (rep.value, rep.version, rep.valid) == (None, 7, True)  # (G16: its version stays)
    assert w.layout() == layout
    v = w.view()
    assert (v.value, v.version, v.valid) == (None, 7, True)


def test_g16_a_resource_recreated_from_its_tombstone_keeps_the_version(w: World) -> None:
    """G16: the value went with the last lock (G9), its version did not: the next first
    lock reads no value at that version, so a quorum reader takes "gone at 9" over an older
    value another instance kept (under a stale lock), and a late write of a value older than
    the one that went is dropped (V6), where before it came back."""
    run(w, [R("a", EX, 1), X("a", value=b"v9", version=9)])
    rep = R("k", NL, 2)(w)
    assert rep.status == GRANTED
    rep = R("b", PR, 3)(w)
    assert (rep.value, rep.version, rep.valid) == (None, 9, True)
    run(w, [X("b"), R("c", EX, 4), X("c", value=b"late", version=5)])  # V6 drops it
    assert (w.view().value, w.view().version) == (None, 9)
    run(w, [R("d", EX, 5), X("d", value=b"v12", version=12)])
    assert (w.view().value, w.view().version) == (b"v12", 12)


def test_g16_a_tombstone_of_a_resource_never_written_stays_short(w: World) -> None:
    """A resource that never had a value leaves the two-field tombstone it always did."""
    run(w, [R("a", EX, 1), X("a")])
    assert w.view().version == 0
    assert w.r.get(w.key())[0] == 0x92  # msgpack: an array of two, {n, s}


def test_g13_purge_that_leaves_a_lock_keeps_the_value(w: World) -> None:
    run(w, [R("k", NL, 1), R("x", NL, 2, lease=1000), R("wr", EX, 3),
            X("wr", value=b"kept", version=7), Tick(1000)])
    rep = R("b", PR, 4)(w)
    assert (rep.value, rep.version, rep.valid) == (b"kept", 7, True)
    assert w.layout() == "G[b=PR k=NL]"


def test_g9_tombstone_then_new_grant_takes_next_token(w: World) -> None:
    t1 = R("a", EX, 1)(w).token
    X("a")(w)
    assert w.layout() == "tombstone"
    t2 = R("b", EX, 2)(w).token
    assert t2 == t1 + 1  # F1: seq survived the resource


# ----------------------------------------------------------------------------- F1


def test_f1_tokens_strictly_increase_across_every_grant_path(w: World, ev: Events) -> None:
    tokens = [R("a", CR, 1)(w).token]                      # granted at once
    tokens.append(R("b", CR, 2)(w).token)
    tokens.append(C("a", PW, 3)(w).token)                  # up-conversion at once
    R("c", EX, 4)(w)                                       # queued
    C("b", PR, 5)(w)                                       # conversion queued (PW held)
    tokens.append(C("a", NL, 6)(w).token)                  # down: token kept, not a new grant
    assert tokens[-1] == tokens[-2]
    tokens.pop()
    got = [e for _, e in ev.drain() if e.kind == "G"]      # b's conversion granted by G8
    assert [e.lock_id for e in got] == ["b"]
    tokens.append(got[0].token)
    X("b")(w)
    got = [e for _, e in ev.drain() if e.kind == "G"]      # c granted from the wait queue
    assert [e.lock_id for e in got] == ["c"]
    tokens.append(got[0].token)
    tokens.append(Y("c")(w).token)                         # yield, granted again
    X("c")(w)
    X("a")(w)
    tokens.append(R("d", EX, 7)(w).token)                  # after the tombstone
    assert tokens == sorted(set(tokens)), tokens  # strictly increasing


def test_f1_token_follows_the_instance_clock(w: World) -> None:
    t1 = R("a", EX, 1)(w).token
    w.tick(5)
    X("a")(w)
    t2 = R("b", EX, 2)(w).token
    assert t1 == T0 * 1000 and t2 == (T0 + 5) * 1000  # max(seq + 1, now_us)
    w.e.set_clock(frozen_ms=None)  # real TIME
    X("b")(w)
    t3 = R("c", EX, 3)(w).token
    assert t3 > t2
    assert abs(t3 - time.time() * 1e6) < 60e6


FLOOR = 5_000_000_000_000  # far above T0 * 1000


@pytest.mark.parametrize("setup,act,alive", [
    pytest.param([R("a", EX, 1)], C("a", PR, 2, floor=FLOOR), True,
                 id="F1-floor-on-down-conversion-raises-seq"),
    pytest.param([R("a", PR, 1)], C("a", PR, 2, floor=FLOOR), True,
                 id="F1-floor-on-same-mode-conversion-raises-seq"),
    pytest.param([R("a", EX, 1)], X("a", floor=FLOOR), False,
                 id="F1-floor-on-release-raises-seq-kept-in-tombstone"),
    pytest.param([], X("a", floor=FLOOR), False,
                 id="F1-floor-on-NOTFOUND-release-of-absent-resource-makes-tombstone"),
    pytest.param([R("k", NL, 1)], X("a", floor=FLOOR), True,
                 id="F1-floor-on-NOTFOUND-release-of-live-resource"),
    pytest.param([R("a", EX, 1)], lambda w: w.e.renew("oa", LEASE, [(w.key(), "a", FLOOR)]),
                 True, id="F1-floor-on-renew-raises-seq"),
])
def test_f1_floor_raises_seq(w: World, setup: list[Op], act: Op, alive: bool) -> None:
    run(w, setup)
    act(w)
    v = w.view()
    assert v is not None and v.seq == FLOOR
    assert bool(v.locks) == alive
    assert R("n", NL, 9)(w).token == FLOOR + 1


def test_f1_lower_floor_never_lowers_seq(w: World) -> None:
    t = R("a", EX, 1)(w).token
    X("a", floor=5)(w)
    assert w.view().seq == t


# ----------------------------------------------------------------------------- E1


@pytest.mark.parametrize("rejoin,advance,status,extra", [
    pytest.param(5000, 0, RECOVERING, 5000, id="E1-new-epoch-recovering-whole-window"),
    pytest.param(5000, 4999, RECOVERING, 1, id="E1-recovering-until-last-ms"),
    pytest.param(5000, 5000, GRANTED, 0, id="E1-grants-once-window-over"),
    pytest.param(0, 0, GRANTED, 0, id="E1-rejoin-0-safe-at-once"),
])
def test_e1_fresh_instance_recovers(redis_server, rejoin: int, advance: int, status: Status,
                                    extra: int) -> None:
    c = redis_server.client()
    e = Engine(c, NS, rejoin_ms=rejoin)
    e.set_clock(frozen_ms=T0)
    assert e.status().epoch is None
    k = e.key("res")
    first = e.request(k, "o1", "a", EX, ticket=1, lease_ms=LEASE)  # creates the epoch
    assert first.status == (RECOVERING if rejoin else GRANTED)
    st = e.status()
    assert st.epoch is not None and st.recovering_ms == rejoin
    e.set_clock(frozen_ms=T0 + advance)
    rep = e.request(e.key("res2"), "o2", "b", EX, ticket=2, lease_ms=LEASE)
    assert (rep.status, rep.extra) == (status, extra)
    assert rep.epoch == st.epoch
    if status == RECOVERING:
        assert e.inspect([e.key("res2")])[1] == [None], "RECOVERING leaves no lock"
        assert e.waiters() == []


def test_e1_init_fresh_is_safe_at_once_and_epoch_is_kept(redis_server) -> None:
    c = redis_server.client()
    e = Engine(c, NS, rejoin_ms=60_000)
    st = e.init_fresh()
    assert st.epoch is not None and st.recovering_ms == 0
    assert e.request(e.key("res"), "o1", "a", EX, ticket=1, lease_ms=LEASE).status == GRANTED
    assert e.init_fresh().epoch == st.epoch  # idempotent
    e2 = Engine(c, NS, rejoin_ms=10**7)  # a later, larger rejoin_ms does not reopen E1
    assert e2.request(e.key("r2"), "o1", "b", EX, ticket=2, lease_ms=LEASE).status == GRANTED




def test_e1_up_conversion_recovering(w: World) -> None:
    run(w, [R("a", NL, 1)])
    w.r.delete(EPOCH_KEY)  # the epoch is gone, the resource survived
    w.e.set_clock(frozen_ms=T0)
    assert C("a", EX, 2)(w).status == RECOVERING


# ----------------------------------------------------------------------------- E2

AOF_EVERYSEC = ["--appendonly", "yes", "--appendfsync", "everysec"]


def test_e2_restart_with_data_starts_a_new_epoch_in_its_rejoin_window() -> None:
    """An instance that restarts with its data (here its AOF, everysec) may lack the last
    writes before the crash, so it must not grant at once: a new request is answered
    RECOVERING for the whole rejoin wait, under a new epoch id, and the locks it reloaded
    are still there. A first call that fails (a corrupt key) leaves the check to the next
    call; after the wait it grants."""
    rejoin = 5000
    with RedisServer(AOF_EVERYSEC) as srv:
        e = Engine(srv.client(), NS, rejoin_ms=rejoin)
        e.init_fresh()
        e.set_clock(frozen_ms=T0)
        k, k2 = e.key("res"), e.key("res2")
        held = e.request(k, "o1", "a", EX, ticket=1, lease_ms=LEASE)
        assert held.status == GRANTED
        srv.client().set(e.key("junk"), b"not a resource")
        srv.restart(empty=False)
        e = Engine(srv.client(), NS, rejoin_ms=rejoin)
        assert e.status().epoch == held.epoch  # reloaded; nothing ran yet
        with pytest.raises(CorruptKey):  # fails after reading the epoch: nothing written
            e.release(e.key("junk"), "o2", "j")
        assert e.status().epoch == held.epoch
        rep = e.request(k2, "o2", "b", EX, ticket=3, lease_ms=LEASE)
        assert (rep.status, rep.extra) == (RECOVERING, rejoin)
        assert rep.epoch != held.epoch and e.status().epoch == rep.epoch
        assert e.status().recovering_ms == rejoin
        assert [lk.lock_id for lk in e.inspect([k])[1][0].locks] == ["a"]  # reloaded
        e.set_clock(frozen_ms=T0 + rejoin - 1)
        again = e.request(k2, "o2", "b", EX, ticket=3, lease_ms=LEASE)
        assert (again.status, again.epoch) == (RECOVERING, rep.epoch)  # one new epoch
        e.set_clock(frozen_ms=T0 + rejoin)
        assert e.request(k2, "o2", "b", EX, ticket=3, lease_ms=LEASE).status == GRANTED
        assert e.request(k, "o3", "c", EX, ticket=4, lease_ms=LEASE,
                         flags=NOQUEUE).status == NOTQUEUED  # "a" still holds it


def test_e2_a_library_reload_is_not_a_restart() -> None:
    """FUNCTION LOAD REPLACE in the same server process (a library upgrade or reload) keeps
    the epoch and grants at once; a restart of the process with the same data does not."""
    with RedisServer(AOF_EVERYSEC) as srv:
        c = srv.client()
        e = Engine(c, NS, rejoin_ms=5000)
        e.init_fresh()
        e.set_clock(frozen_ms=T0)
        first = e.request(e.key("r1"), "o1", "a", EX, ticket=1, lease_ms=LEASE)
        assert first.status == GRANTED
        c.execute_command(*scripts.load_command())  # fresh library state, same process
        rep = e.request(e.key("r2"), "o1", "b", EX, ticket=2, lease_ms=LEASE)
        assert (rep.status, rep.epoch) == (GRANTED, first.epoch)
        srv.restart(empty=False)
        e = Engine(srv.client(), NS, rejoin_ms=5000)
        after = e.request(e.key("r3"), "o1", "c", EX, ticket=3, lease_ms=LEASE)
        assert after.status == RECOVERING and after.epoch != first.epoch


# ----------------------------------------------------------------------------- H2, H3


def test_h2_same_child_name_under_two_parents_is_two_resources(w: World) -> None:
    users_child = ("db/users", "row:42")
    run(w, [R("p1", EX, 1, res=ROOT, owner="o1"), R("p2", EX, 2, res=("db/users",), owner="o2")])
    a = R("c1", EX, 3, res=CHILD, parent="p1", owner="o1")(w)
    b = R("c2", EX, 4, res=users_child, parent="p2", owner="o2")(w)
    assert a.status == GRANTED and b.status == GRANTED  # no conflict: different resources
    k1, k2 = w.key(CHILD), w.key(users_child)
    assert k1 != k2
    assert k1.startswith(w.key(ROOT) + b"/") and k2.startswith(w.key(("db/users",)) + b"/")
    # one hash tag per tree: the root's
    assert k1[: k1.index(b"}") + 1] == w.key(ROOT)
    assert w.key(GRANDCHILD)[: w.key(GRANDCHILD).index(b"}") + 1] == w.key(ROOT)
    # the same name at the root is a third resource
    assert R("c3", EX, 5, res=("row:42",))(w).status == GRANTED
    assert w.view(CHILD).path == (b"db/orders", b"row:42")
    assert [lk.kids for lk in w.view(ROOT).locks] == [((k1, "c1"),)]


def test_h2_scripts_run_on_a_redis_cluster_member() -> None:
    """H2c: on a Redis Cluster member every script touches the keys of one hash slot (the
    epoch hash and waiter index of the tree's slot), so no call fails with CROSSSLOT."""
    from redis_harness import RedisServer, free_port  # tests/ is on sys.path (conftest)

    # (a bus port of its own: the default, port + 10000, does not exist above 55535)
    with RedisServer(["--cluster-enabled", "yes", "--cluster-port", str(free_port())]) as srv:
        c = srv.client()
        c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 5
        while b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "cluster did not become ok"
            time.sleep(0.02)
        c = redis.RedisCluster(host=srv.host, port=srv.port)
        e = Engine(c, NS)
        e.init_fresh()
        k = e.key(*ROOT)
        assert e.request(k, "o1", "p", EX, ticket=1, lease_ms=LEASE).status == GRANTED


def _tree(w: World) -> None:
    run(w, [R("p", EX, 1, res=ROOT, owner="o1"),
            R("c", EX, 2, res=CHILD, parent="p", owner="o1"),
            R("g", EX, 3, res=GRANDCHILD, parent="c", owner="o1"),
            R("x", EX, 4, res=CHILD, owner="o2")])  # another owner waits on the child


@pytest.mark.parametrize("op,result", [
    pytest.param(X("p", kids=(CHILD, GRANDCHILD)), HasChildren,
                 id="H3-release-parent-with-children-HasChildren"),
    pytest.param(X("c", kids=(GRANDCHILD,)), HasChildren,
                 id="H3-release-middle-with-child-HasChildren"),
    pytest.param(X("p", subtree=True, kids=(CHILD,)), MissingKeys,
                 id="H3-subtree-without-grandchild-key-MissingKeys"),
    pytest.param(X("p", subtree=True), MissingKeys,
                 id="H3-subtree-without-any-child-key-MissingKeys"),
    pytest.param(X("p", subtree=True, kids=(CHILD, GRANDCHILD)), 3,
                 id="H3-subtree-releases-depth-first"),
    pytest.param(X("c", subtree=True, kids=(GRANDCHILD,)), 2,
                 id="H3-subtree-of-middle-lock"),
    pytest.param(X("g"), 1, id="H3-leaf-released-alone"),
])
def test_h3_children(w: World, op: Op, result: object) -> None:
    _tree(w)
    before = w.snapshot()
    if isinstance(result, type):
        with pytest.raises(result):
            op(w)
        assert w.snapshot() == before
        return
    rep = op(w)
    assert (rep.status, rep.extra) == (RELEASED, result)
    if result >= 2:  # the child went: its waiter is granted (G8)
        assert w.layout(CHILD) == "G[x=EX]"
        assert w.layout(GRANDCHILD) == "tombstone"
    if result == 3:
        assert w.layout(ROOT) == "tombstone"
    if result == 2:  # the parent forgot its child
        assert w.lock("p").kids == ()
    if result == 1:
        assert w.lock("c").kids == ()
        assert X("c")(w).status == RELEASED  # no more children: plain release works


def test_h3_waiting_child_counts_as_child(w: World) -> None:
    run(w, [R("h", EX, 1, res=CHILD, owner="o2"), R("p", EX, 2, res=ROOT, owner="o1"),
            R("c", EX, 3, res=CHILD, parent="p", owner="o1")])
    assert w.layout(CHILD) == "G[h=EX] W[c>EX]"
    with pytest.raises(HasChildren):
        X("p", kids=(CHILD,))(w)
    assert X("p", subtree=True, kids=(CHILD,))(w).extra == 2
    assert w.layout(CHILD) == "G[h=EX]"
    assert w.e.waiters() == []


def test_h3_cancelled_waiting_child_unlinked_from_parent(w: World) -> None:
    run(w, [R("h", EX, 1, res=CHILD, owner="o2"), R("p", EX, 2, res=ROOT, owner="o1"),
            R("c", EX, 3, res=CHILD, parent="p", owner="o1")])
    assert Cancel("c")(w).status == CANCELLED
    assert w.lock("p").kids == ()
    assert X("p")(w).status == RELEASED


# ----------------------------------------------------------------------------- V1-V4


def _writer_then(w: World, value: bytes = b"v", version: int = 7) -> None:
    """An NL keeper holds the resource; an EX writer stores `value`."""
    run(w, [R("k", NL, 1), R("wr", EX, 2), X("wr", value=value, version=version)])


@pytest.mark.parametrize("vbmax,size,via,ok", [
    pytest.param(64, 64, "release", True, id="V1-64-bytes-accepted-on-release"),
    pytest.param(64, 65, "release", False, id="V1-65-bytes-refused-on-release"),
    pytest.param(64, 64, "convert", True, id="V1-64-bytes-accepted-on-down-conversion"),
    pytest.param(64, 65, "convert", False, id="V1-65-bytes-refused-on-down-conversion"),
    pytest.param(64, 0, "release", True, id="V1-empty-value-accepted"),
    pytest.param(8, 8, "release", True, id="V1-vbmax-8-accepts-8"),
    pytest.param(8, 9, "convert", False, id="V1-vbmax-8-refuses-9"),
])
def test_v1_value_size(r: redis.Redis, vbmax: int, size: int, via: str, ok: bool) -> None:
    e = Engine(r, NS, vbmax=vbmax)
    e.init_fresh()
    e.set_clock(frozen_ms=T0)
    w = World(r, e)
    run(w, [R("k", NL, 1), R("a", EX, 2)])
    before = w.snapshot()
    value = bytes(range(size))
    op = X("a", value=value, version=1) if via == "release" else C("a", NL, 3, value=value,
                                                                    version=1)
    if not ok:
        with pytest.raises(BadArgument):
            op(w)
        assert w.snapshot() == before, "V1: refused, never truncated"
        return
    op(w)
    v = w.view()
    assert (v.value, v.version, v.valid) == (value, 1, True)


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: f"V2-request-{m.name}-"
                         + ("no-value" if m == NL else "returns-value"))
def test_v2_value_returned_on_grant(w: World, mode: Mode) -> None:
    _writer_then(w)
    rep = R("x", mode, 10)(w)
    assert rep.status == GRANTED
    if mode == NL:
        assert (rep.value, rep.version) == (None, 0)
    else:
        assert (rep.value, rep.version, rep.valid) == (b"v", 7, True)


@pytest.mark.parametrize("mode", [m for m in Mode if m != NL],
                         ids=lambda m: f"V2-convert-NL-to-{m.name}-returns-value")
def test_v2_value_returned_on_conversion(w: World, mode: Mode) -> None:
    _writer_then(w)
    R("x", NL, 10)(w)
    rep = C("x", mode, 11)(w)
    assert (rep.status, rep.value, rep.version) == (GRANTED, b"v", 7)
    assert C("x", NL, 12)(w).value is None  # down to NL: no value


def test_v2_no_value_while_queued_value_in_granted_event(w: World, ev: Events) -> None:
    _writer_then(w)
    R("h", EX, 3)(w)
    rep = R("x", PR, 4)(w)
    assert (rep.status, rep.value) == (QUEUED, None)
    ev.drain()
    X("h", value=b"new", version=8)(w)
    g = [e for o, e in ev.drain() if e.kind == "G"]
    assert [(e.lock_id, e.value, e.version, e.valid) for e in g] == [("x", b"new", 8, True)]


@pytest.mark.parametrize("held,op,ok", [
    pytest.param(PW, X("a", value=b"w", version=2), True, id="V3-release-from-PW-writes"),
    pytest.param(EX, X("a", value=b"w", version=2), True, id="V3-release-from-EX-writes"),
    pytest.param(PR, X("a", value=b"w", version=2), False, id="V3-release-from-PR-refused"),
    pytest.param(CW, X("a", value=b"w", version=2), False, id="V3-release-from-CW-refused"),
    pytest.param(NL, X("a", value=b"w", version=2), False, id="V3-release-from-NL-refused"),
    pytest.param(EX, C("a", NL, 3, value=b"w", version=2), True, id="V3-convert-EX-to-NL-writes"),
    pytest.param(EX, C("a", PR, 3, value=b"w", version=2), True, id="V3-convert-EX-to-PR-writes"),
    pytest.param(PW, C("a", CR, 3, value=b"w", version=2), True, id="V3-convert-PW-to-CR-writes"),
    pytest.param(PW, C("a", EX, 3, value=b"w", version=2), False,
                 id="V3-convert-PW-up-to-EX-refused"),
    pytest.param(EX, C("a", EX, 3, value=b"w", version=2), False,
                 id="V3-convert-EX-same-mode-refused"),
    pytest.param(PR, C("a", NL, 3, value=b"w", version=2), False,
                 id="V3-convert-PR-down-refused"),
])
def test_v3_write_only_from_pw_ex(w: World, held: Mode, op: Op, ok: bool) -> None:
    run(w, [R("k", NL, 1), R("a", held, 2)])
    before = w.snapshot()
    if not ok:
        with pytest.raises(BadArgument):
            op(w)
        assert w.snapshot() == before
        return
    op(w)
    v = w.view()
    assert (v.value, v.version, v.valid) == (b"w", 2, True)


@pytest.mark.parametrize("held,how,valid", [
    pytest.param(EX, "expire", False, id="V4-EX-holder-expired-invalidates"),
    pytest.param(PW, "expire", False, id="V4-PW-holder-expired-invalidates"),
    pytest.param(PR, "expire", True, id="V4-PR-holder-expired-keeps-valid"),
    pytest.param(CW, "expire", True, id="V4-CW-holder-expired-keeps-valid"),
    pytest.param(EX, "break", False, id="V4-EX-holder-broken-invalidates"),
    pytest.param(PW, "break", False, id="V4-PW-holder-broken-invalidates"),
    pytest.param(CR, "break", True, id="V4-CR-holder-broken-keeps-valid"),
    pytest.param(EX, "release", True, id="V4-EX-holder-released-keeps-valid"),
])
def test_v4_invalid_after_writer_lost(w: World, held: Mode, how: str, valid: bool) -> None:
    _writer_then(w)
    R("h", held, 3, lease=1000)(w)
    if how == "expire":
        w.tick(1000)
    elif how == "break":
        assert Brk("h")(w).extra == 1
    else:
        X("h")(w)
    rep = R("rd", CR, 4)(w)
    assert (rep.status, rep.valid, rep.value, rep.version) == (GRANTED, valid, b"v", 7)
    assert w.view().valid == valid


def test_v4_valid_again_after_write(w: World) -> None:
    _writer_then(w)
    run(w, [R("h", EX, 3, lease=1000), Tick(1000)])
    assert R("a", EX, 4)(w).valid is False
    assert C("a", NL, 5, value=b"fresh", version=8)(w).status == GRANTED
    rep = R("rd", PR, 6)(w)
    assert (rep.valid, rep.value, rep.version) == (True, b"fresh", 8)


def test_v4_converting_pw_holder_expired_invalidates(w: World) -> None:
    _writer_then(w)
    run(w, [R("a", PW, 3, lease=1000), R("b", CR, 4), C("a", EX, 5, lease=1000), Tick(1000)])
    rep = R("rd", PR, 6)(w)
    assert (rep.status, rep.valid) == (GRANTED, False)


@pytest.mark.parametrize("via,version,kept", [
    pytest.param("release", 5, True, id="V6-lower-version-release-write-dropped"),
    pytest.param("convert", 5, True, id="V6-lower-version-down-conversion-write-dropped"),
    pytest.param("release", 9, False, id="V6-same-version-written-again"),
    pytest.param("convert", 12, False, id="V6-higher-version-written"),
])
def test_v6_a_write_never_lowers_the_version(w: World, via: str, version: int,
                                             kept: bool) -> None:
    """A late write of a superseded grant (its lock re-created here after it expired, the
    release carrying the value it composed under its old token) must not overwrite a newer
    value: versions follow the writers' tokens, so a lower one is older."""
    _writer_then(w, b"newer", 9)
    R("late", EX, 3)(w)
    if via == "release":
        rep = X("late", value=b"late", version=version)(w)
        assert rep.status == RELEASED  # the release itself proceeds
    else:
        rep = C("late", NL, 4, value=b"late", version=version)(w)
        assert (rep.status, rep.mode) == (GRANTED, NL)
    v = w.view()
    assert (v.value, v.version) == ((b"newer", 9) if kept else (b"late", version))
    assert v.valid


def test_v6_a_dropped_write_leaves_an_invalid_mark(w: World) -> None:
    _writer_then(w, b"newer", 9)
    run(w, [R("h", EX, 3, lease=1000), Tick(1000)])  # V4: invalid
    R("late", EX, 4)(w)
    X("late", value=b"late", version=5)(w)
    v = w.view()
    assert (v.value, v.version, v.valid) == (b"newer", 9, False)


# ----------------------------------------------------------------------------- V5

V5_REJOIN = 5000


@pytest.fixture
def wr(redis_server) -> World:
    """A World whose instance restarted empty: its epoch is created by the first script
    (E1), safe V5_REJOIN ms later; V5's window ends V5_REJOIN ms after that."""
    c = redis_server.client()
    e = Engine(c, NS, rejoin_ms=V5_REJOIN)
    e.set_clock(frozen_ms=T0)
    w = World(c, e)
    assert R("first", NL, 1, res=OTHER)(w).status == RECOVERING  # creates the epoch
    return w


@pytest.mark.parametrize("at,mode,forgotten", [
    pytest.param(V5_REJOIN, CR, True, id="V5-first-lock-once-safe-marks-value-forgotten"),
    pytest.param(2 * V5_REJOIN - 1, EX, True, id="V5-last-ms-of-the-window-marks"),
    pytest.param(2 * V5_REJOIN, PR, False, id="V5-window-over-value-valid"),
])
def test_v5_restarted_instance_marks_first_lock_value_forgotten(wr: World, at: int, mode: Mode,
                                                                forgotten: bool) -> None:
    wr.tick(at)
    rep = R("a", mode, 2)(wr)
    assert rep.status == GRANTED
    assert (rep.value, rep.valid, rep.forgotten) == (None, not forgotten, forgotten)
    v = wr.view()
    assert (v.valid, v.forgotten) == (not forgotten, forgotten)


def test_v5_fresh_instance_never_marks(w: World) -> None:
    rep = R("a", EX, 1)(w)
    assert (rep.valid, rep.forgotten) == (True, False)


def test_v5_nl_grant_carries_no_value_but_the_resource_is_marked(wr: World) -> None:
    wr.tick(V5_REJOIN)
    rep = R("k", NL, 2)(wr)
    assert (rep.valid, rep.forgotten) == (True, False)  # V2: nothing about the value
    assert R("rd", PR, 3)(wr).forgotten


def test_v5_live_resource_is_not_marked_again(wr: World) -> None:
    wr.tick(V5_REJOIN)
    run(wr, [R("k", NL, 2), R("wr", EX, 3), X("wr", value=b"new", version=9)])
    rep = R("rd", PR, 4)(wr)
    assert (rep.value, rep.version, rep.valid, rep.forgotten) == (b"new", 9, True, False)


@pytest.mark.parametrize("how,forgotten", [
    pytest.param("write", False, id="V5-a-write-clears-the-mark"),
    pytest.param("expire", True, id="V5-an-expired-writer-keeps-the-mark"),
    pytest.param("break", True, id="V5-a-broken-writer-keeps-the-mark"),
])
def test_v5_mark_until_written(wr: World, how: str, forgotten: bool) -> None:
    wr.tick(V5_REJOIN)
    run(wr, [R("k", NL, 2), R("h", EX, 3, lease=1000)])
    if how == "write":
        X("h", value=b"w", version=4)(wr)
    elif how == "expire":
        wr.tick(1000)
    else:
        Brk("h")(wr)
    rep = R("rd", PR, 4)(wr)
    assert (rep.valid, rep.forgotten) == (not forgotten, forgotten)


def test_v5_mark_goes_with_the_resource(wr: World) -> None:
    wr.tick(V5_REJOIN)
    run(wr, [R("a", EX, 2), X("a")])
    assert wr.layout() == "tombstone"
    wr.tick(V5_REJOIN)  # window over: G9 took the mark with the resource
    rep = R("b", PR, 3)(wr)
    assert (rep.valid, rep.forgotten) == (True, False)


def test_v5_granted_event_carries_the_mark(wr: World) -> None:
    wr.tick(V5_REJOIN)
    evs = Events(wr.r)
    try:
        run(wr, [R("h", EX, 2), R("b", PR, 3), X("h")])
        (owner, g), = [(o, e) for o, e in evs.drain() if e.kind == "G"]
        assert (owner, g.lock_id, g.valid, g.forgotten) == ("ob", "b", False, True)
    finally:
        evs.close()


# ----------------------------------------------------------------------------- N1-N3


def test_n1_blocking_event_to_each_incompatible_holder(w: World, ev: Events) -> None:
    run(w, [R("a", PR, 1, flags=BLKAST), R("b", CR, 2, flags=BLKAST),
            R("n", NL, 3, flags=BLKAST)])
    ev.drain()
    R("x", EX, 77)(w)
    got = sorted((o, e.kind, e.lock_id, e.mode, e.ticket, e.other) for o, e in ev.drain())
    assert got == [("oa", "B", "a", EX, 77, "x"), ("ob", "B", "b", EX, 77, "x")]


def test_n1_blocking_event_for_queued_conversion_carries_conversion_ticket(
        w: World, ev: Events) -> None:
    run(w, [R("a", PR, 1, flags=BLKAST), R("b", CR, 2), R("c", PR, 3, flags=BLKAST),
            R("n", NL, 4, flags=BLKAST)])
    ev.drain()
    assert C("b", PW, 55)(w).status == QUEUED
    got = sorted((o, e.lock_id, e.mode, e.ticket, e.other) for o, e in ev.drain())
    assert got == [("oa", "a", PW, 55, "b"), ("oc", "c", PW, 55, "b")]


def test_n1_no_blocking_event_to_a_holder_that_did_not_ask(w: World, ev: Events) -> None:
    # a and c hold without BLKAST, older than the request: nobody reads their event
    run(w, [R("a", PR, 1), R("b", CR, 2, flags=BLKAST), R("c", PR, 3)])
    ev.drain()
    assert R("x", EX, 77)(w).status == QUEUED
    got = [(o, e.lock_id) for o, e in ev.drain()]
    assert got == [("ob", "b")]


def test_n1_blocking_event_to_a_younger_holder_that_did_not_ask(w: World, ev: Events) -> None:
    # Y1: a holder granted at a younger ticket than a request queued behind it reads the
    # event to give back a grant split between instances, whether it asked or not
    run(w, [R("a", EX, 50)])
    ev.drain()
    assert R("x", PR, 10)(w).status == QUEUED
    got = [(o, e.kind, e.lock_id, e.mode, e.ticket, e.other) for o, e in ev.drain()]
    assert got == [("oa", "B", "a", PR, 10, "x")]


def test_n1_blocking_event_to_a_younger_conversion_that_did_not_ask(
        w: World, ev: Events) -> None:
    # a's up-conversion granted at conversion ticket 60 (G5): a conversion queued at 55
    # behind it tells it, as a new request's older ticket would (Y1)
    run(w, [R("a", CR, 1), R("b", CR, 2), R("c", CR, 3)])
    assert C("a", PR, 60)(w).status == GRANTED
    assert C("c", PR, 70)(w).status == GRANTED
    ev.drain()
    assert C("b", EX, 65)(w).status == QUEUED
    got = [(o, e.lock_id, e.mode, e.ticket) for o, e in ev.drain()]
    assert got == [("oc", "c", EX, 65)]


def test_n1_a_conversion_keeps_blkast_only_if_it_carries_it(w: World, ev: Events) -> None:
    # the flags of a conversion granted or queued are the lock's from then on (as NODLCKWT)
    run(w, [R("a", CR, 1, flags=BLKAST), R("b", CR, 2, flags=BLKAST)])
    assert C("a", PR, 3)(w).status == GRANTED
    assert C("b", PR, 4, flags=BLKAST)(w).status == GRANTED
    ev.drain()
    assert R("x", EX, 77)(w).status == QUEUED
    assert [(o, e.lock_id) for o, e in ev.drain()] == [("ob", "b")]


@pytest.mark.parametrize("setup,act", [
    pytest.param([R("a", EX, 1)], R("x", PR, 2, flags=NOQUEUE), id="N1-none-for-NOQUEUE"),
    pytest.param([R("a", PR, 1)], R("x", CR, 2), id="N1-none-when-granted"),
    pytest.param([R("a", PR, 1), R("b", EX, 2)], R("x", PR, 3),
                 id="N1-none-when-queued-only-behind-waiter"),
    pytest.param([R("a", PR, 1), R("b", PR, 2), C("a", EX, 3)], C("b", EX, 4),
                 id="N1-none-for-DEADLOCK"),
])
def test_n1_no_blocking_event(w: World, ev: Events, setup: list[Op], act: Op) -> None:
    run(w, setup)
    ev.drain()
    act(w)
    assert ev.drain() == []


def test_n2_granted_event_on_release(w: World, ev: Events) -> None:
    run(w, [R("h", EX, 1), R("x", PR, 2), R("y", PR, 3)])
    ev.drain()
    X("h", value=b"vb", version=4)(w)
    got = sorted((o, e.kind, e.lock_id, e.mode, e.value, e.version, e.valid)
                 for o, e in ev.drain())
    assert got == [("ox", "G", "x", PR, b"vb", 4, True), ("oy", "G", "y", PR, b"vb", 4, True)]
    view = {lk.lock_id: lk.token for lk in w.view().locks}
    assert view["x"] != view["y"]


@pytest.mark.parametrize("setup,act,granted", [
    pytest.param([R("a", PR, 1), R("b", PR, 2), C("a", EX, 3)], X("b"), ("a", EX),
                 id="N2-granted-event-for-conversion"),
    pytest.param([R("h", EX, 1), R("x", EX, 2)], C("h", NL, 3), ("x", EX),
                 id="N2-granted-event-after-down-conversion"),
    pytest.param([R("h", EX, 1, lease=100), R("x", EX, 2), Tick(100)],
                 lambda w: w.e.renew("ox", LEASE, [(w.key(), "x", 0)]), ("x", EX),
                 id="N2-granted-event-after-purge"),
    pytest.param([R("h", EX, 1), R("x", EX, 2)], Brk("h"), ("x", EX),
                 id="N2-granted-event-after-break"),
    pytest.param([R("h", PR, 1), R("w1", EX, 2), R("x", PR, 3)], Cancel("w1"), ("x", PR),
                 id="N2-granted-event-after-cancel"),
    pytest.param([R("a", EX, 20), R("x", EX, 10)], Y("a"), ("x", EX),
                 id="N2-granted-event-after-yield"),
])
def test_n2_granted_event(w: World, ev: Events, setup: list[Op], act: Op,
                          granted: tuple[str, Mode]) -> None:
    run(w, setup)
    ev.drain()
    act(w)
    events = [(o, e) for o, e in ev.drain() if e.kind == "G"]
    lid, mode = granted
    assert [(o, e.lock_id, e.mode) for o, e in events] == [("o" + lid, lid, mode)]
    assert events[0][1].token == w.lock(lid).token


@pytest.mark.parametrize("act,expected", [
    pytest.param(Cancel("x", notify=True), [("ox", "x", "cancel")], id="N3-cancel-with-notify"),
    pytest.param(Cancel("x", notify=True, reason="deadlock"), [("ox", "x", "deadlock")],
                 id="N3-cancel-by-detector-reason-deadlock"),
    pytest.param(Cancel("x"), [], id="N3-cancel-without-notify-silent"),
    pytest.param(Cancel("h", notify=True), [], id="N3-CANCELGRANT-no-event"),
    pytest.param(Brk("x"), [("ox", "x", "broken")], id="N3-break-of-waiter"),
    pytest.param(Brk(owner="oh"), [("oh", "h", "broken")], id="N3-break-by-owner"),
])
def test_n3_cancelled_events(w: World, ev: Events, act: Op, expected: list) -> None:
    run(w, [R("h", EX, 1), R("x", EX, 2)])
    ev.drain()
    act(w)
    got = [(o, e.lock_id, e.reason) for o, e in ev.drain() if e.kind == "C"]
    assert got == expected


def test_break_by_owner_takes_all_its_locks_on_the_resource(w: World, ev: Events) -> None:
    run(w, [R("a", PR, 1, owner="o1"), R("b", PR, 2, owner="o1"), R("x", EX, 3, owner="o2"),
            R("y", EX, 4, owner="o1"), R("z", EX, 5, owner="o1", res=OTHER)])
    ev.drain()
    rep = Brk(owner="o1")(w)
    assert (rep.status, rep.extra) == (RELEASED, 3)
    assert w.layout() == "G[x=EX]"
    assert w.layout(OTHER) == "G[z=EX]"  # break works on one resource
    got = sorted((o, e.kind, e.lock_id) for o, e in ev.drain())
    assert got == [("o1", "C", "a"), ("o1", "C", "b"), ("o1", "C", "y"), ("o2", "G", "x")]
    assert w.e.waiters() == []


# ----------------------------------------------------------------------------- renew


def _script_calls(w: World) -> int:
    """Script invocations the server has run so far, however scripts are invoked."""
    st = w.r.info("commandstats")
    return sum(st.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval", "fcall"))


def test_renew_batch_many_locks_in_one_call(w: World) -> None:
    n = 40
    for i in range(n):
        R(f"l{i}", EX, i + 1, owner="o1", res=(f"r{i}",))(w)
    R("h", EX, 100, owner="o2", res=("r0",))(w)  # o2 waits behind o1 on r0
    R("q", PR, 101, owner="o1", res=("r1",))(w)  # o1 waits too (its own EX blocks it)
    w.tick(5000)
    calls = _script_calls(w)
    items = [(w.key((f"r{i}",)), f"l{i}", 0) for i in range(n)]
    items.append((w.key(("r1",)), "q", 0))
    epoch, entries = w.e.renew("o1", 30_000, items)
    assert _script_calls(w) == calls + 1
    assert epoch == w.e.status().epoch
    assert [e.status for e in entries] == [GRANTED] * n + [QUEUED]
    for i in range(n):
        lk = w.view((f"r{i}",)).locks[0]
        assert (lk.lock_id, lk.lease_left_ms) == (f"l{i}", 30_000)
    assert w.lock("h").lease_left_ms == LEASE - 5000  # another owner's lock is untouched
    # the waiter index follows the renewed lease of o1's waiting lock
    scores = {m: s for m, s in w.e.waiters()}
    assert scores[b"q|" + w.key(("r1",))] == w.now + 30_000
    assert scores[b"h|" + w.key(("r0",))] == T0 + LEASE


def test_renew_notfound_entries(w: World) -> None:
    run(w, [R("a", EX, 1, owner="o1"), R("b", PR, 2, owner="o1", res=OTHER)])
    _, entries = w.e.renew("o1", LEASE, [(w.key(), "a", 0), (w.key(), "gone", 0),
                                         (w.key(("nowhere",)), "x", 0),
                                         (w.key(OTHER), "b", 0)])
    assert [(e.status, e.mode) for e in entries] == [
        (GRANTED, EX), (NOTFOUND, None), (NOTFOUND, None), (GRANTED, PR)]
    assert w.view(("nowhere",)) is None


def test_renew_of_expired_lock_is_notfound_and_grants_waiter(w: World) -> None:
    run(w, [R("a", EX, 1, owner="o1", lease=1000), R("b", EX, 2, owner="o2"), Tick(1000)])
    _, entries = w.e.renew("o1", LEASE, [(w.key(), "a", 0)])
    assert entries[0].status == NOTFOUND
    assert w.layout() == "G[b=EX]"


# ----------------------------------------------------------------------------- waiter index


def _members(w: World) -> dict[bytes, float]:
    return dict(w.e.waiters())


def test_waiter_index_lists_waiting_and_converting_locks(w: World) -> None:
    run(w, [R("a", PR, 1), R("b", PR, 2), Tick(10), C("a", EX, 3, lease=7000),
            R("x", EX, 4, lease=9000)])
    k = w.key()
    assert _members(w) == {b"a|" + k: T0 + 10 + 7000, b"x|" + k: T0 + 10 + 9000}


@pytest.mark.parametrize("act,left", [
    pytest.param(X("b"), {"x"}, id="waiters-conversion-granted-removed"),
    pytest.param(Cancel("a"), {"x"}, id="waiters-conversion-cancelled-removed"),
    pytest.param(Cancel("x"), {"a"}, id="waiters-waiting-cancelled-removed"),
    pytest.param(X("x"), {"a"}, id="waiters-waiting-released-removed"),
    pytest.param(Brk("x"), {"a"}, id="waiters-waiting-broken-removed"),
    pytest.param(lambda w: (X("b")(w), X("a")(w)), set(), id="waiters-all-granted-removed"),
    pytest.param(lambda w: (w.tick(LEASE), R("n", NL, 9)(w)), set(),
                 id="waiters-expired-purged-removed"),
])
def test_waiter_index_entries_removed(w: World, act: Op, left: set[str]) -> None:
    run(w, [R("a", PR, 1), R("b", PR, 2), C("a", EX, 3), R("x", EX, 4)])
    act(w)
    assert {m.split(b"|")[0].decode() for m in _members(w)} == left


def test_waiter_index_yielded_lock_added(w: World) -> None:
    run(w, [R("a", EX, 20), R("b", EX, 10)])
    assert set(_members(w)) == {b"b|" + w.key()}
    Y("a")(w)
    assert set(_members(w)) == {b"a|" + w.key()}


# ----------------------------------------------------------------------------- G8 as a class


@pytest.mark.parametrize(("held", "waiter"), [(CW, PR), (PR, CW)])
@pytest.mark.parametrize("queue", ["wait", "conversion"])
def test_g8_middle_conversion_granted_at_once_processes_the_queues(
        w: World, held: Mode, waiter: Mode, queue: str) -> None:
    """A holder in CW with a PR request waiting converts CW->PR (or PR->CW with a CW request
    waiting): granted at once (G5), and the request it no longer blocks is granted too, by
    the same call (G8), whether it waits as a new request or as a queued conversion."""
    k = w.key()
    assert w.e.request(k, "o1", "a", held, ticket=1, lease_ms=LEASE).status == GRANTED
    if queue == "wait":
        assert w.e.request(k, "o2", "b", waiter, ticket=2, lease_ms=LEASE).status == QUEUED
    else:
        assert w.e.request(k, "o2", "b", NL, ticket=2, lease_ms=LEASE).status == GRANTED
        assert w.e.convert(k, "o2", "b", waiter, ticket=3, lease_ms=LEASE).status == QUEUED
    assert w.e.convert(k, "o1", "a", waiter, ticket=4, lease_ms=LEASE).status == GRANTED
    _, (view,) = w.e.inspect([k])
    assert sorted((lk.lock_id, lk.queue, lk.mode) for lk in view.locks) == [
        ("a", "G", waiter), ("b", "G", waiter)]
