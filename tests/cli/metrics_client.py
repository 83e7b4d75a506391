"""A client process for tests/cli/test_metrics_process.py: serves its metrics over HTTP and
runs known operations with two owners (DLM clients) of one process.

    python metrics_client.py URL,URL,URL NAMESPACE

Prints ``port N`` once its metrics are served, then ``ready`` once these are done:
4 grants (R1 by a, R2 by b, then R2 or R1 for the one of a and b that was not the
deadlock victim, once the victim let go, and R3 by a), 1 timeout (b on R1 while a holds it),
1 deadlock victim (a on R2 and b on R1 at once: the detector running beside cancels one),
and last a request left waiting (b on R3, which a holds). Then waits for stdin to close,
and closes both clients.
"""

from __future__ import annotations

import sys
import threading

from redlockdlm import DLM, metrics
from redlockdlm.errors import Deadlock, LockTimeout


def main() -> None:
    urls, ns = sys.argv[1].split(","), sys.argv[2]
    stop = metrics.serve(0)
    print("port", stop.port, flush=True)
    a = DLM(urls, ns, lease_ms=2_000)
    b = DLM(urls, ns, lease_ms=2_000)
    held = {"a": a.lock("R1"), "b": b.lock("R2")}
    try:
        b.lock("R1", timeout=0.2)
        raise SystemExit("b got R1 while a held it")
    except LockTimeout:
        print("timeout", flush=True)
    outcome: dict[str, str] = {}

    def ask(who: str, dlm: DLM, resource: str) -> None:
        try:
            got = dlm.lock(resource, timeout=30)
        except Deadlock:
            outcome[who] = "deadlock"
            held.pop(who).release()  # the victim lets go: the other is granted
            return
        outcome[who] = "granted"
        got.release()

    threads = [threading.Thread(target=ask, args=("a", a, "R2")),
               threading.Thread(target=ask, args=("b", b, "R1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    print("outcomes", sorted(outcome.values()), flush=True)
    for lk in held.values():
        lk.release()
    a.lock("R3")
    b.enqueue("R3")  # waits for a: one waiting request, indexed on every instance
    print("ready", flush=True)
    sys.stdin.read()
    a.close()
    b.close()
    stop()


if __name__ == "__main__":
    main()
