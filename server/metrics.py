"""Prometheus metrics, on one ``CollectorRegistry`` per app (no global registry, so two apps in one
process, as in the tests, never share counters).

:class:`ServerMetrics` is what the HTTP layer records; :class:`EngineMetrics` is what the engine
reports through the methods below (the app hands it to :meth:`Engine.start`). Only the methods are
the engine's interface; the prometheus objects behind them are private.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "taer"

# Seconds. TTFT spans a queue wait and an expert load; inter-token latency is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RETRIEVAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class MetricFactory:
    """Declares metrics on one registry, each named ``taer_<name>`` (a counter's samples get
    prometheus-client's ``_total``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(f"{PREFIX}_{name}", documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", documentation, labels, registry=self.registry)

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", documentation, buckets=buckets, registry=self.registry)


class ServerMetrics:
    """What the HTTP layer measures: requests, tokens and latencies as clients see them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        metric = MetricFactory(registry)
        self._requests = metric.counter(
            "http_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"]
        )
        self._in_flight = metric.gauge(
            "generation_requests_in_flight",
            "Generation requests admitted by the HTTP layer and not yet finished.",
        )
        self._prompt_tokens = metric.counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self._generation_tokens = metric.counter("generation_tokens", "Generated tokens.")
        self._ttft = metric.histogram(
            "time_to_first_token_seconds", "From arrival to the first generated token.", TTFT_BUCKETS
        )
        self._itl = metric.histogram(
            "inter_token_latency_seconds", "Time between consecutive generated tokens.", ITL_BUCKETS
        )
        self._e2e = metric.histogram(
            "e2e_request_latency_seconds", "From arrival to the end of the generation.", E2E_BUCKETS
        )
        self._routed = metric.counter(
            "routed_requests", "Generation requests by the task and mode that served them.", ["task", "mode"]
        )

    def record_request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint=endpoint, status=str(status)).inc()

    def set_in_flight(self, count: int) -> None:
        self._in_flight.set(count)

    def record_prompt_tokens(self, count: int) -> None:
        self._prompt_tokens.inc(count)

    def record_generation_tokens(self, count: int) -> None:
        self._generation_tokens.inc(count)

    def observe_time_to_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def observe_e2e_latency(self, seconds: float) -> None:
        self._e2e.observe(seconds)

    def record_routed(self, task: str | None, mode: str) -> None:
        self._routed.labels(task=task or "none", mode=mode).inc()


class EngineMetrics:
    """What the engine reports. Thread-safe (prometheus-client locks), so the engine thread may call
    these directly."""

    def __init__(self, registry: CollectorRegistry) -> None:
        metric = MetricFactory(registry)
        self._queue_length = metric.gauge("queue_length", "Requests waiting in the engine's queue.")
        self._running = metric.gauge("requests_running", "Requests the engine is generating for now.")
        self._retrieval = metric.histogram(
            "retrieval_latency_seconds", "Embedding a query and choosing its task.", RETRIEVAL_BUCKETS
        )
        self._loads = metric.counter("expert_loads", "Experts copied from the store to the device.")
        self._load_bytes = metric.counter(
            "expert_load_bytes", "Bytes of expert weights copied to the device."
        )
        self._hits = metric.counter("expert_hits", "Needed experts that were already resident.")
        self._misses = metric.counter("expert_misses", "Needed experts that were not resident.")
        self._switches = metric.counter(
            "pattern_switches",
            "Activations of a pattern other than the active one, by the pattern switched to.",
            ["task"],
        )
        self._joined = metric.counter(
            "requests_joined",
            "Requests that joined a running batch (continuous batching) instead of starting one.",
        )
        self._resident_bytes = metric.gauge(
            "resident_expert_bytes", "Bytes of expert weights resident on the device."
        )
        self._capacity_bytes = metric.gauge(
            "expert_capacity_bytes",
            "Bytes of the device's expert slots, by how they hold experts (an 8-bit scheme such as "
            "int8-channel, with its scales, or a dtype such as bfloat16).",
            ["dtype"],
        )
        self._router_checks = metric.counter(
            "router_checks",
            "Router checks after a prefill, by outcome: kept (the retrieved pattern), rerouted (another "
            "task's pattern) or exact (no pattern covered the prompt's own routing well).",
            ["outcome"],
        )
        self._records_written = metric.counter(
            "records_written", "Requests recorded to the --record files (their routing, per prompt)."
        )
        self._records_dropped = metric.counter(
            "records_dropped",
            "Request records lost, by reason: queue_full (the writer fell behind; the request was not "
            "held up) or write_error (the files could not be written).",
            ["reason"],
        )
        self._pattern_reloads = metric.counter(
            "pattern_reloads",
            "Pattern reloads (SIGHUP or POST /v1/taer/reload), by outcome: reloaded, or refused (the "
            "old patterns kept serving).",
            ["outcome"],
        )

    def set_queue_length(self, count: int) -> None:
        self._queue_length.set(count)

    def set_running(self, count: int) -> None:
        self._running.set(count)

    def record_router_check(self, outcome: str) -> None:
        self._router_checks.labels(outcome=outcome).inc()

    def observe_retrieval(self, seconds: float) -> None:
        self._retrieval.observe(seconds)

    def record_expert_loads(self, count: int, num_bytes: int) -> None:
        self._loads.inc(count)
        self._load_bytes.inc(num_bytes)

    def record_expert_lookups(self, hits: int, misses: int) -> None:
        self._hits.inc(hits)
        self._misses.inc(misses)

    def record_pattern_switch(self, task: str) -> None:
        self._switches.labels(task=task).inc()

    def record_joined(self, count: int) -> None:
        self._joined.inc(count)

    def set_resident_expert_bytes(self, num_bytes: int) -> None:
        self._resident_bytes.set(num_bytes)

    def set_expert_capacity(self, num_bytes: int, dtype: str) -> None:
        self._capacity_bytes.labels(dtype=dtype).set(num_bytes)

    def record_written(self) -> None:
        self._records_written.inc()

    def record_dropped(self, reason: str) -> None:
        self._records_dropped.labels(reason=reason).inc()

    def record_pattern_reload(self, outcome: str) -> None:
        self._pattern_reloads.labels(outcome=outcome).inc()


class Metrics:
    """One app's registry with both halves. A cluster's ingress has no engine of its own
    (``with_engine=False``): its replicas' engine metrics are added to the registry by a collector."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, with_engine: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.server = ServerMetrics(self.registry)
        self.engine = EngineMetrics(self.registry) if with_engine else None

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
