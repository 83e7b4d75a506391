"""Every `dlm` command through click's CliRunner, against three real redis-servers.

Checks the result (JSON parsed back, text for people), the exit code (0 OK, 1 failed,
2 usage) and that every error is one line on stderr.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import time
from collections.abc import Sequence

import click
import pytest
import redis
from click.testing import CliRunner, Result
from deadlocks import Cluster
from redis_harness import free_port
from redlockdlm_cli.common import ExitCode, Failed, exit_for
from redlockdlm_cli.main import cli

from redlockdlm.devcluster import DevClusterError
from redlockdlm.engine import scripts
from redlockdlm.engine.keys import EPOCH_KEY
from redlockdlm.engine.modes import Flag
from redlockdlm.errors import BadArgument, Deadlock, InvalidArgument, QuorumUnavailable

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def c(cluster3) -> Cluster:
    return Cluster(cluster3)


def dlm(c: Cluster | None, *args: str, input: str | None = None, env: dict | None = None
        ) -> Result:
    e = {"DLM_NAMESPACE": "t", "DLM_REDIS": ",".join(c.urls) if c else None}
    e.update(env or {})
    return CliRunner().invoke(cli, list(args), input=input, env=e, catch_exceptions=False)


def one_line_error(r: Result) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlm: error: "), r.stderr
    return lines[0]


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}"


def deadlock(c: Cluster) -> None:
    c.request("a", "a1", ["R1"], "EX", ticket=1)
    c.request("b", "b1", ["R2"], "EX", ticket=2)
    c.request("a", "a2", ["R2"], "EX", ticket=3)
    c.request("b", "b2", ["R1"], "EX", ticket=4)


# ----------------------------------------------------------------- status


def test_status_text_and_json(c):
    c.request("a", "a1", ["R"], "EX", ticket=1)
    c.request("b", "b1", ["R"], "EX", ticket=2)
    r = dlm(c, "status")
    assert r.exit_code == ExitCode.OK, r.output
    assert "3 of 3 instances reachable, 3 can grant, quorum 2: OK" in r.stdout
    r = dlm(c, "status", "--json")
    doc = json.loads(r.stdout)
    assert (doc["quorum"], doc["reachable"], doc["namespace"]) == (2, 3, "t")
    for inst, url in zip(doc["instances"], c.urls):
        assert inst["url"] == url and inst["reachable"]
        assert inst["persistence"] == "no aof"  # (the harness: --appendonly no)
        assert (inst["locks"], inst["waiters"], inst["recovering_ms"]) == (2, 1, 0)
        assert inst["redis_version"] and inst["epoch"] and inst["latency_ms"] >= 0


def test_status_is_ok_with_a_quorum_and_fails_without(c):
    url = closed_port_url()
    r = dlm(None, "status", "--redis", url, "--redis", c.urls[0], "--redis", c.urls[1])
    assert r.exit_code == ExitCode.OK
    r = dlm(None, "status", "--json", "--redis", url, "--redis", c.urls[0], "--redis",
            closed_port_url())
    assert r.exit_code == ExitCode.FAILED
    doc = json.loads(r.stdout)
    assert [i["reachable"] for i in doc["instances"]] == [False, True, False]
    # (under --json the error is one JSON line on stderr too)
    (line,) = r.stderr.strip().splitlines()
    err = json.loads(line)
    assert err["exit_code"] == ExitCode.FAILED
    assert "only 1 of 3 instances reachable (quorum 2)" in err["error"]
    r = dlm(None, "status", "--redis", url, "--redis", c.urls[0], "--redis",
            closed_port_url())
    assert "only 1 of 3 instances reachable (quorum 2)" in one_line_error(r)


def test_status_fails_when_reachable_instances_cannot_grant(c):
    """Two of three instances flushed (as a restart without persistence): reachable, but
    without an epoch, then (after a request reached them) in their rejoin window (E1): no
    grant is possible, so status must not say OK; it names them and exits 1. One is
    enough to grant beside the intact third."""
    for u in c.urls[:2]:
        redis.Redis.from_url(u).flushall()
    r = dlm(c, "status")
    assert r.exit_code == ExitCode.FAILED, r.output
    assert "1 can grant, quorum 2: NO GRANT POSSIBLE NOW" in r.stdout
    err = one_line_error(r)
    assert "no grant possible now" in err and all(u in err for u in c.urls[:2]), err
    assert "dlm init --fresh" in err
    c.request("a", "a1", ["R"], "EX", ticket=1)  # (every instance: starts their windows)
    r = dlm(c, "status", "--json")
    assert r.exit_code == ExitCode.FAILED
    doc = json.loads(r.stdout)
    assert doc["granting"] == 1
    assert [i["can_grant"] for i in doc["instances"]] == [False, False, True]
    assert all(i["recovering_ms"] > 0 and "rejoin window" in i["not_granting"]
               for i in doc["instances"][:2])
    # (held locks' leases run out in the window; an operator who knows these servers are
    # new may end it: then status is OK again)
    r = dlm(c, "init", "--fresh", "--force", "--yes", "--redis", c.urls[0], "--redis",
            c.urls[1])
    assert r.exit_code == ExitCode.OK, r.output
    r = dlm(c, "status")
    assert r.exit_code == ExitCode.OK and "3 can grant" in r.stdout, r.output


def test_status_names_instances_restarted_with_their_data(c):
    """An instance restarted with its data (AOF, RDB) keeps the epoch of its previous server
    process until the first call replaces it by a new one in its rejoin window (E2); status
    must not count it as able to grant meanwhile. (The restart is played here by giving two
    epochs another run_id and reloading the library, as a new process starts with it.)"""
    c.request("a", "a1", ["R"], "EX", ticket=1)
    for u in c.urls[:2]:
        r = redis.Redis.from_url(u)
        eid = r.hget(EPOCH_KEY, "id")
        run = r.info("server")["run_id"][:8]
        new = eid.rsplit(b".", 1)[0] + (b".11111111" if run != "11111111" else b".22222222")
        joined = r.hget(EPOCH_KEY, "all")  # (the same id in the joined field, design.md §3)
        r.hset(EPOCH_KEY, mapping={"id": new, "all": new + joined[len(eid):]})
        r.execute_command(*scripts.load_command())
    r = dlm(c, "status")
    assert r.exit_code == ExitCode.FAILED, r.output
    err = one_line_error(r)
    assert "restarted with its data" in err and "E2" in err, err
    assert all(u in err for u in c.urls[:2]) and c.urls[2] not in err, err
    c.request("b", "b1", ["R2"], "EX", ticket=2)  # (every instance: replaces their epochs)
    doc = json.loads(dlm(c, "status", "--json").stdout)
    assert [i["can_grant"] for i in doc["instances"]] == [False, False, True]
    assert all(i["recovering_ms"] > 0 and "rejoin window (E1)" in i["not_granting"]
               for i in doc["instances"][:2])


def test_status_masks_passwords():
    r = dlm(None, "status", "--redis", closed_port_url().replace("//", "//:hunter2@"))
    assert r.exit_code == ExitCode.FAILED
    assert "hunter2" not in r.output and "***" in r.stdout


# ----------------------------------------------------------------- namespaces


def test_namespaces_lists_every_namespace_with_keys(c):
    c.request("a", "a1", ["R1"], "EX", ticket=1)  # (namespace "t")
    for u in c.urls[:2]:  # a second namespace on two instances only
        redis.Redis.from_url(u).set(b"dlm:{billing:r}", b"x")
    r = dlm(c, "namespaces", "--json")
    assert r.exit_code == ExitCode.OK, r.output
    doc = json.loads(r.stdout)
    got = {d["namespace"]: d["keys"] for d in doc["namespaces"]}
    assert got["t"] == {u: 1 for u in c.urls}
    assert got["billing"] == {c.urls[0]: 1, c.urls[1]: 1}
    text = dlm(c, "namespaces").stdout
    assert text.splitlines()[0].split()[0] == "NAMESPACE" and "billing" in text


# ----------------------------------------------------------------- ls


def test_ls_lists_the_union_of_instances(c):
    c.request("a", "a1", ["R1"], "PR", ticket=1)
    c.request("b", "b1", ["R1"], "PR", ticket=2)
    c.request("c", "c1", ["R1"], "EX", ticket=3)
    c.request("a", "a2", ["db/orders"], "CR", ticket=4)
    c.request("a", "a3", ["db/orders", "row:42"], "EX", ticket=5, parent=(["db/orders"], "a2"))
    c.request("z", "z1", ["only-on-0"], "EX", ticket=6, on=[0])
    r = dlm(c, "ls", "--json")
    assert r.exit_code == ExitCode.OK, r.output
    doc = {res["name"]: res for res in json.loads(r.stdout)["resources"]}
    assert list(doc) == ["R1", "db/orders", "db/orders / row:42", "only-on-0"]
    assert [lk["owner"] for lk in doc["R1"]["granted"]] == ["a", "b"]
    assert [(lk["owner"], lk["requested"]) for lk in doc["R1"]["waiting"]] == [("c", "EX")]
    assert doc["db/orders / row:42"]["path"] == ["db/orders", "row:42"]
    assert doc["only-on-0"]["on"] == 1 and doc["only-on-0"]["divergent"]
    assert not doc["R1"]["divergent"]
    text = dlm(c, "ls").stdout
    assert "2 PR PR" in text and "1 EX" in text and "divergent" in text


def test_ls_prefix_selects_by_path(c):
    c.request("a", "a1", ["db/orders"], "CR", ticket=1)
    c.request("a", "a2", ["db/orders", "row:42"], "EX", ticket=2, parent=(["db/orders"], "a1"))
    c.request("a", "a3", ["db/orders", "col:1"], "EX", ticket=3, parent=(["db/orders"], "a1"))
    c.request("a", "a4", ["dbx"], "EX", ticket=4)
    c.request("a", "a5", ["other"], "EX", ticket=5)

    def names(*prefix: str) -> list[str]:
        r = dlm(c, "ls", "--json", *prefix)
        assert r.exit_code == ExitCode.OK
        return [res["name"] for res in json.loads(r.stdout)["resources"]]

    assert names("db/") == ["db/orders", "db/orders / col:1", "db/orders / row:42"]
    assert names("db/orders", "row:") == ["db/orders / row:42"]
    assert names("db") == ["db/orders", "db/orders / col:1", "db/orders / row:42", "dbx"]
    assert names("nothing") == []
    assert "no resources" in dlm(c, "ls", "nothing").stdout


# ----------------------------------------------------------------- show


def test_show_queues_value_block_and_fencing(c):
    c.request("w", "w1", ["R"], "PW", ticket=1)
    for e in c.engines:
        e.convert(c.key(["R"]), "w", "w1", "NL", ticket=2, lease_ms=30_000, value=b"hi\x00!",
                  version=7)
    c.request("a", "a1", ["R"], "PR", ticket=3)
    c.request("b", "b1", ["R"], "NL", ticket=4)
    c.convert("b", "b1", ["R"], "EX", ticket=5)
    c.request("c", "c1", ["R"], "CR", ticket=6, flags=Flag.NODLCKWT)
    r = dlm(c, "show", "R")
    assert r.exit_code == ExitCode.OK, r.output
    out = r.stdout
    for heading in ("Granted", "Conversion", "Waiting"):
        assert f"\n{heading}\n" in out
    assert out.index("Granted") < out.index(" a1 ") < out.index("Conversion")
    assert out.index("Conversion") < out.index("NL (EX)") < out.index("Waiting")
    assert out.index("Waiting") < out.index("-- (CR)") and "NODLCKWT" in out
    assert "68690021" in out and '"hi.!"' in out
    doc = json.loads(dlm(c, "show", "R", "--json").stdout)
    assert [lk["lock_id"] for lk in doc["granted"]] == ["w1", "a1"]
    assert [(lk["lock_id"], lk["granted"], lk["requested"]) for lk in doc["converting"]] == [
        ("b1", "NL", "EX")]
    assert [lk["lock_id"] for lk in doc["waiting"]] == ["c1"]
    # no mode is null everywhere in JSON (it said "--" per instance, null at the top)
    (a1,) = [lk for lk in doc["granted"] if lk["lock_id"] == "a1"]
    assert a1["requested"] is None
    assert {v["requested"] for v in a1["instances"].values()} == {None}
    (c1,) = doc["waiting"]
    assert c1["granted"] is None and {v["granted"] for v in c1["instances"].values()} == {None}
    for inst in doc["instances"]:
        assert (inst["value_hex"], inst["version"], inst["valid"]) == ("68690021", 7, True)
        assert inst["fencing_seq"] > 0
    assert doc["divergence"] == []
    assert doc["granted"][1]["lease_left_ms"] > 0 and doc["granted"][1]["token"] > 0


def test_show_reports_divergence(c):
    c.request("a", "a1", ["R"], "EX", ticket=1, on=[0, 1])
    c.request("b", "b1", ["R"], "EX", ticket=2, on=[2])
    c.request("a", "a1", ["R"], "EX", ticket=1, on=[2])
    doc = json.loads(dlm(c, "show", "R", "--json").stdout)
    text = " | ".join(doc["divergence"])
    assert "lock a1 (a): granted EX on" in text and "waiting -- (EX) on" in text
    assert "lock b1 (b) absent on" in text
    assert "Divergence" in dlm(c, "show", "R").stdout


def test_show_child_by_path_and_missing_resource(c):
    c.request("a", "a1", ["db/orders"], "CR", ticket=1)
    c.request("a", "a2", ["db/orders", "row:42"], "EX", ticket=2, parent=(["db/orders"], "a1"))
    doc = json.loads(dlm(c, "show", "db/orders", "row:42", "--json").stdout)
    assert doc["path"] == ["db/orders", "row:42"] and doc["granted"][0]["parent"] == "a1"
    r = dlm(c, "show", "row:42")
    assert r.exit_code == ExitCode.FAILED
    assert "no resource row:42" in one_line_error(r)


# ----------------------------------------------------------------- break


def test_break_asks_then_breaks_everywhere_and_tells_the_owner(c):
    c.request("a", "a1", ["R"], "EX", ticket=1)
    c.request("b", "b1", ["R"], "EX", ticket=2)
    r = dlm(c, "break", "R", "--lock", "a1", input="n\n")
    assert r.exit_code == ExitCode.FAILED
    assert "Break 1 lock(s) on R: a1 of a (EX)" in r.stderr
    assert "nothing broken" in r.stderr.splitlines()[-1]
    assert c.queues(["R"], "a1") == ["G"] * 3
    with c.listen("a") as ev:
        r = dlm(c, "break", "R", "--lock", "a1", input="y\n")
        assert r.exit_code == ExitCode.OK, r.output
        ev.wait_for(b"C|a1|broken", count=3)
    assert c.queues(["R"], "a1") == [None] * 3
    assert c.queues(["R"], "b1") == ["G"] * 3  # the queue moved on
    assert c.engines[0].inspect([c.key(["R"])])[1][0].valid is False  # V4: EX holder broken


def test_break_by_owner_with_yes_and_json(c):
    c.request("a", "a1", ["R"], "PR", ticket=1)
    c.request("a", "a2", ["R"], "PR", ticket=2)
    c.request("b", "b1", ["R"], "PR", ticket=3)
    r = dlm(c, "break", "R", "--owner", "a", "--yes", "--json")
    assert r.exit_code == ExitCode.OK
    doc = json.loads(r.stdout)
    assert doc["broken"] == 2 and [i["broken"] for i in doc["instances"]] == [2, 2, 2]
    assert c.queues(["R"], "b1") == ["G"] * 3


def test_break_of_nothing_fails(c):
    c.request("a", "a1", ["R"], "EX", ticket=1)
    r = dlm(c, "break", "R", "--lock", "nope", "--yes")
    assert r.exit_code == ExitCode.FAILED
    assert "no live lock nope on R" in one_line_error(r)


@pytest.mark.parametrize("args", [
    ["break", "R"], ["break", "R", "--lock", "x", "--owner", "y"], ["break", "--lock", "x"],
    ["break", "R", "--lock", "bad id!", "--yes"],
])
def test_break_usage_errors(c, args):
    r = dlm(c, *args)
    assert r.exit_code == ExitCode.USAGE
    one_line_error(r)


# ----------------------------------------------------------------- top


def busy_cluster(c: Cluster) -> None:
    """Four resources whose busiest-first order is hot, old, conv, calm: more requests not
    granted first (hot: 2), then among equals the longest wait (old's waiter asked 10
    minutes ago, conv's conversion 30 s ago), then the one nobody waits for. Tickets are the
    requesters' microsecond clocks (G11), as clients make them."""
    now = time.time_ns() // 1000
    c.request("k", "k1", ["calm"], "CR", ticket=now - 900_000_000)
    c.request("g", "g1", ["conv"], "PR", ticket=now - 800_000_000)
    c.request("h", "h1", ["conv"], "PR", ticket=now - 700_000_000)
    c.convert("h", "h1", ["conv"], "EX", ticket=now - 30_000_000)
    c.request("e", "e1", ["old"], "EX", ticket=now - 650_000_000)
    c.request("f", "f1", ["old"], "PR", ticket=now - 600_000_000)
    c.request("a", "a1", ["hot"], "PR", ticket=now - 60_000_000)
    c.request("b", "b1", ["hot"], "EX", ticket=now - 20_000_000)
    c.request("d", "d1", ["hot"], "EX", ticket=now - 10_000_000)


def rows(text: str, names: Sequence[str]) -> dict[str, str]:
    """The table line of each resource name, by its first cell."""
    out = {}
    for line in text.splitlines():
        first = line.split(" ", 1)[0]
        if first in names:
            out[first] = line
    return out


def test_top_once_shows_the_busiest_resource_first(c):
    busy_cluster(c)
    r = dlm(c, "top", "--once")
    assert r.exit_code == ExitCode.OK, r.output
    out = r.stdout
    assert "namespace t" in out and "3/3 reachable" in out and "0 recovering" in out
    found = rows(out, ["hot", "old", "conv", "calm"])
    assert list(found) == ["hot", "old", "conv", "calm"], out
    hot = found["hot"].split()
    assert hot[1] == "a:PR" and hot[2] == "-" and hot[3:6] == ["2", "b:EX", "d:EX"], out
    assert re.fullmatch(r"2\d\.\ds", hot[6]) and re.fullmatch(r"\d+\.\ds", hot[7]), out
    assert "f:PR" in found["old"] and re.search(r" 10m0\ds ", found["old"]), out
    conv = found["conv"].split()
    assert conv[1:4] == ["g:PR", "h:PR>EX", "0"], out  # (a converting lock is in C only)
    assert found["calm"].split()[1:4] == ["k:CR", "-", "0"], out
    r = dlm(c, "top", "--once", "--limit", "2")
    assert list(rows(r.stdout, ["hot", "old", "conv", "calm"])) == ["hot", "old"]
    assert "4 resource(s) with live locks, the 2 busiest shown" in r.stdout
    doc = json.loads(dlm(c, "top", "--json").stdout)
    assert [x["name"] for x in doc["resources"]] == ["hot", "old", "conv", "calm"]
    assert [x["not_granted"] for x in doc["resources"]] == [2, 1, 1, 0]
    assert 600_000 <= doc["resources"][1]["oldest_wait_ms"] < 660_000
    assert doc["resources"][3]["oldest_wait_ms"] is None
    assert [lk["owner"] for lk in doc["resources"][0]["waiting"]] == ["b", "d"]
    assert (doc["reachable"], doc["total"], doc["recovering"]) == (3, 3, [])


def test_top_frame_renders_to_a_string(c):
    """The frame is a pure function of one snapshot: rendered twice it is the same text;
    it names an instance that does not answer and one in its rejoin window (E1), says
    that no grant is possible then, flags a divergent resource, and prints a name as it
    is (no markup)."""
    from redlockdlm_cli.top import frame
    from rich.console import Console

    from redlockdlm import admin

    redis.Redis.from_url(c.urls[0]).flushall()
    now = time.time_ns() // 1000
    c.request("a", "a1", ["[red]x"], "EX", ticket=now - 5_000_000)  # opens 0's window
    c.request("b", "b1", ["[red]x"], "EX", ticket=now - 3_000_000)
    c.request("z", "z1", ["only-on-1"], "EX", ticket=now, on=[1])
    dead = closed_port_url()
    snap = admin.top(admin.connect([*c.urls, dead], "t", timeout_s=0.5), "t")

    def render() -> str:
        console = Console(record=True, width=150, file=io.StringIO())
        console.print(frame(snap, limit=10))
        return console.export_text()

    text = render()
    assert text == render()
    assert "3/4 reachable (quorum 3), 1 recovering" in text and "NO GRANT POSSIBLE NOW" in text
    assert dead in text and "unreachable" in text
    assert f"{c.urls[0]}: recovering" in text
    found = rows(text, ["[red]x", "only-on-1"])
    assert list(found) == ["[red]x", "only-on-1"], text
    assert "b:EX" in found["[red]x"] and "DIVERGENT" in found["only-on-1"]


# ----------------------------------------------------------------- graph, detector


def test_graph_shows_edges_cycles_and_the_victim(c):
    deadlock(c)
    c.request("d", "d1", ["R1"], "EX", ticket=9)
    r = dlm(c, "graph", "--json")
    assert r.exit_code == ExitCode.OK
    doc = json.loads(r.stdout)
    assert doc["owners"] == ["a", "b", "d"]
    assert {(e["waiter"], e["holder"]) for e in doc["edges"]} == {
        ("a", "b"), ("b", "a"), ("d", "a"), ("d", "b")}
    (cycle,) = doc["cycles"]
    assert cycle["owners"] == ["a", "b"] and cycle["victim"]["lock_id"] == "b2"
    assert all(len(e["instances"]) == 3 for e in doc["edges"])
    text = dlm(c, "graph").stdout
    assert "a -> b -> a" in text and "victim if it persists: b (lock b2 on R1" in text
    # three waiting requests (a2, b2, d1), each on 3 instances: counted once each
    assert doc["waiting_requests"] == 3
    assert text.startswith("3 waiting request(s) (9 index entries on 3/3 instance(s))"), text


def test_graph_without_cycles(c):
    c.request("a", "a1", ["R"], "EX", ticket=1)
    c.request("b", "b1", ["R"], "EX", ticket=2)
    r = dlm(c, "graph")
    assert r.exit_code == ExitCode.OK and "no cycles" in r.stdout


def dot_edges(dot: str) -> dict[tuple[str, str], str]:
    """(waiter, holder) -> the attributes of that edge line of a DOT text."""
    out = {}
    for m in re.finditer(r'^  "([^"]+)" -> "([^"]+)" \[(.*)\];$', dot, re.M):
        out[(m[1], m[2])] = out.get((m[1], m[2]), "") + m[3]
    return out


def test_graph_dot_marks_the_cycle_and_the_victim(c):
    deadlock(c)
    c.request("d", "d1", ["R1"], "EX", ticket=9)  # waits, but in no cycle
    r = dlm(c, "graph", "--format", "dot")
    assert r.exit_code == ExitCode.OK, r.output
    dot = r.stdout
    assert dot.startswith("digraph ") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}") == 1
    edges = dot_edges(dot)
    assert set(edges) == {("a", "b"), ("b", "a"), ("d", "a"), ("d", "b")}
    for cyc in (("a", "b"), ("b", "a")):
        assert "color=red" in edges[cyc] and "bold" in edges[cyc], edges[cyc]
    for out in (("d", "a"), ("d", "b")):
        assert "red" not in edges[out] and "bold" not in edges[out], edges[out]
    assert 'label="R2\\na2 waits for b1"' in edges[("a", "b")]
    # the victim is b's request b2 on R1 (the youngest, as `dlm graph` says)
    (b_node,) = re.findall(r'^  "b" \[(.*)\];$', dot, re.M)
    assert "victim: lock b2 on R1" in b_node and "doubleoctagon" in b_node
    assert "victim" in edges[("b", "a")] and "victim" not in edges[("a", "b")]
    assert not re.search(r'^  "a" \[.*victim', dot, re.M)


