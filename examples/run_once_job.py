"""A job that must run once: the nightly report, started by every replica's scheduler.

Each replica tries the EX lock `jobs/nightly-2026-11-27` without waiting; the winner runs
the job and records completion in the value block, so replicas that come later (even after
the winner released) see it is done. The fencing token goes to the output store, which
refuses a stale writer.
Run: python examples/run_once_job.py
"""

from __future__ import annotations

import threading

from _cluster import instances

from redlockdlm import DLM, Mode
from redlockdlm.errors import NotQueued

RUNS = []


def replica(urls: list[str], name: str, keeper_ready: threading.Event) -> None:
    keeper_ready.wait()
    with DLM(urls, namespace="example") as dlm:
        try:
            with dlm.lock("jobs/nightly-2026-11-27", Mode.EX, noqueue=True) as job:
                if job.value == b"done":
                    print(f"{name}: already done")
                    return
                RUNS.append((name, job.token))
                print(f"{name}: running the job with fencing token {job.token}")
                job.value = b"done"
        except NotQueued:
            print(f"{name}: another replica is running it")


def main() -> None:
    with instances() as urls:
        keeper = DLM(urls, namespace="example")
        keeper.lock("jobs/nightly-2026-11-27", Mode.NL)  # keeps "done" visible
        ready = threading.Event()
        threads = [threading.Thread(target=replica, args=(urls, f"replica-{i}", ready))
                   for i in range(4)]
        for t in threads:
            t.start()
        ready.set()
        for t in threads:
            t.join()
        replica(urls, "late replica", ready)
        keeper.close()
        assert len(RUNS) == 1, RUNS
        print("the job ran once:", RUNS)


if __name__ == "__main__":
    main()
