"""Operator metrics (Prometheus) and traces (OpenTelemetry), both optional.

Every client (`DLM`, `AsyncDLM`: through the shared core, `flows` and `handle`) and the
deadlock detector report what happens to a *sink*. The process-wide sink is a `Metrics`,
which does nothing, until `enable()` installs a `PrometheusMetrics` (needs
``prometheus-client``: ``pip install 'redlockdlm[metrics]'``)::

    from redlockdlm import metrics
    metrics.enable()                      # the default prometheus_client registry
    prometheus_client.start_http_server(9464)

`dlm detector --metrics-port P` does both for the detector process. The names, labels and
meanings are in docs/operations.md ("Metrics").

Nothing here imports prometheus-client or OpenTelemetry unless it is installed, and the
library never requires them. The hot path costs one method call per event: the no-op sink's
methods do nothing, the Prometheus sink's increment a counter / observe a histogram child
bound in advance (per instance: bound once, on first use).

Traces: if ``opentelemetry-api`` is importable, every acquisition and conversion that is
sent to the instances runs inside a span (``dlm.acquire`` / ``dlm.convert``) from the
request to its outcome, with the attributes ``dlm.resource``, ``dlm.mode`` and
``dlm.outcome``; without a tracer provider configured those spans are OpenTelemetry's
no-op spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .engine.keys import show_name
from .engine.modes import Mode
from .errors import (
    Deadlock,
    DLMError,
    LockTimeout,
    MetricsUnavailable,
    NotQueued,
)

#: The outcomes of a request (acquisition or conversion): the `outcome` label values.
OUTCOMES = ("granted", "timeout", "deadlock", "not_queued", "cancelled", "error")

#: Bucket bounds (seconds) of the wait histograms: a grant at once is a round trip (ms).
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0)
#: Bucket bounds (seconds) of the per-instance latency histograms (renewal, scan).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0)


def outcome_of(error: DLMError | None) -> str:
    """The `outcome` label of a request that completed with `error` (None: granted)."""
    if error is None:
        return "granted"
    if isinstance(error, LockTimeout):
        return "cancelled" if str(error) == "cancelled" else "timeout"
    if isinstance(error, Deadlock):
        return "deadlock"
    if isinstance(error, NotQueued):
        return "not_queued"
    return "error"


class Metrics:
    """The sink that reports nothing (the default). Subclasses report somewhere; every
    method is called where the event happens and must not raise or block."""

    #: False: callers may skip work done only to report (e.g. reading a clock)
    enabled = False

    # ----------------------------------------------------------------- clients

    def request_done(self, op: str, outcome: str, wait_s: float) -> None:
        """An acquisition (`op` "acquire") or conversion ("convert") completed with
        `outcome` (one of `OUTCOMES`) `wait_s` seconds after it was asked for."""

    def lock_lost(self) -> None:
        """A held lock was reported lost (no longer held on a quorum)."""

    def renewal(self, instance: str, seconds: float, ok: bool) -> None:
        """One renewal round trip to `instance` took `seconds`; `ok`: every call of it
        was answered (False: an error or no answer)."""

    # ----------------------------------------------------------------- the detector

    def detector_round(self, kind: str, seconds: float) -> None:
        """A detector round of `kind` ("full", "confirm", "watch", "standby") ran."""

    def detector_scan(self, instance: str, seconds: float, ok: bool) -> None:
        """One instance's read in a detector round took `seconds`; `ok`: it answered."""

    def detector_graph(self, waiting: int, cycles: int, longest: int = 0) -> None:
        """A full round saw `waiting` waiting requests (each once, however many instances
        index it), `cycles` cycles in the wait-for graph, and `longest` requests waiting on
        the resource with the longest queue."""

    def detector_deadlock(self, victims: int) -> None:
        """A deadlock (a confirmed cycle) was acted upon: `victims` requests cancelled
        (0: every request of it is NODLCKWT)."""

    def detector_leader(self, leading: bool) -> None:
        """Whether this detector leads (acts) as of its latest round."""


