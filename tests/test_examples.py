"""Every example in examples/ runs to completion against real instances (docs promise it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from redlockdlm.engine.instance import Engine

EXAMPLES = sorted(p.stem for p in (Path(__file__).parents[1] / "examples").glob("*.py")
                  if not p.stem.startswith("_"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example, cluster3):
    for server in cluster3.servers:
        Engine(server.client(), "example").init_fresh()
    env = dict(os.environ, DLM_REDIS=",".join(cluster3.urls))
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / f"{example}.py")],
                          env=env, capture_output=True, text=True, timeout=90, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
