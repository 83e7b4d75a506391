"""Fault-injection suite: the session summary of every scenario (critical sections, faults
injected, tokens checked, violations), printed at the end of the pytest run."""

from __future__ import annotations

from typing import Any

from .harness import ITERATIONS, SUMMARY


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY:
        return
    tr = terminalreporter
    tr.section(f"fault injection (DLM_FAULT_ITERATIONS={ITERATIONS})")
    tr.write_line(f"{'scenario':44} {'secs':>6} {'sections':>8} {'faults':>6} "
                  f"{'tokens':>7} {'refused':>7} {'lvb':>6} {'viol':>5}")
    tot = dict(sections=0, faults=0, tokens_checked=0, refused=0, lvb_reads_checked=0,
               violations=0)
    for r in SUMMARY:
        nv = len(r["violations"])
        tr.write_line(f"{r['scenario'][:44]:44} {r['seconds']:6.1f} {r['sections']:8d} "
                      f"{r['faults']:6d} {r['tokens_checked']:7d} {r['refused']:7d} "
                      f"{r['lvb_reads_checked']:6d} {nv:5d}")
        for k in ("sections", "faults", "tokens_checked", "refused", "lvb_reads_checked"):
            tot[k] += r[k]
        tot["violations"] += nv
    tr.write_line(f"{'TOTAL':44} {'':6} {tot['sections']:8d} {tot['faults']:6d} "
                  f"{tot['tokens_checked']:7d} {tot['refused']:7d} "
                  f"{tot['lvb_reads_checked']:6d} {tot['violations']:5d}")