class PrometheusMetrics(Metrics):
    """Metrics in a prometheus_client registry (the default one unless `registry`).

    The names are prefixed `dlm_`; see docs/operations.md for the table."""

    enabled = True

    def __init__(self, registry: Any = None) -> None:
        try:
            import prometheus_client as pc
        except ImportError as exc:  # (an optional extra)
            raise MetricsUnavailable(
                "prometheus-client is not installed: pip install 'redlockdlm[metrics]'"
            ) from exc
        reg = pc.REGISTRY if registry is None else registry
        self.registry = reg
        self._requests = pc.Counter(
            "dlm_requests", "Lock requests (acquire, convert) completed, by outcome",
            ["op", "outcome"], registry=reg)
        self._wait = pc.Histogram(
            "dlm_wait_seconds", "Time from a request to its grant", ["op"],
            buckets=WAIT_BUCKETS, registry=reg)
        self._lost = pc.Counter("dlm_locks_lost", "Held locks reported lost", registry=reg)
        self._renewals = pc.Counter(
            "dlm_renewals", "Renewal round trips, per instance and result",
            ["instance", "result"], registry=reg)
        self._renew_s = pc.Histogram(
            "dlm_renewal_seconds", "Renewal round-trip latency per instance", ["instance"],
            buckets=LATENCY_BUCKETS, registry=reg)
        self._rounds = pc.Counter("dlm_detector_rounds", "Detector rounds, by kind",
                                  ["kind"], registry=reg)
        self._round_s = pc.Histogram(
            "dlm_detector_round_seconds", "Detector round duration, by kind", ["kind"],
            buckets=LATENCY_BUCKETS, registry=reg)
        self._scan_s = pc.Histogram(
            "dlm_detector_scan_seconds", "Detector read latency per instance", ["instance"],
            buckets=LATENCY_BUCKETS, registry=reg)
        self._scan_err = pc.Counter(
            "dlm_detector_scan_errors", "Detector reads an instance failed to answer",
            ["instance"], registry=reg)
        self._waiting = pc.Gauge(
            "dlm_detector_waiting_requests",
            "Waiting requests seen by the last full round (each counted once)", registry=reg)
        self._cycles = pc.Gauge(
            "dlm_detector_cycles", "Cycles in the wait-for graph of the last full round",
            registry=reg)
        self._longest = pc.Gauge(
            "dlm_detector_longest_queue",
            "Waiting requests of the resource with the longest queue, at the last full round",
            registry=reg)
        self._deadlocks = pc.Counter(
            "dlm_detector_deadlocks", "Deadlocks (confirmed cycles) acted upon", registry=reg)
        self._victims = pc.Counter("dlm_detector_victims",
                                   "Requests cancelled as deadlock victims", registry=reg)
        self._leader = pc.Gauge("dlm_detector_leader",
                                "1 while this detector leads (acts), else 0", registry=reg)
        # children bound in advance: an event costs an increment, no label lookup
        self._req = {(op, o): self._requests.labels(op, o)
                     for op in ("acquire", "convert") for o in OUTCOMES}
        self._waits = {op: self._wait.labels(op) for op in ("acquire", "convert")}
        self._per: dict[tuple[str, str], Any] = {}

    def _child(self, kind: str, instance: str) -> tuple[Any, ...]:
        got = self._per.get((kind, instance))
        if got is None:
            if kind == "renew":
                got = (self._renewals.labels(instance, "ok"),
                       self._renewals.labels(instance, "error"),
                       self._renew_s.labels(instance))
            else:
                got = (self._scan_s.labels(instance), self._scan_err.labels(instance))
            self._per[(kind, instance)] = got
        return got

    def request_done(self, op: str, outcome: str, wait_s: float) -> None:
        self._req[(op, outcome)].inc()
        if outcome == "granted":
            self._waits[op].observe(wait_s)

    def lock_lost(self) -> None:
        self._lost.inc()

    def renewal(self, instance: str, seconds: float, ok: bool) -> None:
        good, bad, latency = self._child("renew", instance)
        (good if ok else bad).inc()
        latency.observe(seconds)

    def detector_round(self, kind: str, seconds: float) -> None:
        self._rounds.labels(kind).inc()
        self._round_s.labels(kind).observe(seconds)

    def detector_scan(self, instance: str, seconds: float, ok: bool) -> None:
        latency, errors = self._child("scan", instance)
        if ok:
            latency.observe(seconds)
        else:
            errors.inc()

    def detector_graph(self, waiting: int, cycles: int, longest: int = 0) -> None:
        self._waiting.set(waiting)
        self._cycles.set(cycles)
        self._longest.set(longest)

    def detector_deadlock(self, victims: int) -> None:
        self._deadlocks.inc()
        self._victims.inc(victims)

    def detector_leader(self, leading: bool) -> None:
        self._leader.set(1 if leading else 0)


