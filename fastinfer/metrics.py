"""Counters and histograms of one server, in the Prometheus data model.

Each server gets its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastinfer_requests", "Requests answered", ["model", "protocol", "code"], registry=r)
        self.request_latency = Histogram(
            "fastinfer_request_latency_seconds",
            "Time from request to reply",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_latency = Histogram(
            "fastinfer_queue_latency_seconds",
            "Time a batch waited for a worker",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute_latency = Histogram(
            "fastinfer_compute_latency_seconds",
            "Time a worker took for a batch",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "fastinfer_batch_size", "Requests per batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("fastinfer_queue_depth", "Requests waiting for a worker", ["model"], registry=r)
        self.in_flight = Gauge("fastinfer_in_flight", "Requests being served", ["protocol"], registry=r)
        self.worker_restarts = Counter("fastinfer_worker_restarts", "Workers started again", ["worker"], registry=r)
        self.workers_ready = Gauge("fastinfer_workers_ready", "Workers warm and serving", registry=r)
        self._request_children: dict[tuple[str, str, str], tuple] = {}
        self._batch_children: dict[str, tuple] = {}

    def request_done(self, model: str, protocol: str, code: str, latency_s: float) -> None:
        """Count one answered request; the labelled children are looked up once, not per request."""
        key = (model, protocol, code)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(model, protocol, code), self.request_latency.labels(model, protocol))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(latency_s)

    def batch_done(self, model: str, size: int, queue_s: float, compute_s: float) -> None:
        children = self._batch_children.get(model)
        if children is None:
            children = (
                self.batch_size.labels(model),
                self.queue_latency.labels(model),
                self.compute_latency.labels(model),
            )
            self._batch_children[model] = children
        children[0].observe(size)
        children[1].observe(queue_s)
        children[2].observe(compute_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
