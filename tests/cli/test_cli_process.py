"""`dlm` as a real process: the installed entry point and `python -m`, exit codes, stderr,
and graceful stops of the long-running commands on SIGTERM / SIGINT."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from deadlocks import Cluster
from redis_harness import dlm_env, free_port, no_retry, wait_for_line

pytestmark = pytest.mark.timeout(60)

DLM = Path(sys.executable).parent / "dlm"
PY_M = [sys.executable, "-m", "redlockdlm_cli"]


#: the environment of a `dlm` process: none of this one's DLM_* variables, namespace "t"
env = functools.partial(dlm_env, DLM_NAMESPACE="t")


def run(cmd: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=30)


def test_python_m_status_json(cluster3):
    Cluster(cluster3)
    p = run([*PY_M, "status", "--json"], DLM_REDIS=",".join(cluster3.urls))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["reachable"] == 3 and doc["quorum"] == 2


@pytest.mark.skipif(not DLM.exists(), reason="the dlm entry point is not installed")
def test_entry_point_unreachable_and_usage_exit_codes():
    p = run([str(DLM), "ls", "--redis", f"redis://127.0.0.1:{free_port()}"])
    assert p.returncode == 1 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("dlm: error: no instance answered") and "unreachable" in line
    p = run([str(DLM), "show", "--redis", "redis://127.0.0.1:1"])
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_detector_process_resolves_then_stops_gracefully(cluster3, sig):
    c = Cluster(cluster3)
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    proc = subprocess.Popen([*PY_M, "detector", "--interval", "0.1"],
                            env=env(DLM_REDIS=",".join(c.urls)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc.stderr, "event=start")
        with c.listen("b") as ev:
            c.request("b", "b2", ["R1"], "EX", ticket=4)
            ev.wait_for(b"C|b2|deadlock", count=3)
            assert ev.received.count(b"C|b2|deadlock") == 3
        wait_for_line(proc.stderr, "event=victim")
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert "event=stop" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dev_process_prints_env_and_stops_on_sigterm():
    proc = subprocess.Popen([*PY_M, "dev", "-n", "3"], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = wait_for_line(proc.stdout, "DLM_REDIS=")
        assert line.startswith("export DLM_REDIS="), line  # (pasted into a shell as it is)
        urls = line.strip().split("=", 1)[1].split(",")
        assert len(urls) == 3
        p = run([*PY_M, "status", "--json"], DLM_REDIS=",".join(urls))
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert [i["recovering_ms"] for i in doc["instances"]] == [0, 0, 0]  # init fresh
        assert all(i["epoch"] for i in doc["instances"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "stopped" in proc.stderr.read()
        for url in urls:
            host, port = url.removeprefix("redis://").split(":")
            with socket.socket() as s:
                assert s.connect_ex((host, int(port))) != 0
            with pytest.raises(redis.ConnectionError):
                redis.Redis(host=host, port=int(port), socket_connect_timeout=0.5,
                            retry=no_retry()).ping()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_top_redraws_in_place_and_exits_0_on_ctrl_c(cluster3):
    """`dlm top` on a terminal: frames drawn in place (the cursor moves back up over the
    previous frame), a change shows in a later frame, and Ctrl-C (SIGINT) ends it with
    exit 0 and the last frame left on the screen."""
    import pty
    import select

    c = Cluster(cluster3)
    c.request("a", "a1", ["first"], "EX", ticket=time.time_ns() // 1000)
    master, slave = pty.openpty()
    proc = subprocess.Popen([*PY_M, "top", "--interval", "0.2"],
                            env=env(DLM_REDIS=",".join(c.urls), TERM="xterm", COLUMNS="120",
                                    LINES="40"),
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    seen = b""

    def read_until(needle: bytes, timeout: float = 15.0) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while needle not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
        assert needle in seen, seen[-2000:]

    try:
        read_until(b"first")
        c.request("b", "b1", ["second"], "EX", ticket=time.time_ns() // 1000)
        read_until(b"second")
        assert b"\x1b[2K" in seen and b"\x1b[1A" in seen  # (line erased, cursor up: in place)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        assert proc.stderr.read() == b""
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
