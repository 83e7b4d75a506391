"""Configuration mistakes a user makes, and what each must never do: give two clients the
same EX lock at once.

* one server reached by two URLs (the same URL twice, localhost and 127.0.0.1, two databases
  of one server) would cast two votes: refused at first contact (DuplicateInstance), and an
  instance first reached later never gives a second vote (its epoch is another's);
* TLS and plain URLs mixed: refused before any connection (MixedTransport);
* a URL that reaches no Redis: the client works while a quorum answers, and a call that
  cannot reach one names the instance;
* a maxmemory-policy that may evict keys: refused at first contact (EvictionPolicy), and with
  the override (volatile-* only) eviction never takes a lock key;
* clients of different leases after instances lost their data (FLUSHALL): the rejoin wait
  an instance stores (E1) is the one a re-created epoch waits, so the short-lease client is
  never granted while the long lease still runs; a lease above the stored wait is refused.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from click.testing import CliRunner
from redis_harness import Instances, RedisServer, free_port
from redlockdlm_cli.main import cli

from redlockdlm import DLM, Mode
from redlockdlm.aio import AsyncDLM
from redlockdlm.engine.instance import Engine
from redlockdlm.errors import (
    DuplicateInstance,
    EvictionPolicy,
    LeaseTooLong,
    LockTimeout,
    MixedTransport,
    NotQueued,
    QuorumUnavailable,
)

pytestmark = pytest.mark.timeout(60)

NS = "cfg"


def fresh(inst: Instances | list[RedisServer], rejoin_ms: int | None = None) -> None:
    for s in inst:
        Engine(s.client(), NS).init_fresh(rejoin_ms)


def make(kind: str, urls: list[str], **kw):
    """A DLM, or an AsyncDLM after its first contact (run in a private loop)."""
    if kind == "sync":
        return DLM(urls, NS, **kw)

    async def go():
        d = AsyncDLM(urls, NS, **kw)
        try:
            await d.__aenter__()
        finally:
            await d.close()
        return d
    return asyncio.run(go())


# ----------------------------------------------------------------- one server, two URLs


@pytest.fixture(scope="module")
def two() -> Instances:
    with Instances(2) as inst:
        fresh(inst)
        yield inst


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("shape", ["same-url", "localhost", "other-db"])
def test_one_server_two_urls_refused(two: Instances, kind: str, shape: str) -> None:
    a, b = two[0], two[1]
    second = {"same-url": a.url, "localhost": f"redis://localhost:{a.port}",
              "other-db": f"redis://127.0.0.1:{a.port}/1"}[shape]
    with pytest.raises(DuplicateInstance) as ei:
        make(kind, [a.url, second, b.url], connect_timeout=2.0)
    assert str(a.port) in str(ei.value)


def test_duplicate_first_reached_later_never_votes_twice(two: Instances) -> None:
    """The server behind two URLs is paused at construction (not identified); once it
    answers, with the only other instance gone, its two URLs must not make a quorum."""
    a, b = two[0], two[1]
    a.pause()
    try:
        d = DLM([a.url, a.url, b.url], NS, socket_timeout=0.3, connect_timeout=0.3)
    finally:
        a.resume()
    try:
        b.pause()
        with pytest.raises((QuorumUnavailable, NotQueued)):
            d.lock("r", Mode.EX, noqueue=True)
    finally:
        b.resume()
        d.close()


# ----------------------------------------------------------------- transports, dead URLs


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_tls_and_plain_mixed_refused(kind: str) -> None:
    urls = ["rediss://127.0.0.1:7", "redis://127.0.0.1:8", "redis://127.0.0.1:9"]
    with pytest.raises(MixedTransport) as ei:
        make(kind, urls)
    assert "rediss://" in str(ei.value) and "redis://127.0.0.1:8" in str(ei.value)


def test_url_reaching_no_redis(two: Instances) -> None:
    dead1, dead2 = f"redis://127.0.0.1:{free_port()}", f"redis://127.0.0.1:{free_port()}"
    with DLM([two[0].url, two[1].url, dead1], NS, socket_timeout=0.3,
             connect_timeout=0.3) as d:
        with d.lock("r", Mode.EX, timeout=5):
            pass  # a quorum answers: it works
    with DLM([two[0].url, dead1, dead2], NS, socket_timeout=0.3, connect_timeout=0.3) as d:
        with pytest.raises(QuorumUnavailable) as ei:
            d.lock("r", Mode.EX, timeout=5)
        assert dead1 in str(ei.value) and dead2 in str(ei.value)


def test_status_reports_a_duplicate_as_an_error(two: Instances) -> None:
    a, b = two[0], two[1]
    r = CliRunner().invoke(cli, ["status", "--json"], env={
        "DLM_NAMESPACE": NS, "DLM_REDIS": ",".join([a.url, f"redis://localhost:{a.port}",
                                                    b.url])})
    assert r.exit_code != 0, r.output
    doc = json.loads(r.stdout)
    assert any("same Redis server" in p for p in doc["problems"])


# ----------------------------------------------------------------- eviction (defect 5)


def evicting(policy: str) -> list[str]:
    return ["--maxmemory", "4mb", "--maxmemory-policy", policy]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("policy,override,refused", [
    ("allkeys-lru", False, True), ("allkeys-lru", True, True),
    ("volatile-lru", False, True), ("volatile-lru", True, False),
])
def test_eviction_policy_refused(kind: str, policy: str, override: bool,
                                 refused: bool) -> None:
    with Instances(2) as good, RedisServer(evicting(policy)) as bad:
        fresh([*good, bad])
        urls = [good[0].url, bad.url, good[1].url]
        if refused:
            with pytest.raises(EvictionPolicy) as ei:
                make(kind, urls, allow_eviction=override)
            assert ei.value.policy == policy and str(bad.port) in str(ei.value)
        else:
            make(kind, urls, allow_eviction=override)
        r = CliRunner().invoke(cli, ["status"], env={"DLM_NAMESPACE": NS,
                                                     "DLM_REDIS": ",".join(urls)})
        assert r.exit_code != 0 and policy in r.output, r.output


def test_volatile_eviction_never_takes_a_lock() -> None:
    """volatile-lru and a tiny maxmemory on two of three instances, memory filled with other
    keys that have a TTL: a holder's EX locks all stay; nobody else is granted one."""
    with Instances(2, evicting("volatile-lru")) as small, RedisServer() as big:
        servers = [small[0], small[1], big]
        fresh(servers)
        urls = [s.url for s in servers]
        names = [f"res{i}" for i in range(40)]
        with DLM(urls, NS, lease_ms=20_000, allow_eviction=True) as holder, \
                DLM(urls, NS, lease_ms=20_000, allow_eviction=True) as other:
            held = [holder.lock(n, Mode.EX, timeout=5) for n in names]
            for s in small:
                c = s.client()
                pipe = c.pipeline(transaction=False)
                for k in range(6000):  # ~6 MB of volatile keys into 4 MB
                    pipe.set(f"filler:{k}", b"x" * 1000, px=600_000)
                    if k % 500 == 499:
                        pipe.execute()
                pipe.execute()
                assert int(c.info("stats")["evicted_keys"]) > 0
            for n in names:
                with pytest.raises(NotQueued):
                    other.lock(n, Mode.EX, noqueue=True)
            assert all(lk.valid for lk in held)


