"""The deterministic simulator (tests/sim) over a fixed set of seeds: the real client core
against simulated instances running the reference model, with faults; no invariant may
break, and a seed replays exactly. A few seconds; runs in CI with the rest of the suite."""

from __future__ import annotations

import dataclasses

import pytest

from .run import config_for
from .world import Config, run_seed

#: The workload and faults before idle users, long holds, latency spikes and client 0's long
#: socket timeout: a seed found then replays with these.
V1 = dict(idle=0.0, hold=0.0, timeout0=1.0, kinds=("ipause", "irestart", "cpause", "partition"))


def v1(seed: int) -> Config:
    return dataclasses.replace(config_for(seed), **V1)

#: Counterexamples the simulator found, kept as regression seeds. 20: a down-conversion
#: CW -> CR timed out while an instance was paused; its rollback converted back UP to CW
#: where CR was granted ("always granted at once", which holds only going down) and
#: counted that vote as CW whatever the instance answered: the holder believed CW while
#: another client held PR. Fixed by `Session._keep_down_conversion` (G4: a down-conversion
#: stands) and `rollback_convert` counting only what the instances answer. (The simulator
#: has changed since: seed 20 no longer replays that schedule, so the regression tests are
#: tests/quorum/test_protocol_conversion_rollback.py, which fail with the fix reverted.)
FOUND = {20: "a failed down-conversion was rolled back to the stronger mode"}  # (V1)
#: 80 (today's workload): client 3 held PW on every instance and converted PW -> PW; client
#: 1's older NL -> PW conversion queued behind it and sent client 3 blocking events. Client
#: 3 took them for a split vote between conversions (a vote granted in PW, the mode it
#: converted to, and an older ticket waiting) and yielded on each instance: there the lock
#: was a plain grant (a conversion to the same mode changes nothing, G4), which Y1 sends
#: back to the wait queue as a new request's; client 1 was granted PW while client 3
#: counted its conversion's replies as PW. Fixed by `LockCore.converting_can_queue`: only
#: an up or middle conversion yields.
FOUND_NOW = {80: "a conversion to the same mode yielded the lock's own grant"}
#: Counterexamples still open (strict xfail: the test fails once they are fixed, so the seed
#: moves to FOUND). Found as seed 4 (V1) before the network's draws were keyed by client,
#: step and instance: instance 0 missed client 1's release of a CR lock (the reply to that
#: release was dropped; the lock's lease still runs there) and the EX write that followed;
#: every other instance released the resource's last lock and dropped the value (G9); the
#: next reader's quorum took instance 0's older value, at the highest version it saw, as
#: valid. G13 drops such a value only once the stale lock has expired. With the keyed
#: draws: seeds 31 and 68 of the first 120 with V1, 37 and 45 of the first 100 today
#: (`python -m tests.sim --replay 37`: instance 2 keeps the old value under a stale lock;
#: 45 breaks the same invariant, its cause not read yet).
KNOWN = {31: "a value that disappeared (G9) comes back from an instance that missed the "
             "last release, said valid"}  # (V1)
KNOWN_NOW = {37: KNOWN[31], 45: "a stale value read as valid (same invariant as 37)"}
SEEDS = [s for s in range(60) if s not in KNOWN_NOW]


@pytest.mark.timeout(120)
def test_fixed_seeds_keep_every_invariant() -> None:
    bad = {}
    ops = 0
    for seed in SEEDS:
        res = run_seed(seed, config_for(seed))
        ops += res.ops
        if res.violations:
            bad[seed] = res.violations[:3]
    assert not bad, f"replay with `python -m tests.sim --replay SEED`: {bad}"
    assert ops > 4000  # (the workload did run)


def test_a_seed_replays_exactly() -> None:
    a = run_seed(7, config_for(7), trace=True)
    b = run_seed(7, config_for(7), trace=True)
    assert (a.ops, a.events, a.faults, a.outcomes, a.trace) == (
        b.ops, b.events, b.faults, b.outcomes, b.trace)
    assert a.faults and a.ops


@pytest.mark.parametrize("seed,cfg,why", [
    (s, cfg, why) for table, cfg in ((FOUND, v1), (FOUND_NOW, config_for))
    for s, why in sorted(table.items())])
