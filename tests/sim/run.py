"""Run a campaign of seeds: `python -m tests.sim --seeds N [--first S] [--replay SEED]
[--shrink SEED]`.

Prints operations, faults, invariant checks and violations, and simulated lock operations
per minute of this process's CPU time; a failing seed is printed with its fault schedule
and trace (replayed exactly with `--replay SEED`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if __package__ in (None, ""):  # `python tests/sim/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    __package__ = "tests.sim"  # noqa: A001

from redlockdlm.engine.modes import Mode  # noqa: E402

from .world import Config, run_seed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--replay", type=int, default=None, help="run one seed with its trace")
    ap.add_argument("--instances", type=int, default=None, help="default: 3 or 5 by seed")
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="a campaign aimed at one kind of schedule (see PROFILES)")
    ap.add_argument("--stop", action="store_true", help="stop at the first failing seed")
    ap.add_argument("--shrink", type=int, default=None,
                    help="reduce a failing seed's schedule and print it as a pytest test")
    a = ap.parse_args(argv)
    if a.shrink is not None:
        from .shrink import as_test, shrink

        cfg = config_for(a.shrink, a.instances, a.profile)
        small, res, tried = shrink(a.shrink, cfg)
        print(f"# seed {a.shrink}: {len(small.faults)} fault(s), "
              f"{sum(map(len, small.steps.values()))} step(s) after {tried} runs; "
              f"{res.ops} ops, {res.sim_s:.1f} simulated s")
        print(as_test(a.shrink, cfg, small, res))
        return 1 if res.violations else 0
    seeds = [a.replay] if a.replay is not None else range(a.first, a.first + a.seeds)
    tot = {"ops": 0, "faults": 0, "checks": 0, "events": 0, "sim": 0.0}
    failed = []
    t0 = time.process_time()
    for seed in seeds:
        res = run_seed(seed, config_for(seed, a.instances, a.profile), trace=a.replay is not None)
        tot["ops"] += res.ops
        tot["faults"] += len(res.faults)
        tot["checks"] += res.checks
        tot["events"] += res.events
        tot["sim"] += res.sim_s
        if res.violations or a.replay is not None:
            print(f"seed {seed}: {len(res.violations)} violation(s), {res.ops} ops, "
                  f"outcomes {sorted(res.outcomes.items())}")
            for line in res.faults:
                print("  fault", line)
            for line in res.violations[:10]:
                print("  VIOLATION", line)
            for line in res.trace[-40:]:
                print("  trace", line)
        if res.violations:
            failed.append(seed)
            if a.stop:
                break
    cpu = time.process_time() - t0
    print(f"seeds {len(seeds)}  ops {tot['ops']}  faults {tot['faults']}  "
          f"invariant checks {tot['checks']}  events {tot['events']}  "
          f"simulated {tot['sim']:.0f} s  cpu {cpu:.1f} s  "
          f"ops/min {tot['ops'] / max(cpu, 1e-9) * 60:,.0f}")
    print(f"violations: {len(failed)} seed(s) {failed[:20]}")
    return 1 if failed else 0


#: Campaigns aimed at one kind of schedule, on top of a seed's configuration:
#: r1: every fault a conversion request lost on one instance then the client cut from
#:     another for 1 to 2.5 leases, and every converted lock held 1 to 4 leases (R1: a
#:     grant in a mode that does not cover the held one must not count as holding it);
#: slow: latency spikes of 1 to 4 leases, 0.3 to 1.5 leases each way (round trips past
#:     the lease), among instance and client pauses (V6, G12);
#: convhold: the default faults, and 30% of converted locks held 1 to 4 leases;
#: latedup: every fault a late duplicate (V6, G12): the messages one client sends for 0.3
#:     to 1.5 leases reach every instance again 1 to 3 leases later, in order, as a
#:     retrying proxy or a client library's retry after a timeout re-sends them; a
#:     re-sent request re-creates a lock its owner already released, and its re-sent
#:     release writes the value composed under the old token after newer writes.
#: aof: a minority of instances run AOF `appendfsync everysec` and crash (among the default
#:     faults) back with the state synced up to a second before: the epoch key survives,
#:     the last second's grants and writes do not, and the first call opens a new epoch
#:     (E2; docs/operations.md, "Persistence").
#: gap1: instances restart empty and one client is cut from the restarted one for 2.5 to 4
#:     leases from the crash (past the rejoin wait and V5's window: its locks re-join
#:     late), among partitions and pauses; half the locks held 1 to 4 leases.
#: relloss: every fault a release that writes nothing lost on one instance (its lock stays
#:     there, stale) and every client cut from that instance for 1.5 to 3 leases, past the
#:     stale lock's lease, while the others go on; one resource, three clients, more
#:     writers, users idle more often, 10 s of work: the first call after the cut purges the
#:     stale lock there and must drop the older value with it (G13).
#: rejoin: every fault the next writer's lock never reaching a minority of instances (they
#:     keep the older value), instance r of the bare quorum that stores its write
#:     restarting empty 0.3 s after that release, and 1 to 2 leases later every client cut
#:     from the rest of that quorum for 0.5 to 1.2 leases: a reader's quorum is r and the
#:     instances that missed the write; locks held across the restart re-join r (R2) and
#:     V5 marks its value forgotten. One resource, three clients, more writers, 10 s.
#: vminor: every fault a write that reaches a minority (V7): a client's up-conversion to
#:     PW/EX never reaches N - Q instances (it holds PW/EX on a bare quorum), the same
#:     lock's next down-conversion that writes a value is lost on one instance q of that
#:     quorum (q keeps the stronger mode and the older value), and every client is then
#:     cut from the rest; locks convert up to three times, down-conversions from PW/EX
#:     write, half the releases do not, and a write whose call returned without an error
#:     counts as committed (the user's view) even where no quorum stores it.
#: deadlock, breaks, jobs: the simulated jobs (tests/sim/jobs.py, docs/verification.md).
_WRITERS = (Mode.CR, Mode.CR, Mode.PR, Mode.PW, Mode.PW, Mode.EX)
_VMINOR = (Mode.NL, Mode.NL, Mode.CR, Mode.PR, Mode.PW, Mode.EX, Mode.EX)
PROFILES: dict[str, dict] = {
    "r1": dict(kinds=("convloss",), hold_after_conv=1.0),
    "slow": dict(kinds=("latency", "ipause", "cpause"), lat_dur=(1.0, 4.0),
                 lat_extra=(0.3, 1.5)),
    "convhold": dict(hold_after_conv=0.3),
    "latedup": dict(kinds=("latedup",)),
    # cut: the default campaign with R3's deadline cut of rounds (Broadcast.until) modelled
    "cut": dict(cut=True),
    "aof": dict(kinds=("aofrestart", "aofrestart", "ipause", "irestart", "cpause",
                       "partition", "latency")),
    "gap1": dict(kinds=("restartcut", "restartcut", "partition", "ipause"), hold=0.5),
    "relloss": dict(kinds=("relloss",), faults=3, idle=0.3, modes=_WRITERS, resources=1,
                    clients=3, work_s=10.0, relloss_cut=(1.5, 3.0)),
    "vminor": dict(kinds=("vminor",), faults=3, chain=3, down_writes=True,
                   release_writes=0.5, returned_commits=True, modes=_VMINOR, resources=1,
                   clients=3, work_s=10.0),
    "rejoin": dict(kinds=("rejoinread",), faults=2, hold=0.3, modes=_WRITERS, resources=1,
                   clients=3, work_s=10.0),
    # (tests/sim/jobs.py) deadlock: two detectors (one leads) over users that take two
    # resources in either order and convert up, without timeouts; breaks: the default
    # workload and an operator's `dlm break` at random times; jobs: both.
    "deadlock": dict(jobs=("detector", "deadlocks"), resources=2, hold=0.0, idle=0.0),
    "breaks": dict(jobs=("breaks",)),
    "jobs": dict(jobs=("detector", "deadlocks", "breaks"), resources=2, hold=0.0, idle=0.0),
}


def config_for(seed: int, instances: int | None = None, profile: str | None = None) -> Config:
    """The configuration of a seed: 3 or 5 instances, 2 to 4 clients, 1 to 3 resources
    (and a profile's settings)."""
    cfg = Config(instances=instances or (3, 5, 3)[seed % 3], clients=2 + seed % 3,
                 resources=1 + (seed // 3) % 3)
    return dataclasses.replace(cfg, **PROFILES[profile]) if profile else cfg


if __name__ == "__main__":
    sys.exit(main())
