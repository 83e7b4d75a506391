"""Mutual exclusion seen from outside Redis (docs/design.md §9, Safety and Fencing).

Several worker PROCESSES (multiprocessing, spawn) loop over a few resources taking random
modes for short critical sections. Each records (resource, mode, start_ns, end_ns, token,
pid) of every section in its own file; time.monotonic_ns() is one clock for all processes
of this machine. The observer, this test, then checks with modes.COMPAT alone:

- no two sections of incompatible modes on one resource overlap in time;
- fencing: among conflicting sections of one resource in start order, tokens strictly rise.

The fault variant pauses (SIGSTOP) and restarts empty (no init_fresh: E1) one instance at a
time while the workers run.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from redlockdlm.engine.modes import COMPAT

from .conftest import Quorum
from .workers import critical_sections

RESOURCES = ["r0", "r1", "r2"]


def run_workers(q: Quorum, tmp_path: Path, *, workers: int, seconds: float,
                lease_ms: int, socket_timeout: float, during=None) -> tuple[list, dict]:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = []
    for k in range(workers):
        out = tmp_path / f"w{k}.json"
        p = ctx.Process(target=critical_sections, args=(
            q.urls, q.ns, RESOURCES, seconds, str(out), 1000 + k, lease_ms, socket_timeout,
            go), daemon=True)
        p.start()
        procs.append((p, out))
    try:
        deadline = time.monotonic() + 60  # spawned, imported, connected: all ready
        while not all(out.exists() for _, out in procs):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.is_alive() for p, _ in procs), "a worker died at start"
            time.sleep(0.02)
        go.set()
        if during is not None:
            during([p for p, _ in procs])
        for p, _ in procs:
            p.join(seconds + 30)
            assert p.exitcode in (0, -9), f"worker exit code {p.exitcode}"
    finally:
        for p, _ in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    records: list = []
    errors: dict = {}
    for _, out in procs:
        for line in out.read_text().splitlines():
            item = json.loads(line)
            if isinstance(item, dict):
                for k, v in item["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            else:
                records.append(item)
    return records, errors


def check(records: list) -> dict:
    """The observer: returns counts; raises AssertionError on a violation."""
    by_res: dict[str, list] = {}
    for rec in records:
        if rec[6]:  # sections whose lock was still valid at their end
            by_res.setdefault(rec[0], []).append(rec)
    checked = pairs = 0
    for res, secs in by_res.items():
        secs.sort(key=lambda s: s[2])
        for i, a in enumerate(secs):
            checked += 1
            for b in secs[i + 1:]:
                if COMPAT[a[1]][b[1]]:
                    continue
                pairs += 1
                # b starts after a (start order); incompatible: a must have ended first
                assert a[3] <= b[2], f"{res}: incompatible sections overlap: {a} {b}"
                assert a[4] < b[4], f"{res}: fencing token went backwards: {a} {b}"
    return {"sections": checked, "conflicting_pairs": pairs,
            "invalid_at_end": sum(1 for r in records if not r[6])}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_mutual_exclusion_observed_outside_redis(ready, tmp_path: Path) -> None:
    q = ready(3)
    records, errors = run_workers(q, tmp_path, workers=4, seconds=3.0, lease_ms=2000,
                                  socket_timeout=0.5)
    stats = check(records)
    print(stats, errors)
    assert stats["sections"] > 50, (stats, errors)
    assert stats["conflicting_pairs"] > 50, (stats, errors)
    assert stats["invalid_at_end"] == 0, (stats, errors)  # no fault: all stayed valid
    assert not errors, (stats, errors)  # and every request was granted within its timeout
    for r in RESOURCES:
        assert q.gone(r)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(120)
def test_mutual_exclusion_with_a_minority_faulty(ready, tmp_path: Path) -> None:
    """One instance at a time paused longer than the lease or restarted empty, and one
    worker process killed with SIGKILL mid-run (its locks expire by lease)."""
    q = ready(3)

    def faults(procs: list) -> None:
        s = q.servers
        time.sleep(0.4)
        s[2].pause()  # longer than the lease
        time.sleep(1.0)
        s[2].resume()
        time.sleep(0.3)
        procs[0].kill()  # a client crashing wherever it is in the protocol
        time.sleep(0.1)
        s[1].restart(empty=True)  # recovers by itself (E1)
        time.sleep(1.2)
        s[0].pause()
        time.sleep(0.4)
        s[0].resume()

    records, errors = run_workers(q, tmp_path, workers=5, seconds=4.5, lease_ms=800,
                                  socket_timeout=0.15, during=faults)
    stats = check(records)
    print(stats, errors)
    assert stats["sections"] > 50, (stats, errors)
    assert stats["conflicting_pairs"] > 50, (stats, errors)


def test_observer_catches_violations() -> None:
    """The observer itself: an overlap of incompatible sections and a token going
    backwards are both reported; compatible overlaps are fine."""
    ok = [["r", 3, 0, 10, 5, 1, True], ["r", 1, 5, 15, 4, 2, True],  # PR, CR overlap: fine
          ["r", 5, 20, 30, 6, 1, True]]
    assert check(ok)["conflicting_pairs"] == 2
    with pytest.raises(AssertionError, match="overlap"):
        check(ok + [["r", 4, 25, 35, 7, 2, True]])  # PW inside EX
    with pytest.raises(AssertionError, match="backwards"):
        check(ok + [["r", 4, 31, 35, 6, 2, True]])  # PW after EX, same token
    # a section whose lock was already invalid at its end is not held against the DLM
    assert check(ok + [["r", 4, 25, 35, 7, 2, False]])["invalid_at_end"] == 1
