"""What both clients report to the metrics sink (redlockdlm.metrics) and the trace spans
around lock waits: every completed request once, by operation and outcome, with its wait;
a lost lock; each renewal round trip per instance. The sync and asyncio clients report the
same (q3 runs each test over both)."""

from __future__ import annotations

import pytest

from redlockdlm import metrics
from redlockdlm.errors import LockTimeout, NotQueued

from .conftest import Quorum, wait_until

pytestmark = pytest.mark.timeout(60)

pc = pytest.importorskip("prometheus_client")


@pytest.fixture
def reg(monkeypatch: pytest.MonkeyPatch) -> pc.CollectorRegistry:
    """A private registry, installed as the process-wide sink for this test only."""
    registry = pc.CollectorRegistry()
    monkeypatch.setattr(metrics, "sink", metrics.PrometheusMetrics(registry))
    return registry


def requests(reg: pc.CollectorRegistry, op: str) -> dict[str, float]:
    return {o: reg.get_sample_value("dlm_requests_total", {"op": op, "outcome": o})
            for o in metrics.OUTCOMES}


def test_request_outcomes_and_waits_are_counted_once(q3: Quorum, reg) -> None:
    q = q3
    a, b = q.dlm(), q.dlm()
    la = a.lock("r")  # granted
    with pytest.raises(NotQueued):
        b.lock("r", noqueue=True)
    with pytest.raises(LockTimeout):
        b.lock("r", timeout=0.1)
    req = b.enqueue("r")
    req.cancel()  # withdrawn by its caller
    la.convert("PR")  # a down-conversion: granted at once
    lb = b.lock("r", "PR")  # granted beside it
    with pytest.raises(LockTimeout):
        la.convert("EX", timeout=0.1)  # b's PR blocks it
    assert requests(reg, "acquire") == {"granted": 2, "timeout": 1, "deadlock": 0,
                                        "not_queued": 1, "cancelled": 1, "error": 0}
    assert requests(reg, "convert") == {"granted": 1, "timeout": 1, "deadlock": 0,
                                        "not_queued": 0, "cancelled": 0, "error": 0}
    assert reg.get_sample_value("dlm_wait_seconds_count", {"op": "acquire"}) == 2
    assert reg.get_sample_value("dlm_wait_seconds_count", {"op": "convert"}) == 1
    # a grant at once is a round trip; a wait is never negative
    assert 0 < reg.get_sample_value("dlm_wait_seconds_sum", {"op": "acquire"}) < 1.0
    lb.release()
    la.release()
    assert requests(reg, "acquire")["granted"] == 2  # releases are not requests


def test_lost_lock_and_renewals_per_instance(q3: Quorum, reg) -> None:
    q = q3
    d = q.dlm(lease_ms=600)  # renewed every 200 ms
    lk = d.lock("gone")
    kept = d.lock("kept")  # (renewed throughout: renewals go on after the loss)
    wait_until(lambda: all(reg.get_sample_value(
        "dlm_renewals_total", {"instance": u, "result": "ok"}) for u in q.urls))
    assert reg.get_sample_value("dlm_locks_lost_total") == 0
    for i in range(q.n):  # the lock vanishes from every instance (not by its owner)
        q.engine(i).client.delete(q.key("gone"))
    wait_until(lambda: reg.get_sample_value("dlm_locks_lost_total") == 1)
    assert not lk.valid
    for u in q.urls:  # each round trip: counted, and its latency observed
        ok = reg.get_sample_value("dlm_renewals_total", {"instance": u, "result": "ok"})
        n = reg.get_sample_value("dlm_renewal_seconds_count", {"instance": u})
        assert ok >= 1 and n >= ok
    q.servers[0].pause()  # SIGSTOP: its renewals fail (no answer within the timeout)
    try:
        wait_until(lambda: reg.get_sample_value(
            "dlm_renewals_total", {"instance": q.urls[0], "result": "error"}), timeout=10)
    finally:
        q.servers[0].resume()
    assert kept.valid  # held on the two others
    assert reg.get_sample_value("dlm_locks_lost_total") == 1


def test_spans_around_lock_waits(q3: Quorum, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    monkeypatch.setattr(metrics, "_tracer", provider.get_tracer("redlockdlm"))
    q = q3
    a, b = q.dlm(), q.dlm()
    la = a.lock("spans", "PR")
    with pytest.raises(LockTimeout):
        b.lock("spans", "EX", timeout=0.1)
    la.convert("EX")
    la.release()
    got = [(s.name, dict(s.attributes)) for s in exporter.get_finished_spans()]
    assert got == [
        ("dlm.acquire", {"dlm.resource": "spans", "dlm.mode": "PR", "dlm.outcome": "granted"}),
        ("dlm.acquire", {"dlm.resource": "spans", "dlm.mode": "EX", "dlm.outcome": "timeout"}),
        ("dlm.convert", {"dlm.resource": "spans", "dlm.mode": "EX", "dlm.outcome": "granted"}),
    ]
    spans = exporter.get_finished_spans()
    assert spans[1].status.status_code.name == "ERROR"
    assert spans[1].end_time - spans[1].start_time >= 0.1e9  # it covers the wait
