"""``fastinfer bench``: a closed-loop load generator for the HTTP API and the binary protocol.

``concurrency`` clients each send a request, wait for its answer, and send the next, for
``duration_s`` (after a short warm-up that is not counted). It prints throughput and latency
percentiles. Imports no server code: it measures a server from the outside, like a client would.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

WARM_UP_S = 1.0


@dataclass
class BenchResult:
    protocol: str
    model: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    def line(self) -> str:
        return (
            f"{self.protocol:>6} {self.model:<20} c={self.concurrency:<4} {self.throughput_rps:10.1f} req/s  "
            f"p50 {self.p50_ms:8.3f} ms  p90 {self.p90_ms:8.3f} ms  p99 {self.p99_ms:8.3f} ms  "
            f"({self.requests} ok, {self.errors} errors)"
        )


def _payload(image: Path | None, shape: tuple[int, ...], dtype: str) -> tuple[bytes, np.ndarray | None]:
    if image is not None:
        return image.read_bytes(), None
    array = np.random.default_rng(0).random(shape).astype(dtype)
    return array.tobytes(), array


async def _closed_loop(send, concurrency: int, duration_s: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start_counting = loop.time() + WARM_UP_S
    stop_at = start_counting + duration_s

    async def client() -> None:
        nonlocal errors
        while (now := loop.time()) < stop_at:
            started = time.perf_counter()
            ok = await send()
            if now >= start_counting:
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors, duration_s


async def bench(
    url: str,
    model: str,
    *,
    concurrency: int = 1,
    duration_s: float = 5.0,
    shape: tuple[int, ...] = (1, 16),
    dtype: str = "float32",
    image: Path | None = None,
    input_name: str = "input",
) -> BenchResult:
    """Measure ``model`` at ``url`` (``http://host:port`` or ``tcp://host:port``)."""
    body, array = _payload(image, shape, dtype)
    scheme = urlparse(url).scheme
    if scheme == "http":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(url, connector=connector) as session:
            headers = {"Content-Type": "application/octet-stream"}

            async def send() -> bool:
                async with session.post(f"/predictions/{model}", data=body, headers=headers) as response:
                    await response.read()
                    return response.status == 200

            latencies, errors, elapsed = await _closed_loop(send, concurrency, duration_s)
    else:
        from fastinfer.client import AsyncClient, InferenceServerError

        clients = [AsyncClient(url) for _ in range(min(concurrency, 8))]
        count = 0

        async def send() -> bool:
            nonlocal count
            count += 1
            client = clients[count % len(clients)]
            try:
                if array is None:
                    await client.classify(model, body)
                else:
                    await client.infer(model, {input_name: array})
            except InferenceServerError:
                return False
            return True

        try:
            latencies, errors, elapsed = await _closed_loop(send, concurrency, duration_s)
        finally:
            for client in clients:
                await client.close()
        scheme = "binary"

    lat_ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return BenchResult(
        protocol=scheme,
        model=model,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        duration_s=elapsed,
        throughput_rps=len(latencies) / elapsed,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p90_ms=float(np.percentile(lat_ms, 90)),
        p99_ms=float(np.percentile(lat_ms, 99)),
    )


def run(args) -> int:
    """Entry point of ``fastinfer bench``."""
    import uvloop

    shape = tuple(int(d) for d in args.shape.split(","))
    result = uvloop.run(
        bench(
            args.url,
            args.model,
            concurrency=args.concurrency,
            duration_s=args.duration_s,
            shape=shape,
            dtype=args.dtype,
            image=Path(args.image) if args.image else None,
            input_name=args.input_name,
        )
    )
    print(json.dumps(asdict(result)) if args.json else result.line())
    return 0 if result.requests else 1
