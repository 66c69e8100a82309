"""GPU throughput of CUDA model archives: model-only (the worker's copy plan and VM, no server) and
served (a real server with one worker on cuda:0, a closed loop of HTTP clients). Prints one table.

    python scripts/bench_gpu.py sq=sq.fia resnet50=r50.fia --batches 1,2,4,8,16,32,64 --seconds 2

``--served cli`` measures the served rows as an operator would: ``fastinfer serve --devices cuda:0``
in its own process, loaded by ``fastinfer bench`` over HTTP and over the binary protocol (pipelined,
``--pipeline`` requests in flight per connection), at the concurrencies ``--clients`` names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def model_only(name: str, path: str, batches: list[int], seconds: float, cache: str) -> list[tuple]:
    from fastinfer.worker.model import aligned_zeros, load_model

    model = load_model(name, path, cache_dir=cache, num_cores=1, max_image_pixels=1, device="cuda:0")
    runtime = model.runtime
    rows = []
    for batch in batches:
        padded = model.signature.padded(batch)
        inputs = [aligned_zeros((padded, *t.shape), t.dtype) for t in model.signature.inputs]
        for x in inputs:
            x[...] = np.random.default_rng(batch).random(x.shape).astype(x.dtype)
        outputs = [aligned_zeros((padded, *t.shape), t.dtype) for t in model.signature.outputs]
        for _ in range(3):
            runtime.run_into(inputs, outputs)  # type: ignore[attr-defined]
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or count < 5:
            runtime.run_into(inputs, outputs)  # type: ignore[attr-defined]
            count += 1
        rows.append((name, "model", batch, 1000 * elapsed / count, batch * count / elapsed))
    return rows


async def served(models: dict[str, str], concurrency: list[int], seconds: float, cache: str) -> list[tuple]:
    import aiohttp

    from fastinfer.config import Config
    from fastinfer.server.main import Server
    from fastinfer.signature import TensorSpec

    config = Config(
        http_port=0,
        management_port=0,
        binary_port=0,
        cache_dir=cache,
        models=tuple(f"{n}={p}" for n, p in models.items()),
        devices="cuda:0",
        shm_slot_bytes=64 << 20,
        max_body_bytes=16 << 20,
        shm_slots_per_worker=8,
        gpu_batch_max_size=max(concurrency),
        queue_max_size=4 * max(concurrency),
        worker_start_timeout_s=300,
        log_level="warning",
    )
    server = Server(config)
    await server.start()
    rows = []
    try:
        await server.wait_ready(300)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
            for name in models:
                spec: TensorSpec = server.supervisor.signature(name).inputs[0]
                body = np.random.default_rng(0).random(spec.shape).astype(f"<{np.dtype(spec.dtype).str[1:]}").tobytes()
                for clients in concurrency:
                    latencies: list[float] = []
                    stop_s = time.perf_counter() + seconds

                    async def client(
                        done: list[float], name: str = name, body: bytes = body, stop_s: float = stop_s
                    ) -> None:
                        while time.perf_counter() < stop_s:
                            start = time.perf_counter()
                            async with http.post(f"/predictions/{name}", data=body) as response:
                                await response.read()
                                if response.status != 200:
                                    raise RuntimeError(f"{name}: HTTP {response.status}")
                            done.append(time.perf_counter() - start)

                    started = time.perf_counter()
                    await asyncio.gather(*(client(latencies) for _ in range(clients)))
                    elapsed = time.perf_counter() - started
                    rows.append((name, "served", clients, 1000 * float(np.median(latencies)), len(latencies) / elapsed))
    finally:
        await server.stop()
    return rows


def row_line(name: str, mode: str, size: int, ms: float, rate: float) -> str:
    return f"{name:<18} {mode:<7} {size:>13} {ms:>27.2f} {rate:>11.1f}"


def served_cli(
    models: dict[str, str], clients: list[int], seconds: float, cache: str, pipeline: int, device: str, rows: list
) -> None:
    """``fastinfer serve`` in a child process, measured by ``fastinfer bench`` (HTTP, then binary);
    appends to ``rows`` as it measures."""
    from fastinfer.archive.load import read_manifest

    http, binary = 18080, 18090
    python = [sys.executable, "-m", "fastinfer"]
    command = [
        *python,
        "serve",
        "--devices",
        device,
        "--models",
        *(f"{n}={p}" for n, p in models.items()),
        "--http-port",
        str(http),
        "--management-port",
        "18081",
        "--binary-port",
        str(binary),
        "--cache-dir",
        cache,
        "--shm-slot-bytes",
        str(64 << 20),
        "--max-body-bytes",
        str(16 << 20),
        "--shm-slots-per-worker",
        "8",
        "--gpu-batch-max-size",
        str(max(clients)),
        "--queue-max-size",
        str(8 * max(clients)),
        "--worker-start-timeout-s",
        "300",
        "--log-level",
        "warning",
    ]
    Path(cache).mkdir(parents=True, exist_ok=True)
    log_path = Path(cache) / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            failed = "could not load its models" in log_path.read_text(errors="replace")
            if failed or server.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"fastinfer serve did not become ready (exit code {server.poll()}):\n{tail}")
            time.sleep(0.5)
        for name, path in models.items():
            spec = read_manifest(path).inputs[0]
            shape = ",".join(str(d) for d in (1, *spec.shape))
            for protocol, url, depth in (
                ("http", f"http://127.0.0.1:{http}", 1),
                ("binary", f"tcp://127.0.0.1:{binary}", pipeline),
            ):
                for count in clients:
                    bench = [*python, "bench", "--url", url, "--model", name, "--concurrency", str(count)]
                    bench += ["--duration-s", str(seconds), "--shape", shape, "--dtype", spec.dtype]
                    bench += ["--input-name", spec.name, "--pipeline", str(min(depth, count)), "--json"]
                    done = subprocess.run(bench, capture_output=True, text=True, timeout=seconds + 60)
                    if done.returncode != 0 or not done.stdout.strip():
                        print(f"{name} {protocol} c={count}: bench failed: {done.stderr.strip()[-300:]}", flush=True)
                        continue
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    mode = "http" if protocol == "http" else f"bin p{min(depth, count)}"
                    rows.append((name, mode, count, result["p50_ms"], result["throughput_rps"]))
                    print(row_line(*rows[-1]), flush=True)
                    if result["errors"]:
                        print(f"{name} {mode} c={count}: {result['errors']} errors", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=ARCHIVE")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--cache-dir", default="/tmp/fastinfer-bench-gpu")
    parser.add_argument(
        "--served", choices=("inprocess", "cli", "none"), default="inprocess", help="how the served rows are measured"
    )
    parser.add_argument("--clients", default="1,8,64", help="--served cli: concurrencies")
    parser.add_argument("--pipeline", type=int, default=8, help="--served cli: binary requests per connection")
    parser.add_argument("--device", default="cuda:0", help="--served cli: the server's --devices")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[tuple] = []
    for name, path in models.items():
        try:
            rows += model_only(name, path, batches, args.seconds, args.cache_dir)
        except Exception as error:  # one model failing leaves the others' rows
            print(f"{name}: model-only failed: {type(error).__name__}: {error}", flush=True)
        else:
            print("\n".join(row_line(*row) for row in rows if row[0] == name), flush=True)
    failed = False
    try:
        if args.served == "cli":
            clients = [int(c) for c in args.clients.split(",")]
            served_cli(models, clients, args.seconds, args.cache_dir, args.pipeline, args.device, rows)
        elif args.served == "inprocess":
            import uvloop

            rows += uvloop.run(served(models, batches, args.seconds, args.cache_dir))
    except Exception as error:  # the rows measured so far are still printed
        print(f"served: failed: {type(error).__name__}: {error}", flush=True)
        failed = True
    print(f"{'model':<18} {'mode':<7} {'batch/clients':>13} {'ms/batch (model) or p50 ms':>27} {'samples/s':>11}")
    for row in rows:
        print(row_line(*row))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
