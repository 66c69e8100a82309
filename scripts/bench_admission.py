"""What the admission path costs and whom it protects, each beside its baseline in the same run.

- ``fairness``: two models on one worker, ``light`` alone (4 clients), then beside ``heavy``
  saturated by 32 clients: light's p99 against its solo p99 (target: within 2x).
- ``json``: KServe v2 JSON bodies of about 1 MB (100,000 floats as text) from 32 clients:
  requests/s, and the event loop's longest lag (the server's own
  ``fastinfer_event_loop_lag_max_seconds``), against the same load with the binary tensor extension.
- ``noop``: tiny requests (one float) over HTTP ``/predictions`` against a bare aiohttp + uvloop
  app that reads the body and answers it, same client, same run: what the whole path (admission,
  batching, a worker's round trip through shared memory) costs per request.

The models are the server's echo stand-in (``echo:DTYPE:COUNT:DELAY_S``: returns its input after
DELAY_S per batch), as the subject here is the server, not the compiled code.

    python scripts/bench_admission.py --duration-s 5 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
from bench_serving import bench_command, wait_for_line

SERVING_LINE = r"http://[^:]+:(\d+), management http://[^:]+:(\d+), binary tcp://[^:]+:(\d+)"
JSON_FLOATS = 100_000  # about 1 MB as JSON text (six decimals), 400 KB as raw float32


class Served:
    """``fastinfer serve`` in a process of its own, on free ports."""

    def __init__(self, folder: Path, models: list[str], *flags: str):
        self.log = folder / f"server-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "fastinfer", "serve", "--models", *models, "--devices", "cpu:1",
                "--http-port", "0", "--management-port", "0", "--binary-port", "0", "--cache-dir", str(folder),
                *flags,
            ],
            stderr=self.log.open("w"),
        )  # fmt: skip
        found = wait_for_line(self.log, SERVING_LINE, 120)
        wait_for_line(self.log, "ready: all workers are warm", 120)
        self.http = f"http://127.0.0.1:{found[1]}"
        self.management = f"http://127.0.0.1:{found[2]}"

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.management}/metrics", timeout=10) as response:
            text = response.read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(match[1]) if match else float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def load(url: str, model: str, clients: int, seconds: float, shape: str) -> dict:
    process = await asyncio.create_subprocess_exec(
        *bench_command(url, model, clients, seconds, shape, input_name="input"), stdout=subprocess.PIPE
    )
    out, _ = await process.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def fairness_round(folder: Path, seconds: float, heavy_delay_s: float, light_delay_s: float) -> dict:
    models = [f"heavy=echo:float32:1024:{heavy_delay_s}", f"light=echo:float32:16:{light_delay_s}"]
    server = Served(folder, models)
    try:
        solo = await load(server.http, "light", 4, seconds, "1,16")
        heavy = asyncio.create_task(load(server.http, "heavy", 32, seconds + 2, "1,1024"))
        await asyncio.sleep(1)  # heavy's clients fill its queue first
        beside = await load(server.http, "light", 4, seconds, "1,16")
        heavy_result = await heavy
    finally:
        server.stop()
    return {"solo": solo, "beside": beside, "heavy": heavy_result}


def json_body(values: np.ndarray) -> bytes:
    data = np.round(values.astype(np.float64), 6).tolist()
    inputs = [{"name": "input", "shape": [1, values.size], "datatype": "FP32", "data": data}]
    return json.dumps({"inputs": inputs}).encode()


def binary_body(values: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, values.size], "datatype": "FP32",
                     "parameters": {"binary_data_size": values.nbytes}}],
         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}
    ).encode()  # fmt: skip
    return header + values.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


async def v2_load(url: str, body: bytes, headers: dict, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop_s = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop_s:
            started = time.perf_counter()
            async with session.post("/v2/models/echo/infer", data=body, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    p99 = float(np.percentile(latencies, 99) * 1000) if latencies else float("nan")
    return {"throughput_rps": len(latencies) / seconds, "p99_ms": p99, "errors": errors}


async def json_round(folder: Path, seconds: float) -> dict:
    values = np.random.default_rng(0).random(JSON_FLOATS, dtype=np.float32)
    result = {}
    for kind in ("json", "binary"):
        server = Served(folder, [f"echo=echo:float32:{JSON_FLOATS}"], "--max-body-bytes", str(8 << 20))
        try:
            idle_lag_s = server.metric("fastinfer_event_loop_lag_max_seconds")
            body, headers = (json_body(values), {}) if kind == "json" else binary_body(values)
            measured = await v2_load(server.http, body, headers, 32, seconds)
            lag_s = server.metric("fastinfer_event_loop_lag_max_seconds")
        finally:
            server.stop()
        result[kind] = {**measured, "body_bytes": len(body), "loop_lag_max_ms": lag_s * 1000,
                        "loop_lag_before_ms": idle_lag_s * 1000}  # fmt: skip
    return result


async def bare_app(port_holder: list[int], stop: asyncio.Event) -> None:
    """The baseline: aiohttp on uvloop, the same route, reads the body and answers it."""
    from aiohttp import web

    async def predict(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post("/predictions/{model}", predict)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port_holder.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    await stop.wait()
    await runner.cleanup()


def run_bare_app() -> None:
    """The baseline's process: prints its port, then serves until terminated."""
    import uvloop

    async def main() -> None:
        holder: list[int] = []
        stop = asyncio.Event()
        task = asyncio.create_task(bare_app(holder, stop))
        while not holder:
            await asyncio.sleep(0.01)
        print(holder[0], flush=True)
        await task

    uvloop.run(main())


