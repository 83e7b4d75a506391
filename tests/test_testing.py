"""redlockdlm.testing: a user's unit tests run the README's usage on fake instances in the
test process, with no redis-server (issue 14). Written as a user would: the plugin's
fixtures (`dlm_fake`, `dlm_fake_cluster`, `async_dlm_fake`) and `fake_dlm`. No test here
starts a redis-server; each is bounded by its timeout mark."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from redlockdlm import DLM, Mode
from redlockdlm.errors import (
    Deadlock,
    FakesUnavailable,
    InvalidArgument,
    LockTimeout,
    NotQueued,
)
from redlockdlm.testing import FakeCluster, fake_async_dlm, fake_dlm

pytestmark = pytest.mark.timeout(60)


def test_lock_and_release_with_the_fixture(dlm_fake):
    with dlm_fake.lock("jobs/nightly", Mode.EX) as lk:
        assert lk.mode == Mode.EX
        with pytest.raises(NotQueued):  # the same owner asks again, without queueing
            dlm_fake.lock("jobs/nightly", Mode.EX, noqueue=True)
    again = dlm_fake.lock("jobs/nightly", Mode.EX, noqueue=True)  # released: free again
    again.release()


def test_two_clients_contend_and_time_out(dlm_fake, dlm_fake_cluster):
    with DLM(dlm_fake_cluster.urls, "test") as other:
        held = dlm_fake.lock("db/orders", Mode.EX)
        with pytest.raises(LockTimeout):
            other.lock("db/orders", Mode.PR, timeout=0.3)
        shared = other.lock("db/orders", Mode.NL)  # NL is compatible with everything
        held.release()
        read = other.lock("db/orders", Mode.PR, timeout=2.0)
        assert read.mode == Mode.PR
        read.release()
        shared.release()


def test_hierarchy_value_block_and_conversion(dlm_fake):
    """The README's 20 lines: a child under a CW parent, its value block written on
    release and read back by the next holder (an NL lock keeps the resource, and so its
    value block, between them), a conversion of the parent."""
    with dlm_fake.lock("db/orders", Mode.CW) as table:
        keep = table.lock("row:42", Mode.NL)
        with table.lock("row:42", Mode.EX, timeout=2.0) as row:
            assert row.value in (None, b"")
            row.value = b"1"
        with table.lock("row:42", Mode.EX, timeout=2.0) as row:
            assert row.value == b"1"
            row.value = str(int(row.value) + 1).encode()
        table.convert(Mode.PR)
        assert table.mode == Mode.PR
        with table.lock("row:42", Mode.PR) as row:
            assert row.value == b"2"
        keep.release()


def test_blocking_notification_reaches_the_holder(dlm_fake, dlm_fake_cluster):
    blocked = threading.Event()
    seen: list[Mode] = []

    def on_blocking(mode: Mode) -> None:
        seen.append(mode)
        blocked.set()

    cache = dlm_fake.lock("cache/users", Mode.PR, on_blocking=on_blocking)
    with DLM(dlm_fake_cluster.urls, "test") as writer:
        req = writer.enqueue("cache/users", Mode.EX)
        assert blocked.wait(5.0), "no blocking notification"
        assert seen == [Mode.EX]
        cache.release()
        assert req.wait(timeout=5.0).mode == Mode.EX
        req.lock.release()


def test_conversion_deadlock_between_two_clients(dlm_fake, dlm_fake_cluster):
    """Two PR holders both converting to EX: the second conversion fails with Deadlock and
    its lock stays PR; the first is granted once the second lets go."""
    with DLM(dlm_fake_cluster.urls, "test") as other:
        a = dlm_fake.lock("accounts", Mode.PR)
        b = other.lock("accounts", Mode.PR)
        granted: list[object] = []
        t = threading.Thread(target=lambda: granted.append(a.convert(Mode.EX, timeout=5.0)))
        t.start()
        try:
            with pytest.raises(Deadlock):
                for _ in range(50):  # until a's conversion is queued on the instances
                    try:
                        b.convert(Mode.EX, noqueue=True)
                    except NotQueued:
                        threading.Event().wait(0.02)
                        continue
                    break
                b.convert(Mode.EX, timeout=5.0)
            assert b.mode == Mode.PR
            b.release()
        finally:
            t.join(10)
        assert a.mode == Mode.EX
        a.release()


def test_fake_dlm_context_manager_and_several_clients():
    with fake_dlm(1, "solo", lease_ms=2_000) as dlm:
        m = dlm.mutex("jobs/once")
        assert m.acquire(timeout=1.0)
        assert m.locked()
        m.release()
    with FakeCluster(5) as cluster:
        assert len(set(cluster.urls)) == 5
        with DLM(cluster.urls, "ns") as one, DLM(cluster.urls, "ns") as two:
            lk = one.lock("r", Mode.EX)
            with pytest.raises(NotQueued):
                two.lock("r", Mode.EX, noqueue=True)
            lk.release()
            two.lock("r", Mode.EX, noqueue=True).release()


def test_async_dlm_on_the_fixture_and_fake_async_dlm(async_dlm_fake):
    async def main() -> None:
        async with async_dlm_fake() as one, async_dlm_fake() as two:
            lk = await one.lock("jobs/nightly", Mode.EX)
            with pytest.raises(LockTimeout):
                await two.lock("jobs/nightly", Mode.EX, timeout=0.3)
            await lk.release()
            async with await two.lock("jobs/nightly", Mode.PW, timeout=2.0) as got:
                got.value = b"done"
        async with fake_async_dlm(3, "solo") as dlm:
            async with await dlm.lock("x", Mode.EX) as lk:
                assert lk.value in (None, b"")

    asyncio.run(main())


def test_lease_longer_than_the_stored_rejoin_wait_is_refused():
    """The fakes are marked fresh with a rejoin wait (E1), and enforce it as real ones do."""
    from redlockdlm.errors import LeaseTooLong

    with FakeCluster(1, rejoin_ms=1_000) as cluster:
        with pytest.raises(LeaseTooLong):
            DLM(cluster.urls, "ns", lease_ms=5_000)


def test_bad_cluster_size_is_a_typed_error():
    with pytest.raises(InvalidArgument):
        FakeCluster(2)
    with pytest.raises(InvalidArgument):
        FakeCluster(0)


def test_without_fakeredis_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fakeredis", None)  # as if not installed
    with pytest.raises(FakesUnavailable, match="redlockdlm\\[testing\\]"):
        FakeCluster(1).start()


@pytest.mark.timeout(90)
def test_an_example_runs_on_fake_instances():
    """A user-facing example, unchanged, against fake instances served by this process."""
    root = Path(__file__).parents[1]
    with FakeCluster(3) as cluster:
        env = dict(os.environ, DLM_REDIS=",".join(cluster.urls))
        proc = subprocess.run([sys.executable, str(root / "examples" / "hierarchical_db.py")],
                              env=env, capture_output=True, text=True, timeout=60, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("blob", [b"\xc1garbage", b"\x93\x01\x02\x03"])
def test_a_damaged_resource_key_is_corrupt_on_the_fakes_too(dlm_fake, dlm_fake_cluster, blob):
    """Bytes that are not MessagePack, and MessagePack that is not a resource (an array of
    three numbers), are both refused by every instance's scripts as corrupt (rule K1,
    DLM_CORRUPT; the quorum client names the key), and nothing is written over them."""
    from redlockdlm.engine.keys import check_namespace, resource_key
    from redlockdlm.errors import QuorumUnavailable

    key = resource_key(check_namespace("test"), [b"damaged"])
    raws = [inst.client() for inst in dlm_fake_cluster.instances]
    try:
        for raw in raws:
            raw.set(key, blob)
        with pytest.raises(QuorumUnavailable) as ei:
            dlm_fake.lock("damaged", Mode.EX, timeout=1.0)
        assert f"3 reported resource key {key.decode()} corrupt" in str(ei.value)
        assert [raw.get(key) for raw in raws] == [blob] * 3
    finally:
        for raw in raws:
            raw.close()


def test_fake_instances_give_functions_cmsgpack_in_the_messagepack_format():
    """Any function loaded on a fake instance has `cmsgpack`, writing the MessagePack
    formats of the specification (fixarray, fixmap, fixstr, negative fixint, uint16,
    float64, true) as Redis's cmsgpack chooses them (a 1..n table is an array, the empty
    table too), and reading them back."""
    lib = (b"#!lua name=probe\n"
           b"redis.register_function('probe_pack', function(keys, args) return {"
           b"cmsgpack.pack({1, 2, 3}), cmsgpack.pack({a = 1}), cmsgpack.pack(-1),"
           b"cmsgpack.pack(300), cmsgpack.pack(1.5), cmsgpack.pack('x'),"
           b"cmsgpack.pack(true), cmsgpack.pack({}), cmsgpack.pack(1, 'x')} end)\n"
           b"redis.register_function('probe_unpack', function(keys, args)"
           b" local t = cmsgpack.unpack(args[1]) return {#t, t[1], t[2], t[3].k} end)\n")
    with FakeCluster(1) as cluster:
        raw = cluster.instances[0].client()
        try:
            raw.function_load(lib)
            assert raw.fcall("probe_pack", 0) == [
                b"\x93\x01\x02\x03", b"\x81\xa1a\x01", b"\xff", b"\xcd\x01\x2c",
                b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00", b"\xa1x", b"\xc3", b"\x90",
                b"\x01\xa1x"]
            assert raw.fcall("probe_unpack", 0, b"\x93\xcd\x01\x2c\xa1y\x81\xa1k\xd0\x85") == [
                3, 300, b"y", -123]
        finally:
            raw.close()
