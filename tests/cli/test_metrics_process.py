"""Metrics scraped over HTTP, by name and value, from running processes: a `dlm detector
--metrics-port` and a client process (tests/cli/metrics_client.py) whose known operations
the detector sees and resolves (4 grants, 1 timeout, 1 deadlock victim, 1 waiting request);
and the clear error when prometheus-client is missing."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from deadlocks import Cluster
from redis_harness import dlm_env, free_port, wait_for_line

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from redlockdlm import metrics  # noqa: E402
from redlockdlm.errors import MetricsUnavailable  # noqa: E402

pytestmark = pytest.mark.timeout(90)

CLIENT = Path(__file__).with_name("metrics_client.py")
PY_M = [sys.executable, "-m", "redlockdlm_cli"]


#: the environment of a `dlm` process: none of this one's DLM_* variables, namespace "t"
env = functools.partial(dlm_env, DLM_NAMESPACE="t")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET http://127.0.0.1:port/metrics, parsed: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def per_instance(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """instance label -> value, for the samples of `name` with `labels` (and an instance)."""
    out = {}
    for (n, lbl), v in samples.items():
        d = dict(lbl)
        inst = d.pop("instance", None)
        if n == name and inst is not None and d == labels:
            out[inst] = v
    return out


def poll(port: int, pred, timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(port)
        if pred(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout} s; scraped: {got}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_detector_and_client_metrics_over_http(cluster3):
    c = Cluster(cluster3)
    urls = ",".join(c.urls)
    dport = free_port()
    det = subprocess.Popen([*PY_M, "detector", "--interval", "0.2", "--metrics-port",
                            str(dport)], env=env(DLM_REDIS=urls), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    cli = None
    try:
        wait_for_line(det.stderr, "event=metrics")
        cli = subprocess.Popen([sys.executable, str(CLIENT), urls, c.namespace],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        cport = int(wait_for_line(cli.stdout, "port").split()[1])
        wait_for_line(cli.stdout, "timeout")
        line = wait_for_line(cli.stdout, "outcomes", timeout=30)
        assert line.strip() == "outcomes ['deadlock', 'granted']", line
        wait_for_line(cli.stdout, "ready")

        # the client: 4 grants, 1 timeout, 1 deadlock victim, each counted once
        got = poll(cport, lambda s: len(per_instance(s, "dlm_renewals_total",
                                                     result="ok")) == 3)
        acq = {o: value(got, "dlm_requests_total", op="acquire", outcome=o)
               for o in metrics.OUTCOMES}
        assert acq == {"granted": 4, "timeout": 1, "deadlock": 1, "not_queued": 0,
                       "cancelled": 0, "error": 0}, acq
        assert value(got, "dlm_wait_seconds_count", op="acquire") == 4
        # the deadlocked grant waited for the detector (two scans): not a round trip
        assert value(got, "dlm_wait_seconds_sum", op="acquire") > 0.1
        assert value(got, "dlm_locks_lost_total") == 0
        renewed = per_instance(got, "dlm_renewals_total", result="ok")
        assert sorted(int(u.rsplit(":", 1)[1]) for u in renewed) == sorted(
            s.port for s in cluster3)
        assert all(v >= 1 for v in renewed.values())
        assert per_instance(got, "dlm_renewals_total", result="error") == dict.fromkeys(
            renewed, 0.0)
        latency = per_instance(got, "dlm_renewal_seconds_count")
        assert latency == renewed  # one latency per round trip

        # the detector: one deadlock, one victim; the request left waiting counted once
        # (it is in the waiter index of all three instances)
        got = poll(dport, lambda s: value(s, "dlm_detector_waiting_requests") == 1)
        assert value(got, "dlm_detector_deadlocks_total") == 1
        assert value(got, "dlm_detector_victims_total") == 1
        assert value(got, "dlm_detector_leader") == 1
        assert value(got, "dlm_detector_cycles") == 0
        assert value(got, "dlm_detector_longest_queue") == 1  # (that one request's queue)
        assert value(got, "dlm_detector_rounds_total", kind="full") >= 2
        assert value(got, "dlm_detector_rounds_total", kind="confirm") >= 1
        scans = per_instance(got, "dlm_detector_scan_seconds_count")
        assert len(scans) == 3 and all(v >= 2 for v in scans.values())
        assert per_instance(got, "dlm_detector_scan_errors_total") == dict.fromkeys(scans, 0.0)
        # (the detector's own leadership lock is a client of the same process)
        assert value(got, "dlm_requests_total", op="acquire", outcome="granted") >= 1
    finally:
        if cli is not None:
            cli.stdin.close()
            try:
                cli.wait(10)
            finally:
                stop(cli)
        stop(det)


def test_metrics_without_prometheus_client_is_a_typed_error(monkeypatch, cluster3):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    monkeypatch.setattr(metrics, "sink", metrics.Metrics())
    with pytest.raises(MetricsUnavailable, match=r"redlockdlm\[metrics\]"):
        metrics.enable()
    assert not metrics.sink.enabled  # nothing changed: still the sink that reports nothing
    from redlockdlm_cli.main import cli
    res = CliRunner().invoke(cli, ["detector", "--rounds", "1", "--always", "--metrics-port",
                                   str(free_port()), "--redis", cluster3.urls[0]])
    assert res.exit_code == 1
    assert "prometheus-client is not installed" in res.output
