"""H4: breaking a lock breaks its subtree. After an operator breaks an owner's lock on a
table, no lock of that owner below the table is left on any instance, the owner's client
sees every one of them lost, and another owner can take EX on the table while nobody holds
a row below it (the DLM rule: a child lock exists only under its granted parent, H1).

Through `dlm break` as a user runs it (a process), and through the library call
`admin.break_locks`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from deadlocks import Cluster

from redlockdlm import DLM, Mode, admin
from redlockdlm.engine.instance import Engine

pytestmark = pytest.mark.timeout(60)

NS = "t"
PY_M = [sys.executable, "-m", "redlockdlm_cli"]


def locks_below(engines: list[Engine], root: str) -> list[tuple[int, str, str, str]]:
    """(instance, resource key, lock id, owner) of every live lock on `root` or below it,
    on every instance."""
    out = []
    prefix = engines[0].key(root)
    for i, e in enumerate(engines):
        keys = [k for k in e.resource_keys() if k == prefix or k.startswith(prefix + b"/")]
        if not keys:
            continue
        _, views = e.inspect(keys)
        for v in views:
            for lk in (v.locks if v is not None else ()):
                if lk.lease_left_ms > 0:
                    out.append((i, v.key.decode(), lk.lock_id, lk.owner))
    return out


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_dlm_break_of_a_table_breaks_the_owners_rows_everywhere(cluster3):
    c = Cluster(cluster3, NS)
    lost: list[str] = []
    seen = threading.Event()

    def on_lost(lk) -> None:
        lost.append(lk.resource)
        if len(lost) == 2:
            seen.set()

    with DLM(cluster3.urls, NS, lease_ms=30_000, owner="old") as a, \
            DLM(cluster3.urls, NS, lease_ms=30_000, owner="new") as b:
        table = a.lock("db/orders", Mode.EX, timeout=5, on_lost=on_lost)
        row = table.lock("row:42", Mode.EX, timeout=5, on_lost=on_lost)
        assert len(locks_below(c.engines, "db/orders")) == 6  # 2 locks x 3 instances
        p = subprocess.run([*PY_M, "break", "db/orders", "--lock", table.id, "--yes", "--json"],
                           env={"DLM_REDIS": ",".join(cluster3.urls), "DLM_NAMESPACE": NS,
                                "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        assert locks_below(c.engines, "db/orders") == []  # nothing of the subtree is left
        doc = json.loads(p.stdout)
        # what went: the row first (children first), then the table, each on 3 instances
        assert [(d["path"], d["lock_id"], d["owner"], d["mode"], len(d["instances"]))
                for d in doc["locks"]] == [
            (["db/orders", "row:42"], row.id, "old", "EX", 3),
            (["db/orders"], table.id, "old", "EX", 3)]
        assert doc["broken"] == 2 and [i["broken"] for i in doc["instances"]] == [2, 2, 2]
        # the broken owner's client sees both locks lost, the row included
        assert seen.wait(5.0), lost
        assert sorted(lost) == ["db/orders", "db/orders / row:42"]
        assert not row.valid and not table.valid
        # another owner takes EX on the table, and nobody holds a row below it
        t2 = b.lock("db/orders", Mode.EX, timeout=3)
        assert [o for _, _, _, o in locks_below(c.engines, "db/orders")] == ["new"] * 3
        r2 = t2.lock("row:42", Mode.EX, timeout=3)
        r2.release()
        t2.release()


def test_dlm_break_text_output_and_plan_list_the_locks_below(cluster3):
    c = Cluster(cluster3, NS)
    c.request("a", "t1", ["db/orders"], "PW", ticket=1)
    c.request("a", "r1", ["db/orders", "row:42"], "EX", ticket=2, parent=(["db/orders"], "t1"))
    p = subprocess.run([*PY_M, "break", "db/orders", "--owner", "a"], input="n\n",
                       env={"DLM_REDIS": ",".join(cluster3.urls), "DLM_NAMESPACE": NS,
                            "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "with 1 lock(s) below: db/orders / row:42: r1 of a (EX)" in p.stderr
    assert len(locks_below(c.engines, "db/orders")) == 6  # declined: nothing broken
    p = subprocess.run([*PY_M, "break", "db/orders", "--owner", "a", "--yes"],
                       env={"DLM_REDIS": ",".join(cluster3.urls), "DLM_NAMESPACE": NS,
                            "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["resource", "lock", "owner", "mode", "instances"]
    assert lines[1].split() == ["db/orders", "/", "row:42", "r1", "a", "EX", "3/3"]
    assert lines[2].split() == ["db/orders", "t1", "a", "PW", "3/3"]
    assert lines[-1] == "broke 2 lock(s) on db/orders and below it"
    assert locks_below(c.engines, "db/orders") == []


def test_library_break_by_owner_takes_the_subtrees_depth_first(cluster3):
    """admin.break_locks: an owner's two locks on the table, a row below one and a column
    below the row, a waiting row of another owner: every lock of the broken subtrees goes,
    children first, on every instance; the other owner's queued row is then granted."""
    c = Cluster(cluster3, NS)
    with c.listen("a") as events:
        c.request("a", "t1", ["db/orders"], "PR", ticket=1)
        c.request("a", "t2", ["db/orders"], "PR", ticket=2)
        c.request("a", "r1", ["db/orders", "row:42"], "EX", ticket=3,
                  parent=(["db/orders"], "t1"))
        c.request("a", "k1", ["db/orders", "row:42", "col"], "PW", ticket=4,
                  parent=(["db/orders", "row:42"], "r1"))
        c.request("b", "tb", ["db/orders"], "CR", ticket=5)
        c.request("b", "rb", ["db/orders", "row:42"], "EX", ticket=6,
                  parent=(["db/orders"], "tb"))  # waits behind a's row
        result = admin.break_locks(admin.connect(cluster3.urls, NS), ["db/orders"], owner="a")
        assert result.failed == []
        assert {lid for _, _, lid, o in locks_below(c.engines, "db/orders") if o == "a"} == set()
        assert [(b.path, b.lock_id, b.owner, b.mode, b.instances) for b in result.locks] == [
            ((b"db/orders", b"row:42", b"col"), "k1", "a", Mode.PW, tuple(cluster3.urls)),
            ((b"db/orders", b"row:42"), "r1", "a", Mode.EX, tuple(cluster3.urls)),
            ((b"db/orders",), "t1", "a", Mode.PR, tuple(cluster3.urls)),
            ((b"db/orders",), "t2", "a", Mode.PR, tuple(cluster3.urls))]
        assert c.queues(["db/orders", "row:42"], "rb") == ["G"] * 3  # the row's queue moved
        for lid in ("k1", "r1", "t1", "t2"):  # the owner is told of each, on each instance
            events.wait_for(f"C|{lid}|broken".encode(), count=3)
            assert events.received.count(f"C|{lid}|broken".encode()) == 3
