"""Shrinking: a failing seed's schedule (its faults and every user's steps, `Schedule`)
reduced to a short one that still fails the same way, by delta debugging (Zeller's ddmin:
remove chunks of the list, halving the chunk until no single fault or step can go), and
printed as a pytest test that replays it (`python -m tests.sim --shrink SEED`).

Deterministic: the same seed and schedule give the same run (the network's draws and the
clocks still come from the seed), so the reduction is the same every time. "The same way":
a violation of the same invariant (its first words, as `kind` gives them)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from enum import Enum
from typing import Any

from .world import Config, Result, Schedule, recorded, run_seed

Item = tuple  #: ("f", index) a fault, ("s", client, index) a step


def kind(violation: str) -> str:
    """The invariant a violation breaks: its words before the first colon ("value",
    "two holders", "fencing", "liveness", "queues not processed (G8) on instance 1 after
    release" -> "queues not processed (G8)")."""
    text = re.sub(r"^t=[0-9.]+ ", "", violation)
    head = text.split(":", 1)[0]
    return re.sub(r" on instance \d+ after \w+$", "", head)


def _build(full: Schedule, keep: list[Item]) -> Schedule:
    faults = [full.faults[it[1]] for it in keep if it[0] == "f"]
    steps: dict[int, list[dict]] = {cid: [] for cid in full.steps}
    for it in keep:
        if it[0] == "s":
            steps[it[1]].append(full.steps[it[1]][it[2]])
    return Schedule(faults, steps)


def ddmin(items: list[Item], fails: Callable[[list[Item]], bool],
          budget: int = 600) -> list[Item]:
    """A 1-minimal sublist of `items` (in order) for which `fails` holds, or the smallest
    found within `budget` calls."""
    n = 2
    calls = 0
    while len(items) >= 2 and calls < budget:
        size = max(1, len(items) // n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        reduced = False
        for i in range(len(chunks)):  # the complement of each chunk first: big steps
            rest = [x for j, ch in enumerate(chunks) if j != i for x in ch]
            calls += 1
            if fails(rest):
                items, n, reduced = rest, max(n - 1, 2), True
                break
            if calls >= budget:
                break
        if not reduced:
            if n >= len(items):
                break
            n = min(len(items), 2 * n)
    return items


def shrink(seed: int, cfg: Config, budget: int = 600) -> tuple[Schedule, Result, int]:
    """(the reduced schedule, its run, runs tried) of a failing seed."""
    res, full = recorded(seed, cfg)
    if not res.violations:
        raise ValueError(f"seed {seed} does not fail")
    want = kind(res.violations[0])
    items: list[Item] = [("f", i) for i in range(len(full.faults))]
    items += [("s", cid, k) for cid, st in sorted(full.steps.items()) for k in range(len(st))]
    tried = [0]

    def fails(keep: list[Item]) -> bool:
        tried[0] += 1
        r = run_seed(seed, cfg, schedule=_build(full, keep))
        return any(kind(v) == want for v in r.violations)

    keep = ddmin(items, fails, budget)
    small = _build(full, keep)
    return small, run_seed(seed, cfg, schedule=small), tried[0]


def _py(x: Any) -> str:
    """Python source for a schedule's values (modes as `Mode.EX`; floats exact)."""
    if isinstance(x, Enum):
        return f"{type(x).__name__}.{x.name}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in x.items()) + "}"
    if isinstance(x, list):
        return "[" + ", ".join(_py(v) for v in x) + "]"
    if isinstance(x, tuple):
        return "(" + ", ".join(_py(v) for v in x) + ("," if len(x) == 1 else "") + ")"
    return repr(x)


def as_test(seed: int, cfg: Config, small: Schedule, res: Result) -> str:
    """A pytest test (for a file in tests/sim/) that replays the reduced schedule and
    asserts that no invariant breaks: it fails while the defect is there."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if getattr(cfg, f.name) != f.default}
    cfg_src = "Config(" + ", ".join(f"{k}={_py(v)}" for k, v in fields.items()) + ")"
    steps = ",\n".join(f"        {cid}: [\n" + "".join(f"            {_py(st)},\n" for st in sts)
                       + "        ]" for cid, sts in sorted(small.steps.items()))
    faults = "".join(f"        {_py(f)},\n" for f in small.faults)
    why = res.violations[0] if res.violations else "(no violation)"
    nsteps = sum(map(len, small.steps.values()))
    return f'''from redlockdlm.engine.modes import Mode  # noqa: F401 (the steps' modes)

from .world import Config, Schedule, run_seed


def test_seed_{seed}_shrunk() -> None:
    """Seed {seed}, shrunk to {len(small.faults)} fault(s) and {nsteps} step(s):
    {why[:300]}"""
    cfg = {cfg_src}
    schedule = Schedule(faults=[
{faults}    ], steps={{
{steps},
    }})
    res = run_seed({seed}, cfg, schedule=schedule)
    assert not res.violations, res.violations[:3]
'''
