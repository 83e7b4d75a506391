"""Leader election: several replicas, one leads; when it dies another takes over.

Each replica tries to take `election/reporting` in EX without waiting (noqueue). The one
that gets it leads and keeps the lock (renewed in the background); the others retry. Here
the leader "dies" after three rounds by closing its client, and a follower takes over.
Run: python examples/leader_election.py
"""

from __future__ import annotations

import time

from _cluster import instances

from redlockdlm import DLM, Mode
from redlockdlm.errors import NotQueued


def main() -> None:
    with instances() as urls:
        replicas = [DLM(urls, namespace="example", lease_ms=1_000) for _ in range(3)]
        leader = None
        leaders_seen = []
        for rnd in range(8):
            for n, dlm in enumerate(replicas):
                if dlm is None or leader is not None and leader[0] == n:
                    continue
                try:
                    lk = dlm.lock("election/reporting", Mode.EX, noqueue=True)
                    leader = (n, lk)
                    leaders_seen.append(n)
                    print(f"round {rnd}: replica {n} leads (token {lk.token})")
                except NotQueued:
                    pass
            if rnd == 2 and leader is not None:
                n, _ = leader
                print(f"round {rnd}: replica {n} dies")
                replicas[n].close()  # a crash would do the same after one lease
                replicas[n] = None
                leader = None
            time.sleep(0.3)
        for dlm in replicas:
            if dlm is not None:
                dlm.close()
        assert len(leaders_seen) == 2, leaders_seen
        print("leaders, in order:", leaders_seen)


if __name__ == "__main__":
    main()
