"""Least privilege: the rule `dlm acl` prints is enough for everything redlockdlm does, and
each permission in it is needed (docs/operations.md, "Access control").

On three real redis-servers the default user creates a user with exactly the rule `dlm acl`
prints; then, as that user only: lock, convert, value block, release; contention with
enqueue and wait (events: SUBSCRIBE, PUBLISH); lease renewal; a child lock; the FUNCTION
LOAD path after FUNCTION FLUSH; the detector resolving a deadlock; `dlm status`, `ls`,
`show`, `graph`, `break`. Afterwards ACL LOG is empty: nothing was refused, not even a
command whose refusal a client would ignore. A user lacking one permission fails with an
error naming it; a wrong password fails at once with a typed error saying so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner, Result
from redis_harness import Instances
from redlockdlm_cli.main import cli

from redlockdlm import DLM, Mode
from redlockdlm.acl import COMMANDS, rule_args
from redlockdlm.aio import AsyncDLM
from redlockdlm.engine.instance import Engine
from redlockdlm.engine.modes import Status
from redlockdlm.engine.scripts import library
from redlockdlm.errors import DLMError, QuorumUnavailable

pytestmark = pytest.mark.timeout(60)

NS = "acl"
USER = "dlmuser"


# ----------------------------------------------------------------- helpers


def dlm_cli(*args: str, urls: list[str] | None = None, input: str | None = None) -> Result:
    env = {"DLM_NAMESPACE": NS, "DLM_REDIS": ",".join(urls) if urls else None}
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


def the_rule(*extra: str) -> tuple[list[str], str]:
    """The ACL SETUSER arguments `dlm acl` prints (through the CLI), and the password."""
    r = dlm_cli("acl", "--user", USER, "--json", *extra)
    assert r.exit_code == 0, r.output
    args = json.loads(r.stdout)["acl_setuser_args"]
    password = next(a[1:] for a in args if a.startswith(">"))
    return args, password


def admin(inst: Instances) -> list[redis.Redis]:
    return [s.client() for s in inst]


def set_user(inst: Instances, args: list[str]) -> None:
    for c in admin(inst):
        assert c.execute_command("ACL", "SETUSER", *args) in (b"OK", "OK", True)
        c.execute_command("ACL", "LOG", "RESET")


def user_urls(inst: Instances, password: str, user: str = USER) -> list[str]:
    return [f"redis://{user}:{password}@127.0.0.1:{s.port}" for s in inst]


def user_engines(inst: Instances, password: str, user: str = USER) -> list[Engine]:
    return [Engine(s.client(username=user, password=password), NS) for s in inst]


def acl_log(inst: Instances) -> list:
    return [e for c in admin(inst) for e in c.execute_command("ACL", "LOG")]


def without(args: list[str], cmd: str) -> list[str]:
    assert f"+{cmd}" in args
    return [a for a in args if a != f"+{cmd}"]


@pytest.fixture
def acl3(cluster3: Instances) -> Iterator[Instances]:
    yield cluster3
    for c in admin(cluster3):
        c.execute_command("ACL", "DELUSER", USER)
        c.execute_command("FUNCTION", "FLUSH")


# ----------------------------------------------------------------- the whole session


def test_the_printed_rule_is_enough_for_everything(acl3: Instances) -> None:
    args, password = the_rule()
    set_user(acl3, args)
    urls = user_urls(acl3, password)
    engines = user_engines(acl3, password)
    for e in engines:  # E1 as the user: the init script (HEXISTS, HSET, TIME, HMGET)
        e.init_fresh()

    blocked: list[Mode] = []
    with DLM(urls, NS, lease_ms=1_000) as a, DLM(urls, NS, lease_ms=1_000) as b:
        # lock, value block, down-conversion writing it
        lk = a.lock("orders", Mode.EX, timeout=5, on_blocking=blocked.append)
        lk.value = b"v1"
        lk.convert(Mode.PW)
        lk.convert(Mode.PR)
        # contention: b waits, a is told (PUBLISH to a's channel, a SUBSCRIBEd)
        req = b.enqueue("orders", Mode.EX, timeout=10)
        deadline = time.monotonic() + 5
        while not blocked and time.monotonic() < deadline:
            time.sleep(0.02)
        assert blocked == [Mode.EX]
        assert any(w for e in engines for w in e.waiters())  # ZADD to the waiter index
        # renewal: leases of 1 s, kept for 1.5 s by the renew script
        time.sleep(1.5)
        assert lk.valid and not req.done
        lk.release()
        got = req.wait(5)  # granted by the release, woken by the grant event
        assert got.value == b"v1" and got.valid
        got.release()

        # a child lock, released with its parent
        parent = b.lock("db", Mode.PR, timeout=5)
        child = parent.lock("row:1", Mode.EX, timeout=5)
        assert child.valid
        parent.release(subtree=True)

        # the FUNCTION LOAD path: an instance that lost the library gets it back
        for c in admin(acl3):
            c.execute_command("FUNCTION", "FLUSH")
        again = a.lock("orders", Mode.EX, timeout=5)
        assert again.valid
        for c in admin(acl3):
            libs = [lib[b"library_name"] for lib in c.execute_command("FUNCTION", "LIST")]
            assert libs == [library().name.encode()]
        again.release()

    # the detector (a cycle between two owners) and every operator command, as the user
    for e in engines:
        ka, kb = e.key("R1"), e.key("R2")
        kw = {"lease_ms": 30_000}
        assert e.request(ka, "own-a", "a1", Mode.EX, ticket=1, **kw).status == Status.GRANTED
        assert e.request(kb, "own-b", "b1", Mode.EX, ticket=2, **kw).status == Status.GRANTED
        assert e.request(kb, "own-a", "a2", Mode.EX, ticket=3, **kw).status == Status.QUEUED
        assert e.request(ka, "own-b", "b2", Mode.EX, ticket=4, **kw).status == Status.QUEUED
    r = dlm_cli("graph", "--json", urls=urls)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cycles"], r.stdout
    r = dlm_cli("detector", "--rounds", "6", "--interval", "0.05", urls=urls)
    assert r.exit_code == 0, r.output
    queues = {lk.lock_id for e in engines for v in e.inspect([e.key("R1"), e.key("R2")])[1]
              if v for lk in v.locks}
    assert "b2" not in queues, queues  # the youngest waiter of the cycle was cancelled

    for cmd in (["status"], ["status", "--json"], ["ls"], ["ls", "--json"],
                ["show", "R1"], ["show", "R1", "--json"], ["graph"]):
        r = dlm_cli(*cmd, urls=urls)
        assert r.exit_code == 0, (cmd, r.output)
    r = dlm_cli("break", "R1", "--lock", "a1", "--yes", urls=urls)
    assert r.exit_code == 0, r.output
    assert all(e.inspect([e.key("R1")])[1][0] is None
               or "a1" not in {lk.lock_id for lk in e.inspect([e.key("R1")])[1][0].locks}
               for e in engines)

    assert acl_log(acl3) == []  # nothing refused, not even an ignored command


def test_the_asyncio_client_too(acl3: Instances) -> None:
    args, password = the_rule()
    set_user(acl3, args)
    for e in user_engines(acl3, password):
        e.init_fresh()
    urls = user_urls(acl3, password)

    async def session() -> None:
        async with AsyncDLM(urls, NS, lease_ms=1_000) as a, AsyncDLM(urls, NS) as b:
            lk = await a.lock("orders", Mode.EX, timeout=5)
            lk.value = b"async"
            req = await b.enqueue("orders", Mode.PR, timeout=10)
            await asyncio.sleep(1.5)  # renewed meanwhile
            assert lk.valid and not req.done
            await lk.release()
            got = await req.wait(5)
            assert got.value == b"async"
            await got.release()

    asyncio.run(session())
    assert acl_log(acl3) == []


def test_without_function_load_the_clients_use_eval(acl3: Instances) -> None:
    """`dlm acl --no-function-load`: nobody may replace the library; after FUNCTION FLUSH
    the clients fall back to EVAL of each script and everything still works."""
    args, password = the_rule("--no-function-load")
    assert "+function|load" not in args and "+eval" in args
    set_user(acl3, args)
    for c in admin(acl3):
        c.execute_command("FUNCTION", "FLUSH")
    engines = user_engines(acl3, password)
    for e in engines:
        e.init_fresh()
    with DLM(user_urls(acl3, password), NS) as a:
        lk = a.lock("orders", Mode.EX, timeout=5)
        lk.release()
    for c in admin(acl3):
        assert c.execute_command("FUNCTION", "LIST") == []  # nothing was loaded
    assert acl_log(acl3) != []  # the refused FUNCTION LOADs (then EVAL)


def test_per_namespace_rule_keeps_to_its_namespace(acl3: Instances) -> None:
    args, password = the_rule("--namespace", NS)
    set_user(acl3, args)
    urls = user_urls(acl3, password)
    for e in user_engines(acl3, password):
        e.init_fresh()
    with DLM(urls, NS) as d:
        d.lock("orders", Mode.EX, timeout=5).release()
    with DLM(urls, "other") as d, pytest.raises(QuorumUnavailable) as ei:
        d.lock("orders", Mode.EX, timeout=5)
    assert "ACL" in str(ei.value)
    r = dlm_cli("ls", "--namespace", NS, urls=urls)
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------- one permission missing


def test_every_command_of_the_rule_is_used() -> None:
    """The rule is the library's own list, each command once, and nothing broader."""
    args = rule_args(USER, "pw")
    cmds = [a[1:] for a in args if a.startswith("+")]
    assert cmds == list(COMMANDS) and len(set(cmds)) == len(cmds)
    assert "-@all" in args and "allcommands" not in args and "~*" not in args


