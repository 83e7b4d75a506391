"""`dlm demo`: several worker processes share a small hierarchical database.

The database has tables (root resources) and rows (their children). Workers lock the way a
VMS application would: a table in an *intent* mode (CR to read rows, CW to update rows, PR
to scan the whole table, EX to change its schema), then the row (PR to read, EX to update).
A row's value block holds its version: every update reads it, adds one and writes it back on
release. The demo keeps an NL lock on every table and row, which keeps the value blocks alive
between updates (a resource disappears with its last lock, G9). Two workers also run a
deliberate deadlock (row A then B against row B then A); the deadlock detector picks a victim,
which backs off and retries.

At the end the demo checks that every row's version equals the number of updates the
workers committed to it: no lost update, no stale read.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .client import DLM
from .engine.modes import Mode
from .errors import Deadlock, DLMError, LockTimeout

TABLES = ("db/orders", "db/users")
ROWS = tuple(f"row:{i}" for i in range(6))
NAMESPACE = "demo"


@dataclass
class DemoResult:
    seconds: float
    workers: int
    per_worker: list[dict] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)
    deadlock_victims: int = 0
    consistent: bool = False

    @property
    def totals(self) -> Counter:
        c: Counter = Counter()
        for w in self.per_worker:
            c.update(w["ops"])
        return c


def _update_row(table_lock, row: str, timeout: float) -> None:
    with table_lock.lock(row, Mode.EX, timeout=timeout) as r:
        r.value = str(int(r.value or b"0") + 1).encode()


def _deadlock(idx: int, dlm: DLM, barrier, ops: Counter, committed: Counter) -> int:
    """Worker 0 locks row:0 then row:1, worker 1 row:1 then row:0: a cycle the detector
    must break. Returns 1 if this worker was the victim."""
    a, b = ("row:0", "row:1") if idx == 0 else ("row:1", "row:0")
    table = TABLES[0]
    try:
        barrier.wait(timeout=30)  # both start with no lock held
        with dlm.lock(table, Mode.CW, timeout=30) as t:
            with t.lock(a, Mode.EX, timeout=30) as ra:
                barrier.wait(timeout=30)  # both hold their first row
                try:
                    with t.lock(b, Mode.EX, timeout=30) as rb:
                        ra.value = str(int(ra.value or b"0") + 1).encode()
                        rb.value = str(int(rb.value or b"0") + 1).encode()
                except Deadlock:
                    ops["deadlock victim"] += 1
                    return 1
        committed[f"{table}/{a}"] += 1
        committed[f"{table}/{b}"] += 1
        ops["deadlock survivor"] += 1
    except threading.BrokenBarrierError:
        ops["deadlock skipped"] += 1
    return 0


def _worker(idx: int, urls: Sequence[str], seconds: float, out: mp.Queue,
            progress, barrier, deadlock_pair: bool) -> None:
    rng = random.Random(idx * 7919)
    ops: Counter = Counter()
    committed: Counter = Counter()
    victims = 0
    dlm = DLM(urls, namespace=NAMESPACE, lease_ms=5_000)
    did_deadlock = False
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            table = rng.choice(TABLES)
            op = rng.random()
            try:
                if deadlock_pair and not did_deadlock:
                    did_deadlock = True
                    victims += _deadlock(idx, dlm, barrier, ops, committed)
                    continue
                if op < 0.04:  # schema change: the whole table, exclusively
                    with dlm.lock(table, Mode.EX, timeout=5):
                        time.sleep(0.002)
                    ops["table EX"] += 1
                elif op < 0.12:  # full scan: table PR keeps writers (CW) out
                    with dlm.lock(table, Mode.PR, timeout=5) as t:
                        for row in ROWS[:3]:
                            with t.lock(row, Mode.CR, timeout=5):
                                pass
                    ops["table PR scan"] += 1
                elif op < 0.5:  # read one row
                    with dlm.lock(table, Mode.CR, timeout=5) as t:
                        with t.lock(rng.choice(ROWS), Mode.PR, timeout=5) as r:
                            int(r.value or b"0")
                    ops["row PR read"] += 1
                else:  # update one row: intent write on the table, EX on the row
                    row = rng.choice(ROWS)
                    with dlm.lock(table, Mode.CW, timeout=5) as t:
                        _update_row(t, row, timeout=5)
                    committed[f"{table}/{row}"] += 1
                    ops["row EX update"] += 1
                with progress.get_lock():
                    progress.value += 1
            except (LockTimeout, Deadlock) as exc:
                ops[type(exc).__name__] += 1
                time.sleep(rng.random() * 0.01)
    finally:
        dlm.close()
        out.put({"worker": idx, "ops": dict(ops), "committed": dict(committed),
                 "victims": victims})


def run_demo(urls: Sequence[str], *, workers: int = 4, seconds: float = 6.0,
             detector: bool = True, detector_interval: float = 0.3,
             report: Callable[[float, int, int, int], None] | None = None) -> DemoResult:
    """Run the demo workload against `urls` and check its result. With `detector`, a
    deadlock detector runs in a thread of this process meanwhile. `report(elapsed_s,
    operations, workers_done, workers)` is called about twice a second."""
    from .detector import Detector

    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    progress = ctx.Value("l", 0)
    barrier = ctx.Barrier(2)
    stop = threading.Event()
    det_thread = None
    if detector:
        det = Detector(list(urls), namespace=NAMESPACE, interval_s=detector_interval)
        det_thread = threading.Thread(target=det.run_forever, args=(stop,), daemon=True)
        det_thread.start()
    keeper = DLM(list(urls), namespace=NAMESPACE, lease_ms=5_000)
    try:
        # NL locks keep every table's and row's value block alive between updates
        for table in TABLES:
            t = keeper.lock(table, Mode.NL, timeout=10)
            for row in ROWS:
                t.lock(row, Mode.NL, timeout=10)
        procs = [ctx.Process(target=_worker, args=(i, list(urls), seconds, out, progress,
                                                   barrier, i < 2), daemon=True)
                 for i in range(workers)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        results = []
        while len(results) < workers:
            try:
                results.append(out.get(timeout=0.5))
            except Exception:  # noqa: BLE001 - queue.Empty: time to report progress
                pass
            elapsed = time.monotonic() - t0
            if elapsed > seconds + 60:
                raise DLMError("demo workers did not finish")
            if report is not None:
                report(elapsed, progress.value, len(results), workers)
        for p in procs:
            p.join(timeout=10)
        elapsed = time.monotonic() - t0
        res = DemoResult(seconds=elapsed, workers=workers,
                         per_worker=sorted(results, key=lambda r: r["worker"]))
        committed: Counter = Counter()
        for r in results:
            committed.update(r["committed"])
            res.deadlock_victims += r["victims"]
        res.committed = dict(committed)
        # read every row's version back under the locks
        for table in TABLES:
            with keeper.lock(table, Mode.CR, timeout=10) as t:
                for row in ROWS:
                    with t.lock(row, Mode.CR, timeout=10) as r:
                        res.versions[f"{table}/{row}"] = int(r.value or b"0")
        res.consistent = all(res.versions.get(k, 0) == committed.get(k, 0)
                             for k in set(res.versions) | set(committed))
        return res
    finally:
        stop.set()
        keeper.close()
        if det_thread is not None:
            det_thread.join(timeout=5)
