"""compose.yaml is a valid, complete deployment that works when copied.

Most checks read the parsed YAML and the Dockerfile (no Docker engine needed); the init
step's script runs against real redis-server processes; the last test brings the stack up
with `docker compose` where that works and is skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from redis_harness import Instances, free_port

ROOT = Path(__file__).parents[1]
REDIS_SERVICES = ("redis1", "redis2", "redis3")
PROJECT_IMAGE = "redlockdlm:latest"


def load() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_three_independent_instances_with_healthchecks():
    services = load()["services"]
    redis = {k: v for k, v in services.items() if v.get("image", "").startswith("redis:")}
    assert sorted(redis) == ["redis1", "redis2", "redis3"]
    for name, svc in redis.items():
        cmd = " ".join(svc["command"])
        assert "replicaof" not in cmd and "slaveof" not in cmd, name
        assert svc["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "--appendfsync always" in " ".join(redis["redis3"]["command"])
    assert "--appendonly no" in " ".join(redis["redis1"]["command"])


def test_detector_and_demo_use_all_instances_and_parse_as_dlm_commands():
    from redlockdlm_cli.main import cli

    services = load()["services"]
    for name in ("detector", "demo"):
        svc = services[name]
        urls = svc["environment"]["DLM_REDIS"].split(",")
        assert urls == [f"redis://redis{i}:6379" for i in (1, 2, 3)]
        args = svc["command"]
        ctx = cli.make_context("dlm", list(args), resilient_parsing=True)
        sub = cli.get_command(ctx, args[0])
        assert sub is not None, args
        sub.make_context(args[0], list(args[1:]))  # raises on unknown options
    assert services["detector"]["healthcheck"]["test"] == ["CMD", "dlm", "status"]
    assert services["detector"]["depends_on"]["redis1"]["condition"] == "service_healthy"


def test_the_image_ships_the_lua_scripts():
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY lua ./lua" in text and 'ENTRYPOINT ["dlm"]' in text


def project_image_users() -> dict[str, dict]:
    return {k: v for k, v in load()["services"].items() if v.get("image") == PROJECT_IMAGE}


def test_an_init_service_runs_once_before_the_detector_and_the_demo():
    services = load()["services"]
    init = services["init"]
    assert init["image"] == PROJECT_IMAGE
    assert init["entrypoint"] == ["dlm-compose-init"]
    assert "--force" not in " ".join(init.get("command") or [])
    assert init.get("restart", "no") == "no"  # one-shot: never re-run by the engine
    for name in REDIS_SERVICES:
        assert init["depends_on"][name]["condition"] == "service_healthy", name
    for name in ("detector", "demo"):
        assert services[name]["depends_on"]["init"]["condition"] == \
            "service_completed_successfully", name
    assert services["demo"]["depends_on"]["detector"]["condition"] == "service_healthy"
    # The marker that keeps a second `up` from marking anything fresh is on a named volume.
    marker_dir = "/var/lib/dlm-init"
    mounts = [v.split(":") for v in init["volumes"]]
    assert any(dst == marker_dir and src in load()["volumes"] for src, dst in mounts), mounts
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY scripts/compose-init.sh /usr/local/bin/dlm-compose-init" in dockerfile
    script = (ROOT / "scripts/compose-init.sh").read_text()
    assert f"${{DLM_INIT_MARKER:-{marker_dir}/" in script


def test_every_service_using_the_project_image_builds_it():
    users = project_image_users()
    assert sorted(users) == ["demo", "detector", "init"]
    for name, svc in users.items():
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context is not None, f"{name} uses {PROJECT_IMAGE} without build:"
        assert (ROOT / context / "Dockerfile").is_file(), name


def test_the_image_runs_as_a_non_root_user():
    users = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.startswith("USER ")]
    assert users, "no USER in the Dockerfile: the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users


def test_instance_ports_are_published_on_loopback_only():
    services = load()["services"]
    host_ports = []
    for name in REDIS_SERVICES:
        ports = services[name].get("ports")
        assert ports, f"{name} publishes no port"
        for entry in ports:
            assert isinstance(entry, str), entry
            m = re.fullmatch(r"127\.0\.0\.1:(\$\{\w+:-(\d+)\}|\d+):6379", entry)
            assert m, f"{name}: {entry} is not bound to 127.0.0.1 only"
            host_ports.append(m.group(2) or m.group(1))
    assert len(set(host_ports)) == 3, host_ports
    for name, svc in services.items():
        if name not in REDIS_SERVICES:
            assert not svc.get("ports"), f"{name} publishes ports"


def test_the_detector_healthcheck_is_the_grant_check():
    det = load()["services"]["detector"]["healthcheck"]
    assert det["test"] == ["CMD", "dlm", "status"]  # exits 1 when no grant is possible
    assert det["start_period"]  # a second up sits out the rejoin wait before it is healthy


def _tool_env(insts: Instances, marker: Path) -> dict[str, str]:
    return {**os.environ, "DLM_REDIS": ",".join(insts.urls), "DLM_NAMESPACE": "compose",
            "DLM_INIT_MARKER": str(marker),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def test_the_init_step_marks_instances_fresh_on_the_first_up_only(
        make_instances: Callable[..., Instances], tmp_path: Path):
    """A second `docker compose up` runs the init step again: instances that restarted
    empty since (they may have granted locks still held elsewhere) are not marked fresh."""
    insts = make_instances(3)
    env = _tool_env(insts, tmp_path / "initialized")
    script = str(ROOT / "scripts/compose-init.sh")
    first = _run(["sh", script], env)
    assert first.returncode == 0, first.stdout + first.stderr
    status = _run(["dlm", "status"], env)
    assert status.returncode == 0, status.stdout + status.stderr  # grants at once

    insts[0].restart(empty=True)
    insts[1].restart(empty=True)
    second = _run(["sh", script], env)
    assert second.returncode == 0, second.stdout + second.stderr
    status = _run(["dlm", "status"], env)
    assert status.returncode == 1, status.stdout + status.stderr  # no quorum can grant yet
    assert "no epoch" in status.stdout + status.stderr


def _compose_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker executable"
    for args in (["docker", "compose", "version"], ["docker", "info"]):
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(args)}: {exc}"
        if done.returncode != 0:
            return f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()[:200]}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_stack_comes_up_and_a_second_up_marks_nothing_fresh(tmp_path: Path):
    reason = _compose_unavailable()
    if reason:
        pytest.skip(f"docker compose cannot run here ({reason})")
    ports = [free_port() for _ in REDIS_SERVICES]
    env = {**os.environ, "COMPOSE_PROJECT_NAME": f"dlmcomposetest{os.getpid()}",
           **{f"DLM_PORT{i}": str(p) for i, p in enumerate(ports, 1)}}
    host = {**env, "DLM_NAMESPACE": "demo",
            "DLM_REDIS": ",".join(f"redis://127.0.0.1:{p}" for p in ports)}
    dlm = [sys.executable, "-m", "redlockdlm_cli"]

    def compose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "compose", "-f", str(ROOT / "compose.yaml"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def granting_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if compose("exec", "-T", "detector", "dlm", "status").returncode == 0:
                return True
            time.sleep(2)
        return False

    try:
        up = compose("up", "--build", "--detach", "detector", timeout=900)
        assert up.returncode == 0, up.stdout + up.stderr
        assert granting_within(60)  # marked fresh: no rejoin wait
        from_host = _run([*dlm, "status"], host)  # through the published ports
        assert from_host.returncode == 0, from_host.stdout + from_host.stderr
        demo = compose("run", "--rm", "demo", "demo", "--workers", "2", "--seconds", "3",
                       "--no-detector")
        assert demo.returncode == 0, demo.stdout + demo.stderr

        down = compose("down")  # volumes stay: redis3's AOF and the init marker
        assert down.returncode == 0, down.stdout + down.stderr
        up = compose("up", "--detach", "detector", timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        logs = compose("logs", "init").stdout
        assert "no instance marked fresh" in logs, logs
        # Not marked fresh: no quorum grants until the rejoin wait (10 s) has passed.
        early = _run([*dlm, "status"], host)
        assert early.returncode == 1, early.stdout + early.stderr
        assert granting_within(120)
    finally:
        compose("down", "--volumes", "--remove-orphans", timeout=300)
