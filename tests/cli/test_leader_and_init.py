"""`dlm init --fresh`, and leader election among several `dlm detector` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from redlockdlm_cli.main import cli

from redlockdlm import DLM, Mode
from redlockdlm.engine.instance import Engine
from redlockdlm.errors import NotFresh, NotQueued

pytestmark = pytest.mark.timeout(90)
PY_M = [sys.executable, "-m", "redlockdlm_cli"]


def test_init_fresh_marks_new_instances_safe(make_instances):
    inst = make_instances(3)
    urls = ",".join(inst.urls)
    r = CliRunner().invoke(cli, ["init", "--fresh", "--redis", urls], input="n\n")
    assert r.exit_code == 1
    r = CliRunner().invoke(cli, ["init", "--fresh", "--yes", "--json", "--redis", urls])
    assert r.exit_code == 0, r.output
    assert all(d["ok"] and d["epoch"] for d in json.loads(r.output))
    for s in inst.servers:
        assert Engine(s.client(), "t").status().recovering_ms == 0
    with DLM(inst.urls, "t", lease_ms=30_000) as d:  # no rejoin wait
        d.lock("x", Mode.EX, timeout=2).release()
    assert CliRunner().invoke(cli, ["init", "--redis", urls]).exit_code == 2


def test_init_fresh_refuses_an_instance_that_is_recovering_or_was_used(cluster3):
    """E1: an instance whose epoch was created by use may have forgotten leases it granted
    before a restart; marking it fresh would let it grant at once. `dlm init --fresh`
    refuses it (exit 1, naming it and why) and leaves it recovering; brand-new instances
    and those already marked fresh are fine; --force overrides."""
    s0, s1, s2 = cluster3.servers
    recovering = Engine(s0.client(), "t", rejoin_ms=60_000)
    rep = recovering.request(recovering.key("x"), "o", "a", Mode.EX, ticket=1, lease_ms=1000)
    assert rep.status.name == "RECOVERING"  # its first use created the epoch (E1)
    Engine(s2.client(), "t").init_fresh()  # already marked fresh: left as it is
    urls = ",".join(cluster3.urls)
    r = CliRunner().invoke(cli, ["init", "--fresh", "--yes", "--redis", urls])
    assert r.exit_code == 1, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlm: error: not marked fresh: "), r.stderr
    assert cluster3.urls[0] in err[0] and "recovering for" in err[0] and "--force" in err[0]
    assert cluster3.urls[1] not in err[0] and cluster3.urls[2] not in err[0]
    assert recovering.status().recovering_ms > 50_000  # untouched
    assert [Engine(s.client(), "t").status().recovering_ms for s in (s1, s2)] == [0, 0]
    assert recovering.request(recovering.key("x"), "o", "a", Mode.EX, ticket=1,
                              lease_ms=1000).status.name == "RECOVERING"
    r = CliRunner().invoke(cli, ["init", "--fresh", "--force", "--yes", "--json",
                                 "--redis", urls])
    assert r.exit_code == 0, r.output
    assert all(d["ok"] for d in json.loads(r.stdout))
    assert recovering.status().recovering_ms == 0


def test_init_fresh_library_call_refuses_a_used_instance(redis_server):
    """The same rule through `Engine.init_fresh`: a typed NotFresh, nothing changed, also
    for an instance past its recovery (its epoch was created by use, not by `fresh`)."""
    e = Engine(redis_server.client(), "t", rejoin_ms=0)
    assert e.request(e.key("x"), "o", "a", Mode.EX, ticket=1,
                     lease_ms=1000).status.name == "GRANTED"
    before = redis_server.client().hgetall("dlm:epoch")
    with pytest.raises(NotFresh, match="not brand-new"):
        e.init_fresh()
    assert redis_server.client().hgetall("dlm:epoch") == before
    assert e.init_fresh(force=True).epoch == before[b"id"].decode()
    assert redis_server.client().hget("dlm:epoch", "safe") == b"0"
    assert e.init_fresh().recovering_ms == 0  # now marked fresh: idempotent


def _env(urls: list[str]) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    e.update(DLM_REDIS=",".join(urls), DLM_NAMESPACE="t")
    return e


def test_one_detector_leads_and_a_dead_leader_is_replaced(cluster3):
    for s in cluster3.servers:
        Engine(s.client(), "t").init_fresh()
    args = [*PY_M, "detector", "--interval", "0.2", "--lease", "1000", "-v"]
    a = subprocess.Popen(args, env=_env(cluster3.urls), stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    b = subprocess.Popen(args, env=_env(cluster3.urls), stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    with DLM(cluster3.urls, "t") as probe:  # a leads: the leadership lock is taken
        with pytest.raises(NotQueued):
            probe.lock("__leader__/detector", Mode.EX, noqueue=True)
    a.send_signal(signal.SIGKILL)  # the leader dies without releasing
    a.wait(timeout=10)
    killed_at = time.monotonic()
    time.sleep(3.0)  # the leadership lease (1 s) runs out; b asks every round (0.2 s)
    with DLM(cluster3.urls, "t") as probe:  # held again: by b
        with pytest.raises(NotQueued):
            probe.lock("__leader__/detector", Mode.EX, noqueue=True)
    b.send_signal(signal.SIGTERM)
    _, err = b.communicate(timeout=20)
    assert b.returncode == 0, err
    assert "leading detector" in err, err[-2000:]
    assert time.monotonic() - killed_at < 15


class _Stderr:
    """The lines a subprocess writes to stderr, read on a thread (no pipe fills up)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> float | None:
        """Seconds until a line containing `text` appeared, or None after `timeout`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if any(text in line for line in self.lines):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def text(self) -> str:
        return "".join(self.lines)


def test_detector_on_instances_not_marked_fresh_leads_after_the_rejoin_window(cluster3):
    """A new deployment whose instances were not `init --fresh`'ed: every instance is in
    its rejoin window (E1) when the detector first asks to lead. It must lead once the
    window ends (R3: the NOQUEUE attempt returns each round instead of blocking), and
    stop promptly on SIGTERM."""
    args = [*PY_M, "detector", "--interval", "0.2", "--lease", "1500", "-v"]
    p = subprocess.Popen(args, env=_env(cluster3.urls), stderr=subprocess.PIPE, text=True)
    err = _Stderr(p)
    try:
        took = err.wait_for("leading detector", 1.5 + 6)
        assert took is not None, err.text()[-3000:]
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        p.wait(timeout=10)
        assert time.monotonic() - t0 < 2.5
        assert p.returncode == 0, err.text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_detector_waiting_for_the_rejoin_window_stops_on_sigterm(cluster3):
    """SIGTERM while the detector waits for instances in their rejoin window (long here:
    the lease, 20 s): it exits within about 2 s, with status 0."""
    args = [*PY_M, "detector", "--interval", "0.2", "--lease", "20000", "-v"]
    p = subprocess.Popen(args, env=_env(cluster3.urls), stderr=subprocess.PIPE, text=True)
    err = _Stderr(p)
    try:
        assert err.wait_for("event=start", 10) is not None, err.text()[-3000:]
        time.sleep(1.0)  # asking to lead, in the window
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            p.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pytest.fail("the detector ignored SIGTERM: " + err.text()[-3000:])
        assert time.monotonic() - t0 < 2.5
        assert p.returncode == 0, err.text()[-3000:]
        assert "leading detector" not in err.text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