def test_found_counterexamples_stay_fixed(seed: int, cfg, why: str) -> None:
    assert not run_seed(seed, cfg(seed)).violations, why


@pytest.mark.parametrize("seed,cfg", [
    pytest.param(s, cfg, marks=pytest.mark.xfail(strict=True, reason=why))
    for table, cfg in ((KNOWN, v1), (KNOWN_NOW, config_for)) for s, why in table.items()])
def test_open_counterexamples(seed: int, cfg) -> None:
    assert not run_seed(seed, cfg(seed)).violations


#: Found on unmodified code by the aimed campaigns (`python -m tests.sim --profile P
#: --replay SEED`), open, strict xfails until fixed:
#: slow 52 (analysed): client 1 (309 ms each way) had a PW request queued on 5 instances;
#: its renewal came too late and the queued lock expired there; its re-sent request
#: (G12, same id) found it granted meanwhile and answered GRANTED with the old expiry
#: (G12 returns the state, it does not renew the lease), and the client counted the
#: grant's validity from the re-send: it believed PW 0.3 s after the instances had
#: dropped it, and client 0 was granted CW. Either G12 renews a repeated request's lease
#: or the client counts a repeated request's grant from the lease the instance reports.
#: (r1 153 and r1 117 were open here too: see FOUND_PROFILED.)
OPEN_PROFILED: dict[tuple[str, int], str] = {}
#: Found by the aimed campaigns and fixed: a re-sent request (G12) answered a grant the
#: queue gave meanwhile without renewing its lease, while the client counts that grant from
#: the re-send: it believed a lock the instances had already dropped. G12 now renews the
#: lease (lua/request.lua, tests/model.py). Both seeds fail with that reverted.
FOUND_PROFILED = {
    ("slow", 52): "a re-sent request's grant (G12) counted from the re-send, lease not renewed",
    ("convhold", 56): "two holders after a long hold following a conversion (same cause)",
    # An up-conversion's request lost on one instance (it kept the old, weaker mode there)
    # and the client then cut from another: the lock's validity counted that weaker grant's
    # fresh lease, so the holder believed PW held by one instance. `LockCore.validity` now
    # counts only grants that cover the held mode, as `Session.holding` does.
    ("r1", 153): "validity counted a grant in a weaker mode (a missed up-conversion)",
    # A simulator artefact, not a client bug: client 0's down-conversion had no answer
    # (one request lost, one dropped, the third's reply dropped), so it ended only at its
    # 6 s socket timeout (R4: nothing in hand decided it), then the r1 profile held the lock
    # 3.4 s more; the liveness check came first and named the hold "convert". The check
    # now allows for both when a profile holds after conversions (world.py).
    ("r1", 117): "liveness bound too short for a socket timeout then a hold (artefact)",
}


@pytest.mark.parametrize("profile,seed", sorted(FOUND_PROFILED))
def test_found_counterexamples_of_aimed_campaigns(profile: str, seed: int) -> None:
    assert not run_seed(seed, config_for(seed, profile=profile)).violations, (
        FOUND_PROFILED[(profile, seed)])


@pytest.mark.parametrize("profile,seed", [
    pytest.param(p, s, marks=pytest.mark.xfail(strict=True, reason=why))
    for (p, s), why in OPEN_PROFILED.items()])
def test_open_counterexamples_of_aimed_campaigns(profile: str, seed: int) -> None:
    assert not run_seed(seed, config_for(seed, profile=profile)).violations


#: The fault kinds added for V6, persistence and the first gap of docs/protocol.md ("Value
#: blocks through restarts"), each behind a profile (`tests/sim/run.py` PROFILES; the
#: default campaign is unchanged). `latedup`: with V6 re-introduced (the version check
#: removed from the model's release and convert), seeds 10, 17, 42, 45, 74 and 84 of the
#: first 100 break the value invariant and pass without it: a re-sent request re-created a
#: lock its owner had released, after a newer write, and the re-sent release wrote the value
#: composed under the old token over it.
V6_FOUND = {("latedup", s): "a late duplicate release lowered the value's version (V6)"
            for s in (10, 17, 42)}