def test_graph_dot_quotes_names_it_cannot_print_bare(c):
    name = 'odd "name" \\ with\nnewline'
    c.request("a", "a1", [name], "EX", ticket=1)
    c.request("b", "b1", [name], "EX", ticket=2)
    dot = dlm(c, "graph", "--format", "dot").stdout
    ((label),) = [a for a in dot_edges(dot).values()]
    assert 'label="odd \\"name\\" \\\\ with\\nnewline\\nb1 waits for a1"' in label, dot
    assert len(dot.strip().splitlines()) == 8  # (no raw line end inside a label)


def test_graph_svg_without_graphviz_says_how_to_get_it(c, monkeypatch):
    deadlock(c)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    r = dlm(c, "graph", "--format", "svg")
    assert r.exit_code == ExitCode.FAILED and r.stdout == ""
    line = one_line_error(r)
    assert "apt install graphviz" in line and "brew install graphviz" in line
    assert "--format dot" in line


def fake_dot(tmp_path, script: str) -> str:
    exe = tmp_path / "dot"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return str(exe)


def test_graph_svg_pipes_the_dot_text_through_graphviz(c, monkeypatch, tmp_path):
    """--format svg hands the DOT text to `dot -Tsvg` and prints what it draws (a stand-in
    `dot` that records its arguments and input); a failing `dot` is exit 1 with its
    message, nothing on stdout."""
    deadlock(c)
    exe = fake_dot(tmp_path, f'echo "$@" > {tmp_path}/args; cat > {tmp_path}/input; '
                             'echo "<svg>drawn</svg>"\n')
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: exe if name == "dot" else None)
    r = dlm(c, "graph", "--format", "svg")
    assert r.exit_code == ExitCode.OK, r.output
    assert r.stdout == "<svg>drawn</svg>\n"
    assert (tmp_path / "args").read_text().split() == ["-Tsvg"]
    assert (tmp_path / "input").read_text() == dlm(c, "graph", "--format", "dot").stdout
    exe = fake_dot(tmp_path, 'echo "syntax error in line 1" >&2; exit 1\n')
    r = dlm(c, "graph", "--format", "svg")
    assert r.exit_code == ExitCode.FAILED and r.stdout == ""
    assert "syntax error in line 1" in one_line_error(r)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_graph_svg_with_graphviz(c):
    deadlock(c)
    r = dlm(c, "graph", "--format", "svg")
    assert r.exit_code == ExitCode.OK, r.output
    assert "<svg" in r.stdout and "victim: lock b2 on R1" in r.stdout


