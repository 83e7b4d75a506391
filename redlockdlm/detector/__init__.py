"""The deadlock detector (docs/design.md §7; rules D1-D9 in docs/detector.md).

A pipeline of pure steps, then one job that runs them on a schedule::

    snap = scan(engines)               # read-only: waiter index + scan.lua, instances in parallel
    graph = wait_for_graph(snap)       # owners, and who waits for whom (D2-D5)
    cycles = find_cycles(graph)        # Tarjan's strongly connected components (D6)
    victim = choose_victim(cycle, snap)  # lowest priority, youngest ticket; not NODLCKWT (D8)

    Detector(urls, "shop", interval_s=0.5).run_forever(stop_event)

`Detector.run_once` confirms a cycle only when the same locks deadlock on two consecutive
scans (D7; `run_forever` makes the second one a `confirm_pending` round that re-reads only
the cycle's resources; between full rounds, `watch` rounds read only the waiter indexes and
the resources of new entries, so a new cycle is seen without waiting for a full scan), so a
state that only looks like a cycle for a moment (a split vote being yielded, a grant in
flight) is never punished; it then cancels the victim's waiting request on every instance
with reason ``deadlock``, which publishes ``C|<id>|deadlock`` to the victim's owner; its
client raises `Deadlock`. `reap` clears waiter-index entries whose
lease ran out (D9).

Only one detector should act at a time: pass `leader`, a callable that says whether this
process leads (e.g. holds a lock of this DLM); without it the detector always acts.

The modules: `scanning` (D1: the read, the wire format of `lua/scan.lua`, `ScanMemo`),
`graph` (D2-D8: the wait-for graph, cycles, the victim; pure), `job` (`Detector`, `reap`).
Their public names are re-exported here (and the private ones tests use); a module-level
setting (`scanning.SCAN_CHUNK`) is changed in the module that reads it.
"""

from .graph import (
    Cycle,
    Edge,
    GraphMemo,
    WaitForGraph,
    WaitingRequest,
    choose_victim,
    find_cycles,
    wait_for_graph,
)
from .graph import _cyclic_core as _cyclic_core
from .graph import _tarjan as _tarjan
from .job import Detector, Judgement, ReapResult, Round, Victim, judge, reap
from .scanning import _FIELDS as _FIELDS
from .scanning import InstanceScan, ScanMemo, ScannedLock, ScannedResource, Snapshot, scan
from .scanning import _gc_paused as _gc_paused
from .scanning import _parse_scan as _parse_scan
from .scanning import _read_resources as _read_resources

__all__ = [
    "Cycle",
    "Detector",
    "Edge",
    "GraphMemo",
    "InstanceScan",
    "Judgement",
    "ScannedLock",
    "ReapResult",
    "WaitingRequest",
    "ScannedResource",
    "Round",
    "ScanMemo",
    "Snapshot",
    "Victim",
    "WaitForGraph",
    "choose_victim",
    "find_cycles",
    "judge",
    "reap",
    "scan",
    "wait_for_graph",
]
