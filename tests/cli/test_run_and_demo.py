"""`dlm run` (a command under a lock) and `dlm demo` (the README's main job)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from redis_harness import dlm_env as env
from redlockdlm_cli.main import cli

from redlockdlm import DLM, Mode
from redlockdlm.engine.instance import Engine

pytestmark = pytest.mark.timeout(90)
PY_M = [sys.executable, "-m", "redlockdlm_cli"]


def fresh(cluster, namespace: str = "t") -> list[str]:
    for server in cluster.servers:
        Engine(server.client(), namespace).init_fresh()
    return list(cluster.urls)



def test_run_passes_token_and_exit_code(cluster3):
    urls = fresh(cluster3)
    p = subprocess.run([*PY_M, "run", "--namespace", "t", "--redis", ",".join(urls), "jobs/x",
                        "--", sys.executable, "-c",
                        "import os,sys; print(os.environ['DLM_FENCING_TOKEN']); sys.exit(3)"],
                       env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    assert int(p.stdout.strip()) > 0
    # released afterwards: we can take it at once
    with DLM(urls, "t") as d:
        d.lock("jobs/x", Mode.EX, noqueue=True).release()


def test_run_holds_the_lock_while_the_command_runs(cluster3):
    urls = fresh(cluster3)
    proc = subprocess.Popen([*PY_M, "run", "--namespace", "t", "--redis", ",".join(urls),
                             "jobs/y", "--", sys.executable, "-c",
                             "import time; print('in', flush=True); time.sleep(1.5)"],
                            env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in"
    r = CliRunner().invoke(cli, ["run", "--namespace", "t", "--redis", ",".join(urls),
                                 "--noqueue", "jobs/y", "--", "true"])
    assert r.exit_code == 75 and "not granted at once" in r.output  # (75: the lock, not 1)
    assert proc.wait(timeout=30) == 0
    r = CliRunner().invoke(cli, ["run", "--namespace", "t", "--redis", ",".join(urls),
                                 "--mode", "PR", "jobs/y", "--", "true"])
    assert r.exit_code == 0, r.output


def test_run_bad_arguments_exit_2(cluster3):
    urls = ",".join(fresh(cluster3))
    runner = CliRunner()
    r = runner.invoke(cli, ["run", "--redis", urls, "--mode", "XX", "r", "--", "true"])
    assert r.exit_code == 2
    r = runner.invoke(cli, ["run", "--redis", urls, "r"])
    assert r.exit_code == 2
    r = runner.invoke(cli, ["run", "--redis", urls, "r", "--", "/nonexistent/cmd"])
    assert r.exit_code == 127 and "cannot run" in r.output  # (the shell's "not found")


def test_run_wait_gives_up(cluster3):
    urls = fresh(cluster3)
    with DLM(urls, "t") as holder:
        holder.lock("jobs/z", Mode.EX)
        t0 = time.monotonic()
        r = CliRunner().invoke(cli, ["run", "--namespace", "t", "--redis", ",".join(urls),
                                     "--wait", "0.3", "jobs/z", "--", "true"])
        assert r.exit_code == 75 and "within the timeout" in r.output
        assert time.monotonic() - t0 < 10


def test_run_exit_codes_tell_the_lock_from_the_command(cluster3):
    """COMMAND's own failure (1) and the lock's (75, not granted in time) differ; the
    environment names the lock; under --json the error and the summary are JSON lines on
    stderr and stdout stays COMMAND's."""
    urls = fresh(cluster3)
    base = [*PY_M, "run", "--namespace", "t", "--redis", ",".join(urls)]
    show = ("import os,sys; print(os.environ['DLM_LOCK_ID'], os.environ['DLM_RESOURCE'], "
            "os.environ['DLM_MODE']); sys.exit(1)")
    p = subprocess.run([*base, "--json", "--mode", "pr", "jobs/e", "--", sys.executable, "-c",
                        show], env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr  # COMMAND's own
    lock_id, res, mode = p.stdout.split()
    assert (res, mode) == ("jobs/e", "PR")
    summary = json.loads(p.stderr.strip().splitlines()[-1])
    assert summary == {"resource": "jobs/e", "mode": "PR", "lock_id": lock_id,
                       "token": summary["token"], "lost": False, "exit_code": 1}
    with DLM(urls, "t") as holder:
        holder.lock("jobs/e", Mode.EX)
        p = subprocess.run([*base, "--json", "--wait", "0.2", "jobs/e", "--", "true"],
                           env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 75 and p.stdout == "", (p.returncode, p.stdout)
    err = json.loads(p.stderr.strip().splitlines()[-1])
    assert err["exit_code"] == 75 and "not granted" in err["error"], err


def test_demo_on_given_instances_json(cluster3):
    urls = fresh(cluster3, "demo")
    r = CliRunner().invoke(cli, ["demo", "--redis", ",".join(urls), "--seconds", "2",
                                 "--workers", "3", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output[r.output.index("{"):])
    assert doc["consistent"] is True
    assert doc["deadlock_victims"] == 1
    assert sum(doc["operations"].values()) > 0


@pytest.mark.slow
def test_demo_starts_its_own_cluster_as_a_process():
    """The README's first command ends in `dlm demo` with nothing configured."""
    p = subprocess.run([*PY_M, "demo", "--seconds", "2", "--workers", "2"], env=env(),
                       capture_output=True, text=True, timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "local development cluster" in p.stdout
    assert "Consistent: yes" in p.stdout


def test_run_release_on_sigterm(cluster3):
    urls = fresh(cluster3)
    proc = subprocess.Popen([*PY_M, "run", "--namespace", "t", "--redis", ",".join(urls),
                             "jobs/s", "--", sys.executable, "-c",
                             "import time; print('in', flush=True); time.sleep(30)"],
                            env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in"
    proc.terminate()
    code = proc.wait(timeout=20)
    assert code == 128 + 15 or code == -15
    got = threading.Event()
    with DLM(urls, "t") as d:
        d.lock("jobs/s", Mode.EX, noqueue=True).release()
        got.set()
    assert got.is_set()