def test_graph_json_and_a_picture_format_is_a_usage_error(c):
    r = dlm(c, "graph", "--json", "--format", "dot")
    assert r.exit_code == ExitCode.USAGE and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert "--json and --format dot" in json.loads(line)["error"]


def test_detector_resolves_a_deadlock_in_bounded_rounds(c):
    deadlock(c)
    with c.listen("b") as ev:
        r = dlm(c, "detector", "--interval", "0.05", "--rounds", "3")
        assert r.exit_code == ExitCode.OK, r.output
        ev.wait_for(b"C|b2|deadlock", count=3)
    assert "event=victim" in r.stderr and "owner=b lock=b2" in r.stderr
    assert "event=stop rounds=3" in r.stderr
    assert c.queues(["R1"], "b2") == [None] * 3


def test_detector_json_log_lines(c):
    deadlock(c)
    r = dlm(c, "detector", "--interval", "0.05", "--rounds", "2", "--json")
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert any("event=victim" in ln["message"] for ln in lines)
    assert all({"ts", "level", "message"} <= set(ln) for ln in lines)


# ----------------------------------------------------------------- dev


def test_dev_starts_initialises_and_stops_its_servers():
    r = dlm(None, "dev", "-n", "1", "--duration", "0.3", "--json")
    assert r.exit_code == ExitCode.OK, r.output
    doc = json.loads(r.stdout)
    (url,) = doc["urls"]
    assert doc["env"] == f"DLM_REDIS={url}"
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:  # stopped: nothing listens any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_dev_on_busy_ports_and_without_redis_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = dlm(None, "dev", "-n", "1", "--port-base", str(busy), "--duration", "0.1")
    assert r.exit_code == ExitCode.FAILED and "in use" in one_line_error(r)
    r = dlm(None, "dev", "--duration", "0.1", env={"REDIS_SERVER": "/nonexistent/redis"})
    assert r.exit_code == ExitCode.FAILED
    assert "scripts/setup.sh" in one_line_error(r)