# ----------------------------------------------------------------- rejoin waits (defect 6)

LONG, SHORT = 4000, 400


@pytest.mark.parametrize("late", [False, True], ids=["short-client-before-flush",
                                                      "short-client-after-flush"])
def test_mixed_leases_after_flush_never_two_holders(late: bool) -> None:
    """Instances store a rejoin wait of the longest lease (the operator's `dlm rejoin-wait`).
    A holder with a long lease; two of three instances lose their data (FLUSHALL); a client
    whose own rejoin_ms is short re-creates their epochs. It must wait the stored rejoin, not
    its own: it is never granted EX while the holder still says valid."""
    with Instances(3) as inst:
        fresh(inst, rejoin_ms=LONG)
        urls = inst.urls
        short = None if late else DLM(urls, NS, lease_ms=SHORT, rejoin_ms=SHORT)
        holder = DLM(urls, NS, lease_ms=LONG)
        try:
            hl = holder.lock("r", Mode.EX, timeout=5)
            inst[0].flushall()
            inst[1].flushall()
            if short is None:
                short = DLM(urls, NS, lease_ms=SHORT, rejoin_ms=SHORT)
            end = time.monotonic() + LONG / 1000 + 1.0
            while time.monotonic() < end:
                try:
                    got = short.lock("r", Mode.EX, timeout=0.5)
                except (LockTimeout, QuorumUnavailable):
                    time.sleep(0.05)
                    continue
                assert not hl.valid, "two EX holders: the short client after a flush"
                got.release()
                break
        finally:
            holder.close()
            if short is not None:
                short.close()


def test_lease_longer_than_stored_rejoin_refused() -> None:
    with Instances(3) as inst:
        fresh(inst, rejoin_ms=1000)
        with pytest.raises(LeaseTooLong) as ei:
            DLM(inst.urls, NS, lease_ms=2000)
        assert (ei.value.lease_ms, ei.value.rejoin_ms) == (2000, 1000)
        assert "2000" in str(ei.value) and "1000" in str(ei.value) and ei.value.instance
        with DLM(inst.urls, NS, lease_ms=1000) as d:
            with pytest.raises(LeaseTooLong):
                d.lock("r", Mode.EX, lease_ms=1500)
        r = CliRunner().invoke(cli, ["rejoin-wait", "2000"], env={
            "DLM_NAMESPACE": NS, "DLM_REDIS": ",".join(inst.urls)})
        assert r.exit_code == 0, r.output
        with DLM(inst.urls, NS, lease_ms=2000) as d:
            d.lock("r", Mode.EX, timeout=5).release()


def test_sweep_purges_abandoned_resources(two: Instances) -> None:
    """Lock keys have no TTL: a holder that dies leaves its resource until a call touches
    it; `dlm sweep` purges it (a tombstone with a TTL is left, G9)."""
    s = two[0]
    e = Engine(s.client(), NS)
    k = e.key("abandoned")
    e.request(k, "dead", "l1", Mode.EX, ticket=1, lease_ms=200)
    assert s.client().pttl(k) == -1  # no TTL while it holds a lock
    time.sleep(0.3)
    r = CliRunner().invoke(cli, ["sweep", "--json"], env={"DLM_NAMESPACE": NS,
                                                          "DLM_REDIS": s.url})
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["purged"] == 1
    assert 0 < s.client().pttl(k) <= 60_000
    assert e.inspect([k])[1][0] is None or not e.inspect([k])[1][0].locks
