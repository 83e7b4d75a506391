"""compose.yaml is a valid, complete deployment (checked without a Docker engine)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


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