# ----------------------------------------------------------------- usage and failures


@pytest.mark.parametrize("args", [
    ["nosuchcommand"], ["show"], ["status", "--redis", "http://127.0.0.1:1"],
    ["status", "--redis", "redis://127.0.0.1:notaport"], ["status", "--namespace", "bad ns"],
    ["status", "--timeout", "0"], ["ls", ""], ["show", "a\x00b"], ["dev", "-n", "0"],
    ["detector", "--interval", "0"], ["status", "--bogus"],
])
def test_bad_arguments_exit_2_with_one_line(c, args):
    r = dlm(c, *args)
    assert r.exit_code == ExitCode.USAGE, r.output
    one_line_error(r)


def test_no_instances_is_a_usage_error():
    r = dlm(None, "ls")
    assert r.exit_code == ExitCode.USAGE
    assert "DLM_REDIS" in one_line_error(r)


@pytest.mark.parametrize("cmd", [["status"], ["ls"], ["show", "R"], ["graph"],
                                 ["graph", "--format", "dot"], ["top", "--once"],
                                 ["break", "R", "--lock", "x", "--yes"]])
def test_an_unreachable_instance_exits_1_with_one_line(cmd):
    r = dlm(None, *cmd, "--redis", closed_port_url(), "--timeout", "0.5")
    assert r.exit_code == ExitCode.FAILED
    assert "unreachable" in one_line_error(r)


