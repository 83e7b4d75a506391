"""Owners and namespaces are isolated from each other (docs/design.md §9, "Bad input").

* Through the Engine: an owner cannot release, convert, cancel, yield or renew another
  owner's lock, granted, converting or waiting (NotOwner), and the database is unchanged.
* Through two DLM clients: a client that guesses (or learns) another client's lock id still
  cannot touch that lock, neither with a crafted script call of its own session nor with a
  request reusing the id (G12).
* Namespaces: the same resource name in namespaces "a" and "b" are independent locks, and
  `dlm ls --namespace a` shows only a's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
import redis
from click.testing import CliRunner
from redis_harness import Instances
from redlockdlm_cli.main import cli

from redlockdlm import DLM, Mode
from redlockdlm.engine import codec
from redlockdlm.engine.instance import Engine
from redlockdlm.engine.modes import Status
from redlockdlm.errors import LockTimeout, NotOwner
from redlockdlm.protocol import Call

pytestmark = pytest.mark.timeout(60)

LEASE = 30_000


def snapshot(c: redis.Redis) -> dict:
    """Every key and value (DUMP-free), for 'nothing changed'."""
    out = {}
    for k in sorted(c.scan_iter(count=1000)):
        t = c.type(k)
        out[k] = (c.get(k) if t == b"string" else sorted(c.hgetall(k).items()) if t == b"hash"
                  else c.zrange(k, 0, -1, withscores=True) if t == b"zset" else t)
    return out


@pytest.fixture
def fresh3(cluster3: Instances) -> Instances:
    for s in cluster3:
        c = s.client()
        Engine(c, "x").init_fresh()
        c.close()
    return cluster3


@pytest.fixture
def engine(redis_server) -> Iterator[tuple[Engine, redis.Redis]]:
    c = redis_server.client()
    e = Engine(c, "iso", rejoin_ms=0)
    e.init_fresh()
    e.set_clock(1_800_000_000_000, 0)  # frozen: nothing expires between two snapshots
    yield e, c


# ----------------------------------------------------------------- through the Engine


def _state(e: Engine) -> dict[str, bytes]:
    """alice holds PR a1 and converts a2 (PR) to EX, which waits for bob's PR b1; carol
    waits for EX (c1). Returns lock id -> key."""
    k = e.key("shared")
    kw = {"lease_ms": LEASE}
    assert e.request(k, "alice", "a1", Mode.PR, ticket=1, **kw).status == Status.GRANTED
    assert e.request(k, "alice", "a2", Mode.PR, ticket=2, **kw).status == Status.GRANTED
    assert e.request(k, "bob", "b1", Mode.PR, ticket=3, **kw).status == Status.GRANTED
    assert e.convert(k, "alice", "a2", Mode.EX, ticket=4, **kw).status == Status.QUEUED
    assert e.request(k, "carol", "c1", Mode.EX, ticket=5, **kw).status == Status.QUEUED
    return {"a1": k, "a2": k, "b1": k, "c1": k}


OWNER_OPS: dict[str, Callable[[Engine, bytes, str, str], object]] = {
    "release": lambda e, k, o, i: e.release(k, o, i),
    "release subtree": lambda e, k, o, i: e.release(k, o, i, subtree=True),
    "convert up": lambda e, k, o, i: e.convert(k, o, i, Mode.EX, ticket=9, lease_ms=LEASE),
    "convert down": lambda e, k, o, i: e.convert(k, o, i, Mode.NL, ticket=9, lease_ms=LEASE),
    "cancel": lambda e, k, o, i: e.cancel(k, o, i),
    "cancel as deadlock": lambda e, k, o, i: e.cancel(k, o, i, reason="deadlock", notify=True),
    "yield": lambda e, k, o, i: e.yield_(k, o, i),
    "renew": lambda e, k, o, i: e.renew(o, LEASE, [(k, i, 0)]),
    "request with its id": lambda e, k, o, i: e.request(k, o, i, Mode.NL, ticket=9,
                                                        lease_ms=LEASE),
}
OWNERS = {"a1": "alice", "a2": "alice", "b1": "bob", "c1": "carol"}


@pytest.mark.parametrize("op", list(OWNER_OPS))
def test_an_owner_cannot_touch_another_owners_locks(engine, op: str) -> None:
    e, c = engine
    locks = _state(e)
    for lock_id, key in locks.items():
        for intruder in ("alice", "bob", "carol", "mallory"):
            if intruder == OWNERS[lock_id]:
                continue
            before = snapshot(c)
            with pytest.raises(NotOwner):
                OWNER_OPS[op](e, key, intruder, lock_id)
            assert snapshot(c) == before, (op, intruder, lock_id)


def test_renew_batch_with_one_foreign_lock_renews_nothing(engine) -> None:
    e, c = engine
    locks = _state(e)
    before = snapshot(c)
    with pytest.raises(NotOwner):
        e.renew("alice", 2 * LEASE, [(locks["a1"], "a1", 0), (locks["b1"], "b1", 0)])
    assert snapshot(c) == before  # not even alice's own a1


def test_the_owner_still_can(engine) -> None:
    """The same calls by the right owner do work (the refusals above are about owners)."""
    e, _ = engine
    locks = _state(e)
    k = locks["a1"]
    assert e.renew("alice", LEASE, [(k, "a1", 0)])[1][0].status == Status.GRANTED
    assert e.cancel(k, "alice", "a2").status == Status.CANCELLED
    assert e.cancel(k, "carol", "c1").status == Status.CANCELLED
    assert e.release(k, "bob", "b1").status == Status.RELEASED
    assert e.release(k, "alice", "a1").status == Status.RELEASED


# ----------------------------------------------------------------- through two DLM clients


def test_a_client_cannot_touch_another_clients_lock_even_knowing_its_id(fresh3) -> None:
    urls = fresh3.urls
    with DLM(urls, "iso", lease_ms=5_000) as a, DLM(urls, "iso", lease_ms=5_000) as b:
        held = a.lock("res", Mode.EX, timeout=5)
        lid, key = held.id, held._core.key
        clients = [s.client() for s in fresh3]
        before = [snapshot(c) for c in clients]

        # 1. b's own session crafts every owner call with a's lock id: refused everywhere
        s = b._core
        ks, pk = s._keys(key), s._keys(key, key)
        calls = [
            Call("release", pk, codec.release_args(s.rejoin_ms, s.chan_prefix, s.owner, lid,
                                                   0, None, 0, s.vbmax, 0)),
            Call("convert", ks, codec.convert_args(s.rejoin_ms, s.chan_prefix, s.owner, lid,
                                                   Mode.NL, 0, 1, 5_000, None, 0, s.vbmax, 0)),
            Call("cancel", pk, codec.cancel_args(s.rejoin_ms, s.chan_prefix, s.owner, lid,
                                                 "deadlock", True)),
            Call("yield", ks, codec.yield_args(s.rejoin_ms, s.chan_prefix, s.owner, lid)),
            Call("renew", ks, codec.renew_args(s.rejoin_ms, s.chan_prefix, s.owner, 5_000,
                                               [(lid, 0)])),
        ]
        for call in calls:
            results = b._broadcast([(i, call) for i in range(len(urls))])
            assert all(isinstance(r, NotOwner) for r in results.values()), (call.name, results)

        # 2. the Engine API with b's owner and a's id
        for c in clients:
            e = Engine(c, "iso")
            with pytest.raises(NotOwner):
                e.release(key, b.owner, lid)
            with pytest.raises(NotOwner):
                e.convert(key, b.owner, lid, Mode.NL, ticket=1, lease_ms=5_000)

        # 3. a request reusing a's id (G12: the same id from another owner is an error)
        lk = b._core.new_lock("res", Mode.NL, lock_id=lid)
        results = b._broadcast([(i, b._core.request_cmd(lk)) for i in range(len(urls))])
        b._core.forget(lk)
        assert all(isinstance(r, NotOwner) for r in results.values()), results

        assert [snapshot(c) for c in clients] == before
        assert held.valid and held.mode == Mode.EX
        held.release()
        for c in clients:
            c.close()


# ----------------------------------------------------------------- namespaces


def test_namespaces_are_independent(fresh3) -> None:
    urls = fresh3.urls
    with DLM(urls, "a") as da, DLM(urls, "b") as db, DLM(urls, "b") as db2:
        keep = da.lock("orders", Mode.NL, timeout=5)  # keeps a's value block alive (G9)
        la = da.lock("orders", Mode.EX, timeout=5)
        lb = db.lock("orders", Mode.EX, timeout=5)  # the same name: another lock
        assert la.valid and lb.valid
        la.value = b"in a"
        la.release()
        with pytest.raises(LockTimeout):  # b's EX is still held against another b client
            db2.lock("orders", Mode.EX, timeout=0.3)
        lb.convert(Mode.PR)  # b's lock saw neither a's value nor its release
        assert lb.value is None and lb.valid
        la2 = da.lock("orders", Mode.EX, timeout=5)
        assert la2.value == b"in a"
        keep.release()

        runner = CliRunner()

        def ls(ns: str) -> list[dict]:
            r = runner.invoke(cli, ["ls", "--json", "--namespace", ns, "--redis", ",".join(urls)],
                              catch_exceptions=False)
            assert r.exit_code == 0, r.output
            doc = json.loads(r.stdout)
            return doc["resources"] if isinstance(doc, dict) else doc

        held_a = ls("a")
        held_b = ls("b")
        ids_a = {lk["lock_id"] for r in held_a for q in ("granted", "converting", "waiting")
                 for lk in r.get(q, [])}
        ids_b = {lk["lock_id"] for r in held_b for q in ("granted", "converting", "waiting")
                 for lk in r.get(q, [])}
        assert ids_a == {la2.id} and ids_b == {lb.id}, (held_a, held_b)
        assert ls("c") == []
        la2.release()
        lb.release()
