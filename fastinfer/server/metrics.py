"""Counters and histograms of one server, in the Prometheus data model.

The ones that every request and batch moves (requests answered and in flight, their latencies,
batch sizes, queue and compute times) are plain numbers that the event loop's thread updates
without locks, turned into Prometheus metrics only when scraped: prometheus_client's own take a
lock per count and walk the buckets in Python at every observation, several times per request.
The rest (queue depths, workers ready, restarts) are prometheus_client's. Each server gets its own
registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LOOP_LAG_PERIOD_S = 0.02
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Tally:
    """One histogram's observations: a count per bucket (the last one +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a value equal to a bound is in its bucket
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        buckets, total = [], 0
        for bound, count in zip([*map(floatToGoString, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class Histograms:
    """A labelled histogram family made of Tallies."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], bounds: Sequence[float]):
        self.name, self.documentation, self.labels, self.bounds = name, documentation, labels, bounds
        self.tallies: dict[tuple[str, ...], Tally] = {}

    def tally(self, *values: str) -> Tally:
        tally = self.tallies.get(values)
        if tally is None:
            tally = self.tallies[values] = Tally(self.bounds)
        return tally

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, tally in self.tallies.items():
            family.add_metric(list(values), tally.cumulative(), tally.sum)
        return family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests: dict[tuple[str, str, str], int] = {}  # by (model, protocol, code)
        self.in_flight: dict[str, int] = {}  # HTTP requests being served, by protocol
        self.request_latency = Histograms(
            "fastinfer_request_latency_seconds", "Time from request to reply", ("model", "protocol"), LATENCY_BUCKETS_S
        )
        self.queue_latency = Histograms(
            "fastinfer_queue_latency_seconds", "Time a batch waited for a worker", ("model",), LATENCY_BUCKETS_S
        )
        self.compute_latency = Histograms(
            "fastinfer_compute_latency_seconds", "Time a worker took for a batch", ("model",), LATENCY_BUCKETS_S
        )
        self.batch_size = Histograms("fastinfer_batch_size", "Requests per batch", ("model",), BATCH_BUCKETS)
        self.loop_lag = Histograms(
            "fastinfer_event_loop_lag_seconds",
            f"How late the event loop woke a task that slept {LOOP_LAG_PERIOD_S:g} s (its longest callback)",
            (),
            LATENCY_BUCKETS_S,
        )
        self.loop_lag_max_s = 0.0
        self.queue_depth = Gauge("fastinfer_queue_depth", "Requests waiting for a worker", ["model"], registry=r)
        self.worker_restarts = Counter("fastinfer_worker_restarts", "Workers started again", ["worker"], registry=r)
        self.workers_ready = Gauge("fastinfer_workers_ready", "Workers warm and serving", registry=r)
        r.register(self)  # collect() below

    def request_started(self, protocol: str) -> None:
        self.in_flight[protocol] = self.in_flight.get(protocol, 0) + 1

    def request_ended(self, protocol: str) -> None:
        self.in_flight[protocol] -= 1

    def request_done(self, model: str, protocol: str, code: str, latency_s: float) -> None:
        key = (model, protocol, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.request_latency.tally(model, protocol).observe(latency_s)

    def batch_done(self, model: str, size: int, queue_s: float, compute_s: float) -> None:
        self.batch_size.tally(model).observe(size)
        self.queue_latency.tally(model).observe(queue_s)
        self.compute_latency.tally(model).observe(compute_s)

    def collect(self) -> Iterator[Metric]:
        """The lock-free metrics, as Prometheus families (the registry calls this when scraped)."""
        requests = CounterMetricFamily("fastinfer_requests", "Requests answered", labels=("model", "protocol", "code"))
        for labels, count in self.requests.items():
            requests.add_metric(list(labels), count)
        yield requests
        in_flight = GaugeMetricFamily("fastinfer_in_flight", "Requests being served", labels=("protocol",))
        for protocol, count in self.in_flight.items():
            in_flight.add_metric([protocol], count)
        yield in_flight
        for histograms in (
            self.request_latency,
            self.queue_latency,
            self.compute_latency,
            self.batch_size,
            self.loop_lag,
        ):
            yield histograms.family()
        yield GaugeMetricFamily(
            "fastinfer_event_loop_lag_max_seconds", "The event loop's longest lag since start", self.loop_lag_max_s
        )

    async def sample_loop_lag(self, period_s: float = LOOP_LAG_PERIOD_S) -> None:
        """Sleep ``period_s`` over and over, and count how late each wake-up comes: a callback that
        holds the loop (parsing a large body, say) delays every request and heartbeat by as much."""
        loop = asyncio.get_running_loop()
        lag = self.loop_lag.tally()
        while True:
            asleep_s = loop.time()
            await asyncio.sleep(period_s)
            late_s = max(0.0, loop.time() - asleep_s - period_s)
            lag.observe(late_s)
            self.loop_lag_max_s = max(self.loop_lag_max_s, late_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