_NOOP = Metrics()
#: The process-wide sink every client and detector reports to (`enable`, `disable`).
sink: Metrics = _NOOP


def enable(registry: Any = None) -> PrometheusMetrics:
    """Report to Prometheus from now on, process-wide (clients and detectors made before
    as well): metrics registered in `registry` (default: prometheus_client's). Idempotent
    for the same registry; raises MetricsUnavailable without prometheus-client. Serve them
    with `prometheus_client.start_http_server` (or your web framework's exporter)."""
    global sink
    if isinstance(sink, PrometheusMetrics) and (registry is None or sink.registry is registry):
        return sink
    new = PrometheusMetrics(registry)
    sink = new
    return new


def serve(port: int, addr: str = "127.0.0.1", registry: Any = None) -> Callable[[], None]:
    """`enable(registry)` and serve its metrics at http://`addr`:`port`/metrics with
    prometheus_client's own HTTP server (a daemon thread); port 0: any free port (read it
    from the returned stop function's `port`). Returns a function that stops serving.
    Raises MetricsUnavailable without prometheus-client, OSError if the port is taken."""
    sink_ = enable(registry)
    import prometheus_client as pc

    got = pc.start_http_server(port, addr=addr, registry=sink_.registry)
    server = got[0] if isinstance(got, tuple) else None  # (older versions return None)

    def stop() -> None:
        if server is not None:
            server.shutdown()
            server.server_close()

    stop.port = server.server_address[1] if server is not None else port  # type: ignore
    return stop


def disable() -> None:
    """Back to the sink that reports nothing (the metrics registered stay registered)."""
    global sink
    sink = _NOOP


# ----------------------------------------------------------------- traces

try:  # (optional: opentelemetry-api)
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - depends on the environment
    _otel_trace = None  # type: ignore[assignment]
#: (a proxy: it follows the tracer provider configured later, `set_tracer_provider`)
_tracer: Any = None if _otel_trace is None else _otel_trace.get_tracer("redlockdlm")


def start_span(op: str, path: Sequence[bytes], mode: Mode) -> Any:
    """A started span ``dlm.<op>`` for a request of `mode` on the resource `path`, or None
    when opentelemetry-api is not installed. End it with `end_span`."""
    if _tracer is None:
        return None
    return _tracer.start_span(
        f"dlm.{op}", attributes={"dlm.resource": show_name(path), "dlm.mode": mode.name})


def end_span(span: Any, outcome: str) -> None:
    """Record `outcome` (one of `OUTCOMES`) on `span` (from `start_span`) and end it."""
    if span is None:
        return
    span.set_attribute("dlm.outcome", outcome)
    if outcome != "granted" and _otel_trace is not None:
        span.set_status(_otel_trace.Status(_otel_trace.StatusCode.ERROR, outcome))
    span.end()