def test_a_minority_unreachable_is_a_warning(c):
    c.request("a", "a1", ["R"], "EX", ticket=1)
    r = dlm(None, "ls", "--json", "--redis", ",".join(c.urls[:2] + [closed_port_url()]))
    assert r.exit_code == ExitCode.OK
    assert [res["name"] for res in json.loads(r.stdout)["resources"]] == ["R"]
    (warning,) = r.stderr.splitlines()
    assert warning.startswith("dlm: warning: ") and "unreachable" in warning


def test_exit_for_maps_every_kind_of_error():
    assert exit_for(click.UsageError("x"))[0] == ExitCode.USAGE
    assert exit_for(InvalidArgument("x")) == (ExitCode.USAGE, "x")
    assert exit_for(BadArgument("bad\nthing")) == (ExitCode.USAGE, "bad thing")
    assert exit_for(Failed("nope")) == (ExitCode.FAILED, "nope")
    assert exit_for(DevClusterError("no redis")) == (ExitCode.FAILED, "no redis")
    assert exit_for(QuorumUnavailable("q"))[0] == ExitCode.FAILED
    assert exit_for(Deadlock("d"))[0] == ExitCode.FAILED
    assert exit_for(click.Abort()) == (ExitCode.FAILED, "aborted")
    code, msg = exit_for(redis.ConnectionError("Error 111 connecting"))
    assert code == ExitCode.FAILED and msg.startswith("unreachable")
    code, msg = exit_for(RuntimeError("boom"))
    assert code == ExitCode.FAILED and msg == "internal error: RuntimeError: boom"


@pytest.mark.parametrize("info,shown", [({"aof_enabled": 0}, "no aof"),
                                        ({"aof_enabled": 1}, "aof"), ({}, "no aof")])
def test_status_says_what_a_restart_keeps(info, shown):
    from redlockdlm.admin import persistence

    assert persistence(info) == shown