@pytest.mark.parametrize("missing, expect", [
    ("fcall", "'fcall'"),
    ("time", "DLM_NOPERM"),
    ("get", "DLM_NOPERM"),
])
def test_a_missing_script_permission_is_a_clear_error(acl3: Instances, missing: str,
                                                      expect: str) -> None:
    args, password = the_rule()
    set_user(acl3, args)
    for e in user_engines(acl3, password):
        e.init_fresh()
    set_user(acl3, without(args, missing))
    t0 = time.monotonic()
    with DLM(user_urls(acl3, password), NS) as d, pytest.raises(QuorumUnavailable) as ei:
        d.lock("orders", Mode.EX, timeout=5)
    assert time.monotonic() - t0 < 3
    msg = str(ei.value)
    assert expect in msg and "ACL" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("missing", ["publish", "zadd"])
def test_a_refused_write_leaves_nothing_behind(acl3: Instances, missing: str) -> None:
    """K3: the waiter's request needs ZADD (the index) and PUBLISH (the blocking event to a
    holder that asked for them, N1); refused, it fails with DLM_NOPERM and writes nothing,
    not even the resource."""
    args, password = the_rule()
    set_user(acl3, args)
    engines = user_engines(acl3, password)
    for e in engines:
        e.init_fresh()
    urls = user_urls(acl3, password)
    with DLM(urls, NS) as a, DLM(urls, NS) as b:
        held = a.lock("orders", Mode.EX, timeout=5, on_blocking=lambda mode: None)
        before = [c.get(engines[0].key("orders")) for c in admin(acl3)]
        set_user(acl3, without(args, missing))
        with pytest.raises(QuorumUnavailable) as ei:
            b.lock("orders", Mode.EX, timeout=5)
        assert f"refuses {missing.upper()}" in str(ei.value), str(ei.value)
        assert [c.get(engines[0].key("orders")) for c in admin(acl3)] == before
        assert all(e.waiters() == [] for e in engines)
        set_user(acl3, args)
        held.release()