#: Open counterexamples of these profiles (strict xfail):
#: latedup 12 (read by hand): client 1's EX lock s12l11 wrote its value and was released at
#: 3.54; newer writes followed (s12l23, 4.94) and the resource then lost its last lock on
#: every instance (G9: value gone, versions from 0). At 5.93 client 1's request and
#: conversion were delivered again: the lock was re-created (queued, then PW), and its
#: re-sent release wrote the old value; V6 compares versions only while a value exists, so
#: it was stored at its old version, and a reader at 7.5 read it as valid. (59 and 86 read
#: values written the same way.)
OPEN_FAULTS: dict[tuple[str, int], str] = {
    ("latedup", 12): "a late duplicate release wrote back a value that had disappeared (G9)",
}


@pytest.mark.parametrize("profile,seed", sorted(V6_FOUND))
def test_late_duplicates_never_lower_a_value(profile: str, seed: int) -> None:
    assert not run_seed(seed, config_for(seed, profile=profile)).violations, (
        V6_FOUND[(profile, seed)])


#: Found by the `aof` profile and fixed by E2 (docs/rules.md): an instance that restarts
#: with its data opens a new epoch in its rejoin window at its first call (lua/lib/core.lua
#: `epoch_load`, tests/model.py `reload`). All four fail with the model's `reload` made a
#: no-op; `python -m tests.sim --profile aof --seeds 100`: 4 seeds broke (2, 5, 29, 35), 0 now.
#: aof 35 (read by hand): client 2 held PW on instances 0 and 1 (2 had dropped it: two
#: renewals lost); instance 0 (AOF everysec) crashed and came back with its state of up to a
#: second before, without client 2's last renewal there: the lock expired on instance 0 at
#: the older expiry, and client 1's CW, queued there, was granted by instances 0 and 2 while
#: client 2 still counted instance 0's renewed lease: two holders. The epoch survived, so
#: neither the rejoin wait (E1) nor R2 applied.
#: aof 29 (read by hand): a release wrote s29l24 on instances 0 and 1 (committed); instance 0
#: crashed and came back from its AOF without it; the next reader's quorum was 0 and 2 (2 had
#: never had it) and read the older s29l19 as valid: V5 marks only resources of a new epoch.
#: aof 2, 5 (value invariant): stale values read as valid, the same way as 29.
AOF_FOUND = {
    ("aof", 35): "an AOF everysec restart forgot a renewal: two holders, no rejoin wait",
    ("aof", 29): "an AOF everysec restart forgot a committed write, read older as valid",
    ("aof", 2): "an AOF everysec restart forgot a committed write, read older as valid",
    ("aof", 5): "an AOF everysec restart forgot a committed write, read older as valid",
}


@pytest.mark.parametrize("profile,seed", sorted(AOF_FOUND))
def test_a_restart_with_data_opens_a_new_epoch(profile: str, seed: int) -> None:
    assert not run_seed(seed, config_for(seed, profile=profile)).violations, (
        AOF_FOUND[(profile, seed)])


@pytest.mark.parametrize("profile,seed", [
    pytest.param(p, s, marks=pytest.mark.xfail(strict=True, reason=why))
    for (p, s), why in sorted(OPEN_FAULTS.items())])
def test_open_counterexamples_of_fault_profiles(profile: str, seed: int) -> None:
    assert not run_seed(seed, config_for(seed, profile=profile)).violations


def _gap1(cut: float):  # noqa: ANN202 (a Schedule; imported here, tables above unchanged)
    """The first gap of docs/protocol.md, as a schedule: client 1 holds r0 in NL for 4 s;
    client 0 writes W0 on every instance, then W while cut from instance 2 (W on 0 and 1,
    a quorum); instance 0 restarts empty at 0.7 s and client 1 (holding) is cut from it for
    `cut` seconds; client 0 then touches instance 0 (its epoch starts, E1); at 3.3 s, after
    the rejoin wait and V5's window, client 2 reads r0 while cut from instance 1: its quorum
    is instance 0 (r0 new there, not marked) and instance 2 (W0)."""
    from redlockdlm.engine.modes import Mode

    from .world import Schedule

    def step(n: int, res: str, mode: Mode, pause: float = 0.0, idle: float = 0.0,
             hold: float = 0.05, timeout: float = 1.0) -> dict:
        return dict(n=n, pause=pause, idle=idle, res=res, mode=mode, timeout=timeout,
                    int_req=None, int_wait=None, hold=hold, conv=False, int_rel=None)

    return Schedule(
        faults=[(0.3, "partition", (0, [2], 0.3)), (0.7, "restartcut", (0, 0.05, cut)),
                (3.2, "partition", (2, [1], 0.5))],
        steps={0: [step(0, "r0", Mode.EX, pause=0.02), step(1, "r0", Mode.EX, idle=0.3),
                   step(2, "r1", Mode.NL, idle=0.5, hold=0.3)],
               1: [step(0, "r0", Mode.NL, hold=4.0)],
               2: [step(0, "r0", Mode.PR, idle=3.3, timeout=2.0)]})


