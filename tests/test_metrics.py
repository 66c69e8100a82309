"""The lock-free metrics expose what prometheus_client's own would, for the same observations."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastinfer.server.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S, Metrics

LATENCIES = [0.0, 0.0001, 0.00011, 0.003, 0.005, 0.0050001, 0.2, 10, 11, 1e9]  # bounds, between, past the last


def samples(text: bytes) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if not sample.name.endswith("_created")  # prometheus_client's own creation times
    }


def test_same_samples_as_prometheus_client():
    metrics = Metrics()
    registry = CollectorRegistry()
    requests = Counter("fastinfer_requests", "", ["model", "protocol", "code"], registry=registry)
    latency = Histogram(
        "fastinfer_request_latency_seconds", "", ["model", "protocol"], buckets=LATENCY_BUCKETS_S, registry=registry
    )
    batch_size = Histogram("fastinfer_batch_size", "", ["model"], buckets=BATCH_BUCKETS, registry=registry)
    queue = Histogram("fastinfer_queue_latency_seconds", "", ["model"], buckets=LATENCY_BUCKETS_S, registry=registry)
    compute = Histogram(
        "fastinfer_compute_latency_seconds", "", ["model"], buckets=LATENCY_BUCKETS_S, registry=registry
    )
    for index, value in enumerate(LATENCIES):
        model, code = ("a", "ok") if index % 3 else ("b", "bad_request")
        metrics.request_done(model, "binary", code, value)
        requests.labels(model, "binary", code).inc()
        latency.labels(model, "binary").observe(value)
        size = [1, 2, 3, 128, 129][index % 5]
        metrics.batch_done(model, size, value, value / 2)
        batch_size.labels(model).observe(size)
        queue.labels(model).observe(value)
        compute.labels(model).observe(value / 2)

    theirs = samples(generate_latest(registry))
    ours = {key: value for key, value in samples(metrics.exposition()).items() if key[0] in {k[0] for k in theirs}}
    assert len(ours) == len(theirs) > 100 and ours == theirs
    bucket = ("fastinfer_request_latency_seconds_bucket", (("le", "0.005"), ("model", "a"), ("protocol", "binary")))
    assert ours[bucket] == 3  # 0.0001, 0.00011 and 0.005 itself


def test_in_flight_rises_and_falls():
    metrics = Metrics()
    metrics.request_started("http")
    metrics.request_started("http")
    metrics.request_ended("http")
    assert samples(metrics.exposition())[("fastinfer_in_flight", (("protocol", "http"),))] == 1


async def test_a_callback_that_holds_the_loop_shows_as_loop_lag():
    metrics = Metrics()
    sampler = asyncio.create_task(metrics.sample_loop_lag(0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # a callback that holds the loop, as parsing a large body on it would
    await asyncio.sleep(0.05)
    sampler.cancel()
    text = metrics.exposition().decode()
    assert metrics.loop_lag_max_s > 0.2
    assert "fastinfer_event_loop_lag_max_seconds" in text
    assert 'fastinfer_event_loop_lag_seconds_bucket{le="0.25"}' in text