async def noop_round(folder: Path, seconds: float, clients: int) -> dict:
    bare = subprocess.Popen([sys.executable, __file__, "--bare-app"], stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None
        bare_url = f"http://127.0.0.1:{int(bare.stdout.readline())}"
        bare_result = await load(bare_url, "noop", clients, seconds, "1,1")
    finally:
        bare.terminate()
        bare.wait(10)
    server = Served(folder, ["noop=echo:float32:1"])
    try:
        served = await load(server.http, "noop", clients, seconds, "1,1")
    finally:
        server.stop()
    return {"bare": bare_result, "fastinfer": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("fairness", "json", "noop"), action="append")
    parser.add_argument("--heavy-delay-s", type=float, default=0.005, help="heavy's seconds per batch")
    parser.add_argument("--light-delay-s", type=float, default=0.005, help="light's seconds per batch")
    parser.add_argument("--noop-clients", type=int, default=32)
    parser.add_argument("--bare-app", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_app:
        run_bare_app()
        return
    parts = args.only or ["fairness", "json", "noop"]
    rows: dict[str, list[dict]] = {part: [] for part in parts}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for number in range(1, args.rounds + 1):
            for part in parts:
                if part == "fairness":
                    row = asyncio.run(fairness_round(folder, args.duration_s, args.heavy_delay_s, args.light_delay_s))
                elif part == "json":
                    row = asyncio.run(json_round(folder, args.duration_s))
                else:
                    row = asyncio.run(noop_round(folder, args.duration_s, args.noop_clients))
                rows[part].append(row)
                print(json.dumps({"round": number, part: row}), flush=True)
    report(rows, args)


def report(rows: dict[str, list[dict]], args) -> None:
    median = statistics.median
    print(f"\nmedians of {args.rounds} rounds of {args.duration_s:g} s")
    if rows.get("fairness"):
        got = rows["fairness"]
        solo, beside = median(r["solo"]["p99_ms"] for r in got), median(r["beside"]["p99_ms"] for r in got)
        ratio = median(r["beside"]["p99_ms"] / r["solo"]["p99_ms"] for r in got)
        heavy = median(r["heavy"]["throughput_rps"] for r in got)
        print(f"\nfairness (heavy {args.heavy_delay_s * 1000:g} ms a batch, light {args.light_delay_s * 1000:g} ms)")
        print("| light p99 alone (ms) | light p99 beside heavy (ms) | ratio | heavy req/s meanwhile |")
        print("| ---: | ---: | ---: | ---: |")
        print(f"| {solo:.1f} | {beside:.1f} | {ratio:.2f}x | {heavy:.0f} |")
    if rows.get("json"):
        got = rows["json"]
        print("\nKServe v2, 32 clients, one 100,000-float tensor a request")
        print("| body | bytes | req/s | p99 (ms) | loop's longest lag (ms) | before the load (ms) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for kind in ("json", "binary"):
            cells = [median(r[kind][key] for r in got) for key in ("throughput_rps", "p99_ms", "loop_lag_max_ms")]
            idle = median(r[kind]["loop_lag_before_ms"] for r in got)
            print(f"| {kind} | {got[0][kind]['body_bytes']:,} | {cells[0]:.1f} | {cells[1]:.0f} | {cells[2]:.0f} | "
                  f"{idle:.0f} |")  # fmt: skip
    if rows.get("noop"):
        got = rows["noop"]
        bare = median(r["bare"]["throughput_rps"] for r in got)
        served = median(r["fastinfer"]["throughput_rps"] for r in got)
        ratio = median(r["fastinfer"]["throughput_rps"] / r["bare"]["throughput_rps"] for r in got)
        print(f"\nno-op HTTP requests, {args.noop_clients} clients")
        print("| bare aiohttp + uvloop req/s | fastinfer req/s | ratio | fastinfer p99 (ms) |")
        print("| ---: | ---: | ---: | ---: |")
        p99 = median(r["fastinfer"]["p99_ms"] for r in got)
        print(f"| {bare:.0f} | {served:.0f} | {ratio:.0%} | {p99:.1f} |")


if __name__ == "__main__":
    main()
