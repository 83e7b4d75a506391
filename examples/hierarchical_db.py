"""Hierarchical database locking: table intent locks, row locks, and a table scan.

Updaters take the table in CW (intent to write rows) and one row in EX; a reporter takes
the table in PR to scan it consistently, which waits for the updaters in CW and keeps new
ones out until it is done. Row versions live in the rows' value blocks.
Run: python examples/hierarchical_db.py
"""

from __future__ import annotations

import threading

from _cluster import instances

from redlockdlm import DLM, Mode


def update(dlm: DLM, row: str, times: int) -> None:
    for _ in range(times):
        with dlm.lock("db/orders", Mode.CW) as table:
            with table.lock(row, Mode.EX) as r:
                r.value = str(int(r.value or b"0") + 1).encode()


def main() -> None:
    with instances() as urls:
        keeper = DLM(urls, namespace="example")
        table = keeper.lock("db/orders", Mode.NL)
        for row in ("row:1", "row:2"):
            table.lock(row, Mode.NL)  # keep the row versions alive between updates
        clients = [DLM(urls, namespace="example") for _ in range(3)]
        threads = [threading.Thread(target=update, args=(c, f"row:{1 + i % 2}", 20))
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        reporter = DLM(urls, namespace="example")
        with reporter.lock("db/orders", Mode.PR) as scan:  # no CW writer inside meanwhile
            versions = {}
            for row in ("row:1", "row:2"):
                with scan.lock(row, Mode.CR) as r:
                    versions[row] = int(r.value or b"0")
            print("consistent snapshot during the updates:", versions)
        for t in threads:
            t.join()
        with reporter.lock("db/orders", Mode.CR) as t:
            final = {row: int(t.lock(row, Mode.CR).value or b"0") for row in ("row:1", "row:2")}
        print("final versions:", final)
        assert final == {"row:1": 40, "row:2": 20}
        for c in [*clients, reporter, keeper]:
            c.close()


if __name__ == "__main__":
    main()
