"""Code run in child processes by the quorum tests (importable, no pytest).

- ``holder`` (run as ``python -m quorum.workers holder ...``): takes one lock, prints its
  token, then sleeps until killed.
- ``critical_sections``: a multiprocessing worker looping over a few resources with random
  modes, recording every critical section to its own file for an outside observer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

from redlockdlm import DLM, Mode
from redlockdlm.errors import DLMError

MODES = (Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX)


def holder(kind: str, urls: list[str], namespace: str, resource: str, lease_ms: int) -> None:
    """Take `resource` in EX with lease `lease_ms`, print the token, sleep forever."""
    if kind == "async":
        from redlockdlm.aio import AsyncDLM

        async def run() -> None:
            d = AsyncDLM(urls, namespace, lease_ms=lease_ms)
            lk = await d.lock(resource, Mode.EX, timeout=10)
            print(lk.token, flush=True)
            await asyncio.sleep(3600)

        asyncio.run(run())
    else:
        d = DLM(urls, namespace, lease_ms=lease_ms)
        lk = d.lock(resource, Mode.EX, timeout=10)
        print(lk.token, flush=True)
        time.sleep(3600)


def critical_sections(urls: list[str], namespace: str, resources: list[str], seconds: float,
                      out_path: str, seed: int, lease_ms: int, socket_timeout: float,
                      go) -> None:
    """Loop until `seconds` have passed: lock a random resource in a random mode, hold it a
    moment, release. Each critical section is appended to `out_path` at once (so a worker
    killed later still has its sections observed) as a JSON line
    [resource, mode, start_ns, end_ns, token, pid, still_valid]; errors go in a last line
    {"errors": {...}}. The file exists once the worker is connected; it starts when the
    event `go` is set."""
    rng = random.Random(seed)
    pid = os.getpid()
    errors: dict[str, int] = {}
    with open(out_path + ".tmp", "w", buffering=1) as out, DLM(
            urls, namespace, lease_ms=lease_ms, socket_timeout=socket_timeout,
            connect_timeout=socket_timeout) as d:
        out.flush()
        os.replace(out_path + ".tmp", out_path)  # "ready": the observer waits for all
        go.wait(60)  # every worker starts together
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            res = rng.choice(resources)
            mode = rng.choice(MODES)
            try:
                lk = d.lock(res, mode, timeout=5)
            except DLMError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            start = time.monotonic_ns()
            if lk.valid:  # a section only counts while the lock is known valid
                time.sleep(rng.random() * 0.003)
                end = time.monotonic_ns()
                out.write(json.dumps([res, int(mode), start, end, lk.token, pid, lk.valid])
                          + "\n")
            try:
                lk.release()
            except DLMError as exc:
                key = "release:" + type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
        out.write(json.dumps({"errors": errors}) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "holder":
        holder(sys.argv[2], sys.argv[3].split(","), sys.argv[4], sys.argv[5], int(sys.argv[6]))