def test_without_subscribe_locks_still_work_and_the_cause_is_logged(
        acl3: Instances, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # (`dlm detector` run in this process may have set up the logger without propagation)
    monkeypatch.setattr(logging.getLogger("redlockdlm"), "propagate", True)
    args, password = the_rule()
    set_user(acl3, without(args, "subscribe"))
    for e in user_engines(acl3, password):
        e.init_fresh()
    with caplog.at_level(logging.WARNING, logger="redlockdlm"), \
            DLM(user_urls(acl3, password), NS) as d:
        d.lock("orders", Mode.EX, timeout=5).release()
    assert any("ACL" in r.getMessage() and "subscribe" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_without_scan_dlm_ls_says_so(acl3: Instances) -> None:
    args, password = the_rule()
    set_user(acl3, without(args, "scan"))
    r = dlm_cli("ls", urls=user_urls(acl3, password))
    assert r.exit_code == 1
    assert "scan" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------- passwords


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_wrong_password_is_a_quick_typed_error_naming_authentication(
        acl3: Instances, kind: str) -> None:
    """DLM() itself does not connect (instances may be down at start); the first call
    raises QuorumUnavailable (a DLMError and ConnectionError) whose one line says
    authentication failed, per instance, within a round trip."""
    args, _ = the_rule()
    set_user(acl3, args)
    urls = user_urls(acl3, "wrong-password")
    t0 = time.monotonic()
    if kind == "sync":
        with DLM(urls, NS) as d, pytest.raises(QuorumUnavailable) as ei:
            d.lock("orders", Mode.EX, timeout=5)
    else:
        async def attempt() -> None:
            async with AsyncDLM(urls, NS) as d:
                await d.lock("orders", Mode.EX, timeout=5)

        with pytest.raises(QuorumUnavailable) as ei:
            asyncio.run(attempt())
    assert time.monotonic() - t0 < 2
    msg = str(ei.value)
    assert isinstance(ei.value, DLMError) and isinstance(ei.value, ConnectionError)
    assert msg.count("authentication failed") == 3 and "\n" not in msg, msg
    assert "wrong-password" not in msg  # URLs are shown masked


def test_the_cli_with_a_wrong_password(acl3: Instances) -> None:
    args, _ = the_rule()
    set_user(acl3, args)
    r = dlm_cli("status", urls=user_urls(acl3, "wrong-password"))
    assert r.exit_code == 1
    assert "username-password" in r.stderr or "auth" in r.stderr.lower(), r.stderr


def test_the_rule_through_redis_cli(acl3: Instances) -> None:
    """The documented way: `dlm acl | redis-cli -p PORT`."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not installed")
    for c in admin(acl3):
        c.execute_command("ACL", "LOG", "RESET")
    r = dlm_cli("acl", "--user", USER)
    line = r.stdout.strip()
    password = line.split(">", 1)[1].split()[0]
    for s in acl3:
        out = subprocess.run(["redis-cli", "-p", str(s.port)], input=line + "\n", text=True,
                             capture_output=True, timeout=10)
        assert out.stdout.strip() == "OK", out
    for e in user_engines(acl3, password):
        assert e.init_fresh().epoch
    with DLM(user_urls(acl3, password), NS) as d:
        d.lock("orders", Mode.EX, timeout=5).release()
    assert acl_log(acl3) == []


def test_docs_show_the_rule_dlm_acl_prints() -> None:
    """docs/operations.md quotes `dlm acl --password-placeholder` (wrapped): keep it true."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for extra in ([], ["--namespace", "shop", "--user", "shop"]):
        line = dlm_cli("acl", "--password-placeholder", *extra).stdout.strip()
        user = line.split()[2]
        start = doc.index(f"    ACL SETUSER {user} reset")
        block = doc[start:doc.index("\n\n", start)]
        assert " ".join(block.replace("\\\n", " ").split()) == line
