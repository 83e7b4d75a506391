"""One fault scenario: fresh instances, the observer, worker processes, proxies, faults.

A :class:`Scenario` owns everything a fault test starts and stops it all in `close()`.
Tests drive it: spawn workers, inject faults (each counted), heal, demand progress, and
finally call `finish()`, which stops the workers, runs the observer's checks, prints a
report and records it for the session summary (see ``conftest.py``).

``DLM_FAULT_ITERATIONS`` (default 1) multiplies the number of fault rounds and the
durations of the scenarios, for a longer local run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from typing import Any

from redis_harness import Instances, RedisServer
from spec.invariants import Violation, check_state, dump_views, state_from_dump

from redlockdlm.engine.instance import Engine

from .proxy import ProxyHub, ProxySet
from .workload import DEFAULTS, Observer, WorkerHandle

ITERATIONS = max(1, int(os.environ.get("DLM_FAULT_ITERATIONS", "1") or "1"))
NS = "faults"
AOF = ["--appendonly", "yes", "--appendfsync", "always"]

#: Reports of every scenario of the session, printed by conftest's terminal summary.
SUMMARY: list[dict[str, Any]] = []


class Scenario:
    def __init__(self, name: str, n: int, *, aof: bool = False, resources: int = 3,
                 seed: int | None = None, **worker_cfg: Any) -> None:
        self.name = name
        self.n = n
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.t0 = time.monotonic()
        self.inst = Instances(n, AOF if aof else ())
        self.obs = Observer()
        self._hub: ProxyHub | None = None
        self.handles: dict[str, WorkerHandle] = {}
        self.proxies: dict[str, ProxySet] = {}
        self.faults: Counter[str] = Counter()
        self.notes: list[str] = []
        self.violations: list[str] = []
        self._next = 0
        for s in self.inst:  # brand-new instances may grant at once (E1)
            self.engine(s).init_fresh()
        self.cfg = dict(DEFAULTS, namespace=NS,
                        resources=[f"res{i}" for i in range(resources)],
                        observer=list(self.obs.address), authkey=self.obs.authkey)
        if os.environ.get("DLM_FAULT_DEBUG"):  # workers report their votes per section
            self.cfg["debug_votes"] = True
            self.cfg["direct_urls"] = self.inst.urls
        self.cfg.update(worker_cfg)
        self.log(f"seed {self.seed}, {n} instances, lease {self.cfg['lease_ms']} ms")

    # ------------------------------------------------------------------ helpers

    @property
    def lease_s(self) -> float:
        return self.cfg["lease_ms"] / 1000.0

    @property
    def servers(self) -> list[RedisServer]:
        return list(self.inst)

    @property
    def hub(self) -> ProxyHub:
        if self._hub is None:
            self._hub = ProxyHub()
        return self._hub

    def log(self, msg: str) -> None:
        line = f"[{self.name} +{time.monotonic() - self.t0:6.2f}s] {msg}"
        self.notes.append(line)
        print(line, flush=True)

    def engine(self, server: RedisServer) -> Engine:
        return Engine(server.client(socket_timeout=2.0), NS)

    def fault(self, kind: str, what: str) -> None:
        self.faults[kind] += 1
        self.log(f"FAULT {kind}: {what}")

    def violation(self, msg: str) -> None:
        self.violations.append(msg)
        self.log(f"VIOLATION {msg}")

    # ------------------------------------------------------------------ workers

    def spawn(self, *, proxied: bool = False, wid: str | None = None,
              **cfg: Any) -> WorkerHandle:
        """Start a worker; with `proxied`, behind its own ProxySet (self.proxies[wid])."""
        self._next += 1
        wid = wid or f"w{self._next}"
        c = dict(self.cfg, wid=wid, seed=self.rng.randrange(1 << 30))
        c.update(cfg)
        if proxied:
            ps = self.hub.proxy_set([s.port for s in self.inst], name=wid)
            self.proxies[wid] = ps
            c["urls"] = ps.urls
        else:
            c["urls"] = self.inst.urls
        h = WorkerHandle(wid, c)
        self.handles[wid] = h
        return h

    def live(self) -> list[WorkerHandle]:
        return [h for h in self.handles.values() if h.alive]

    def wait_started(self, handles: list[WorkerHandle] | None = None,
                     timeout: float = 40.0) -> None:
        """Wait until every worker has run at least one critical section."""
        hs = handles if handles is not None else self.live()
        deadline = time.monotonic() + timeout
        while any(self.obs.begins_of(h.wid) == 0 for h in hs if h.alive):
            if time.monotonic() > deadline:
                slow = [h.wid for h in hs if self.obs.begins_of(h.wid) == 0]
                raise AssertionError(f"workers {slow} ran no section within {timeout} s; "
                                     f"errors: {self.obs.errors[:3]}")
            time.sleep(0.05)

    def wait_progress(self, sections: int = 3, bound: float | None = None,
                      handles: list[WorkerHandle] | None = None) -> float:
        """Liveness once faults healed: every live worker completes `sections` more
        critical sections within `bound` seconds (a violation otherwise). Returns the
        time it took."""
        bound = bound if bound is not None else 10 * self.lease_s + 20
        hs = [h for h in (handles if handles is not None else self.live()) if h.alive]
        base = {h.wid: self.obs.begins_of(h.wid) for h in hs}
        t = time.monotonic()
        deadline = t + bound
        dumped = False
        while True:
            behind = [h.wid for h in hs
                      if h.alive and self.obs.begins_of(h.wid) < base[h.wid] + sections]
            if not behind:
                return time.monotonic() - t
            if not dumped and time.monotonic() - t > 5.0:
                dumped = True  # slow: let them print their protocol state (workload._dump)
                for h in hs:
                    if h.wid in behind and h.alive:
                        with contextlib.suppress(Exception):
                            os.kill(h.pid, signal.SIGUSR1)
            if time.monotonic() > deadline:
                for h in hs:  # let them print their protocol state (workload._dump)
                    if h.wid in behind and h.alive:
                        with contextlib.suppress(Exception):
                            os.kill(h.pid, signal.SIGUSR1)
                time.sleep(0.5)
                self.violation(f"stuck: workers {behind} did not complete {sections} sections "
                               f"within {bound:.0f} s after the faults healed")
                return bound
            time.sleep(0.05)

    def run_for(self, seconds: float) -> None:
        time.sleep(seconds)

    # ------------------------------------------------------------------ instances

    def views(self, i: int) -> list[Any]:
        """Resource views of instance i (must be up)."""
        eng = self.engine(self.inst[i])
        try:
            _, views = eng.inspect([eng.key(r) for r in self.cfg["resources"]])
        finally:
            eng.client.close()
        return [v for v in views if v is not None]

    def wait_busy(self, i: int, timeout: float = 6.0) -> bool:
        """Wait until instance i has, across the resources, locks granted, converting and
        waiting at once (so a fault there hits all three). False if it never happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                qs = {lv.queue for v in self.views(i) for lv in v.locks
                      if lv.lease_left_ms > 0}
                if {"G", "C", "W"} <= qs:
                    self.faults["busy at fault (granted+converting+waiting)"] += 1
                    return True
            time.sleep(0.01)
        self.log(f"instance {i} never had granted, converting and waiting locks at once")
        return False

    def owner_locks(self, owner: str) -> int:
        n = 0
        for i, s in enumerate(self.inst):
            if not s.running or s.paused:
                continue
            n += sum(1 for v in self.views(i) for lv in v.locks
                     if lv.owner == owner and lv.lease_left_ms > 0)
        return n

    def wait_owner_gone(self, owner: str, bound: float) -> float | None:
        """Seconds until no instance holds a lock of `owner`, or None after `bound`."""
        t = time.monotonic()
        while time.monotonic() - t < bound:
            if self.owner_locks(owner) == 0:
                return time.monotonic() - t
            time.sleep(0.02)
        return None

    def status(self, i: int) -> Any:
        eng = self.engine(self.inst[i])
        try:
            return eng.status()
        finally:
            eng.client.close()

    # ------------------------------------------------------------------ the end

    def finish(self, *, join_timeout: float = 20.0) -> dict[str, Any]:
        """Heal everything, stop the workers, run the checks, print and record a report."""
        for s in self.inst:
            with contextlib.suppress(Exception):
                s.heal()
        for ps in self.proxies.values():
            ps.heal()
        for h in self.handles.values():
            h.stop()
        for h in self.handles.values():
            if not h.join(join_timeout) and h.killed_in is None:
                self.log(f"worker {h.wid} did not stop within {join_timeout} s (killed)")
        self.check_end_state()
        rep = self.obs.check()
        rep["violations"] = self.violations + rep["violations"]
        rep["scenario"] = self.name
        rep["faults"] = sum(v for k, v in self.faults.items() if not k.startswith("busy"))
        rep["fault_kinds"] = dict(self.faults)
        rep["seconds"] = round(time.monotonic() - self.t0, 1)
        rep["seed"] = self.seed
        SUMMARY.append(rep)
        self.log(
            f"{rep['sections']} critical sections ({rep['held_intervals']} confirmed held, "
            f"{rep['sections_ended_invalid']} ended invalid), {rep['faults']} faults "
            f"{dict(self.faults)}, {rep['tokens_checked']} tokens checked "
            f"({rep['refused']} refused), {rep['lvb_reads_checked']} value reads checked "
            f"({rep['lvb_reads_invalid']} flagged invalid), "
            f"{len(rep['violations'])} violations")
        self.log(f"worker stats: {rep['stats']}")
        for v in rep["violations"][:20]:
            self.log(f"  {v}")
        if rep["worker_errors"]:
            self.log(f"worker exceptions: {rep['worker_errors'][:3]}")
        return rep

    def check_end_state(self, grace: float = 3.0) -> None:
        """After the workers stopped: on every instance that is up, each resource whose
        locks are all within their lease obeys the rules of one instance
        (tests/spec/invariants.py: compatible grants, processed queues, ticket order...),
        and no lock of a worker that stopped cleanly (it closed its DLM, which releases
        everything) is left behind after `grace` seconds: a request withdrawn nowhere, or a
        grant nobody holds, would block the resource until its lease ran out."""
        clean = {self.obs.workers[h.wid]["owner"] for h in self.handles.values()
                 if h.killed_in is None and h.proc.exitcode == 0
                 and h.wid in self.obs.workers}
        deadline = time.monotonic() + grace
        while True:
            left: list[str] = []
            broken: list[str] = []
            for i, srv in enumerate(self.inst):
                if not srv.running or srv.paused:
                    continue
                eng = self.engine(srv)
                try:
                    keys = [eng.key(r) for r in self.cfg["resources"]]
                    _, views = eng.inspect(keys)
                finally:
                    eng.client.close()
                for r in state_from_dump(dump_views(keys, views)).values():
                    if r.all_alive:
                        try:
                            check_state(r)
                        except Violation as exc:
                            broken.append(f"instance {i}: {exc}")
                    left += [f"instance {i}: {lk.queue} {lk.id} of {lk.owner[:8]} on "
                             f"{r.name!r}" for lk in r.locks if lk.alive and lk.owner in clean]
            if broken or not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for msg in broken:
            self.violation(f"end state breaks a rule of one instance: {msg}")
        for msg in left:
            self.violation(f"lock left behind by a worker that stopped cleanly: {msg}")

    def close(self) -> None:
        for h in self.handles.values():
            with contextlib.suppress(Exception):
                if h.alive:
                    h.resume()
                    h.kill()
        if self._hub is not None:
            self._hub.close()
        self.obs.close()
        self.inst.stop()

    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assert_clean(rep: dict[str, Any]) -> None:
    assert not rep["worker_errors"], rep["worker_errors"][:3]
    assert not rep["violations"], "\n".join(rep["violations"][:20])
    assert rep["held_intervals"] > 0
