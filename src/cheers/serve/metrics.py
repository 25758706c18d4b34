"""The Prometheus collectors of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

ENDPOINTS = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/images/generations",
    "/v1/images/edits",
)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests, errors and latency per endpoint; queue depth, batch sizes and batch times of the engine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cheers_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "cheers_errors",
            "HTTP requests answered with a 4xx/5xx status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cheers_request_latency_seconds",
            "time from a request's arrival to the end of its response (streams: the last byte)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("cheers_queue_depth", "requests waiting for the model", registry=r)
        self.in_flight = Gauge("cheers_requests_in_flight", "HTTP requests being answered", registry=r)
        self.batch_rows = Histogram(
            "cheers_batch_size",
            "rows (images or answers) per pipeline call, by kind",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "cheers_batch_requests",
            "requests per pipeline call, by kind",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "cheers_batch_seconds",
            "time of one pipeline call, by kind",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "cheers_dropped_requests",
            "requests dropped before they ran (client gone, timeout)",
            ["reason"],
            registry=r,
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at every scrape."""
        self.queue_depth.set_function(depth)

    def observe_response(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, kind: str, requests: int, rows: int, seconds: float) -> None:
        self.batch_requests.labels(kind).observe(requests)
        self.batch_rows.labels(kind).observe(rows)
        self.batch_seconds.labels(kind).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
