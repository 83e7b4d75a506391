"""The redis-server test harness itself works."""

from __future__ import annotations

import os

import pytest
import redis
from redis_harness import (
    HOST,
    Instances,
    RedisServer,
    find_redis_server,
    free_port,
    no_retry,
)


def test_find_redis_server_and_free_port() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)
    port = free_port()
    assert 0 < port < 65536


def test_start_ping_and_attributes(redis_server: RedisServer) -> None:
    assert redis_server.running
    assert redis_server.url == f"redis://{HOST}:{redis_server.port}"
    assert redis_server.pid == redis_server.proc.pid
    c = redis_server.client()
    assert c.ping() is True
    c.set(b"k", b"v")
    assert c.get(b"k") == b"v"  # bytes, not str
    # The server binds loopback only and really is a separate process.
    info = c.info("server")
    assert info["process_id"] == redis_server.pid
    assert c.config_get("bind")["bind"] == HOST


def test_pause_and_resume(redis_server: RedisServer) -> None:
    c = redis_server.client(socket_timeout=0.5, socket_connect_timeout=0.5)
    c.set(b"k", b"v")
    redis_server.pause()
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            c.get(b"k")
    finally:
        redis_server.resume()
    fresh = redis_server.client(socket_timeout=2)
    assert fresh.get(b"k") == b"v"
    assert c.get(b"k") == b"v"  # the old client reconnects after the timeout


def test_restart_empty_loses_keys(redis_server: RedisServer) -> None:
    port, old_pid = redis_server.port, redis_server.pid
    redis_server.client().set(b"k", b"v")
    redis_server.restart(empty=True)
    assert redis_server.port == port
    assert redis_server.pid != old_pid
    assert redis_server.client().get(b"k") is None


def test_restart_with_appendonly_keeps_keys() -> None:
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as srv:
        srv.client().set(b"k", b"v")
        srv.restart(empty=False)
        assert srv.client().get(b"k") == b"v"
        srv.restart(empty=True)
        assert srv.client().get(b"k") is None


def test_kill_then_start_again(redis_server: RedisServer) -> None:
    c = redis_server.client(socket_timeout=1, socket_connect_timeout=1)
    assert c.ping()
    redis_server.kill()
    assert not redis_server.running
    assert redis_server.proc.returncode == -9
    with pytest.raises(redis.exceptions.ConnectionError):
        c.ping()
    redis_server.start()
    assert c.ping()


def test_stop_is_idempotent_and_cleans_up() -> None:
    srv = RedisServer()
    base = srv.base_dir
    assert base.exists()
    srv.stop()
    assert not srv.running
    assert not base.exists()
    srv.stop()


def test_requirepass_is_passed_to_clients() -> None:
    with RedisServer(["--requirepass", "s3cret"]) as srv:
        assert srv.client().ping()
        anon = redis.Redis(host=HOST, port=srv.port, socket_timeout=2, retry=no_retry())
        with pytest.raises(redis.exceptions.AuthenticationError):
            anon.ping()
        anon.close()


def test_bind_override_is_refused() -> None:
    with pytest.raises(ValueError):
        RedisServer(["--bind", "0.0.0.0"], start=False)


def test_instances_are_independent(make_instances) -> None:
    inst: Instances = make_instances(3)
    assert len(inst.urls) == 3 and len(set(inst.urls)) == 3
    a, b, _ = inst.clients()
    a.set(b"k", b"1")
    assert b.get(b"k") is None
    inst[0].pause()
    inst.reset()  # resumes and flushes
    assert a.get(b"k") is None


def test_cluster3_fixture_heals_after_faults(cluster3: Instances) -> None:
    cluster3[0].kill()
    cluster3[1].pause()
    cluster3.reset()
    assert all(c.ping() for c in cluster3.clients())


def test_r_fixture_is_flushed(r: redis.Redis) -> None:
    assert r.dbsize() == 0
    r.set(b"leftover", b"x")


def test_r_fixture_is_flushed_again(r: redis.Redis) -> None:
    assert r.dbsize() == 0


def test_cluster_member_spreads_slots_and_restarts_a_node_empty(make_cluster) -> None:
    rc = make_cluster(3)
    c = rc.client()
    keys = [b"k%d" % i for i in range(30)]
    for k in keys:
        c.set(k, b"v")
    served = {rc.node_of_slot(c.keyslot(k)) for k in keys}
    assert served == {0, 1, 2}  # three primaries, each with a third of the slots
    victim = rc.node_of_slot(c.keyslot(b"k0"))
    pid = rc.nodes[victim].pid
    rc.restart_node_empty(victim)
    assert rc.nodes[victim].pid != pid
    c2 = rc.client()
    for k in keys:  # the restarted node serves its slots again, with nothing in them
        want = None if rc.node_of_slot(c2.keyslot(k)) == victim else b"v"
        assert c2.get(k) == want
    rc.stop()
    assert not any(n.running for n in rc.nodes)