GAP1_CFG = Config(instances=3, clients=3, resources=2)


def test_v5_marks_the_value_of_a_holder_that_rejoins_within_the_window() -> None:
    # the same schedule, the holder cut for 0.5 s only: it re-joins instance 0 (R2) inside
    # V5's window, r0 is re-created there marked forgotten, and the reader is told the
    # value is not valid (fails with V5's mark removed: it reads W0 as valid)
    for seed in (0, 3, 5):
        assert not run_seed(seed, GAP1_CFG, schedule=_gap1(0.5)).violations


@pytest.mark.xfail(strict=True, reason="docs/protocol.md gap 1: a holder that re-joins "
                   "after V5's window; the reader's quorum takes an older value as valid")
def test_gap1_a_holder_cut_past_the_window_leaves_the_resource_unmarked() -> None:
    assert not run_seed(0, GAP1_CFG, schedule=_gap1(3.5)).violations
# ----------------------------------------------------------------- simulated jobs
# (tests/sim/jobs.py: detectors with leader election over a deadlock workload, operator
# breaks; docs/verification.md "Jobs". Seeds chosen where a re-introduced bug was found:
# deadlock 1, 5, 8 (a victim outside the cycle), deadlock 194 (D3's queue-order edges
# dropped), breaks 39, 58, 66 (R2 re-requesting a broken lock), breaks 7 (a break that
# leaves granted locks); and deadlock 14, found on the code of the time: a grant event
# older than a QUEUED reply counted (two holders), fixed by the fencing sequence the
# QUEUED reply carries, `InstanceVote.stale_token`; it fails with the fix reverted; and
# jobs 11: a conversion that did not take on two instances (refused while the lock still
# waited there, lost on the way) was never sent there again and waited for ever; fixed by
# `Session._conversion_missing` (the re-check re-sends the conversion); fails reverted.)
JOB_SEEDS = [("deadlock", 1), ("deadlock", 5), ("deadlock", 8), ("deadlock", 14),
             ("deadlock", 194), ("breaks", 7), ("breaks", 39), ("breaks", 58),
             ("breaks", 66), ("jobs", 11)]


@pytest.mark.parametrize("profile,seed", JOB_SEEDS)
def test_jobs_keep_every_invariant(profile: str, seed: int) -> None:
    res = run_seed(seed, config_for(seed, profile=profile))
    assert not res.violations, (
        f"`python -m tests.sim --profile {profile} --replay {seed}`: {res.violations[:3]}")
    if profile == "deadlock":  # the detector had work: deadlocks it broke
        assert res.outcomes.get("request deadlock victim", 0) + res.outcomes.get(
            "convert deadlock victim", 0) > 0, res.outcomes
    else:
        assert any("operator breaks" in f for f in res.faults), res.faults


def test_jobs_are_opt_in() -> None:
    """The default campaign runs no job (its schedules stay those of the pinned seeds)."""
    assert Config().jobs == () and not any(config_for(s).jobs for s in range(3))


#: Found by the job profiles on unmodified code, open (strict xfails until fixed):
OPEN_JOBS = {
}


@pytest.mark.parametrize("profile,seed", [
    pytest.param(p, s, marks=pytest.mark.xfail(strict=True, reason=why))
    for (p, s), why in OPEN_JOBS.items()])
def test_open_counterexamples_of_jobs(profile: str, seed: int) -> None:
    assert not run_seed(seed, config_for(seed, profile=profile)).violations
