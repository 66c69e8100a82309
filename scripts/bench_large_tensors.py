"""SqueezeNet-sized tensors (1x3x224x224 float32, 602 KB) through every front, in one run.

A server with an echo model of that size (the worker returns its input: the output is 602 KB too,
so replies weigh as much as requests) and client shared memory on; then one blocking client per
cell, a closed loop for ``--duration-s``: KServe v2 over HTTP (binary tensor data) and gRPC
(raw contents), the binary protocol, and HTTP and gRPC with input and output in a client region
(the client writes its input there and reads its output back in each request, as a real one
would). Front CPU per request is the server process's user+system time over the cell (its
workers are other processes), divided by the requests.

    python scripts/bench_large_tensors.py --duration-s 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_serving import wait_for_line

COUNT = 3 * 224 * 224
SHAPE = (1, COUNT)  # the echo model's tensors are flat: the bytes of 1x3x224x224


def front_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cell(call: Callable[[], None], duration_s: float, pid: int) -> dict[str, float]:
    for _ in range(5):
        call()  # warm-up
    latencies = []
    cpu0, start = front_cpu_s(pid), time.perf_counter()
    while time.perf_counter() - start < duration_s:
        began = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - began)
    elapsed, cpu = time.perf_counter() - start, front_cpu_s(pid) - cpu0
    ms = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_us": cpu / len(latencies) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=3.0)
    args = parser.parse_args()

    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    import tritonclient.utils.shared_memory as shm

    from fastinfer.client import Client

    data = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        server = subprocess.Popen(
            [
                sys.executable, "-m", "fastinfer", "serve", "--models", f"big=echo:float32:{COUNT}",
                "--http-port", "0", "--management-port", "0", "--binary-port", "0", "--grpc-port", "-1",
                "--allow-client-shm", "--cache-dir", tmp, "--batch-max-size", "1",
            ],
            stderr=log.open("w"),
        )  # fmt: skip
        handles = []
        try:
            ports = wait_for_line(
                log, r"http://127\.0\.0\.1:(\d+),.*binary tcp://127\.0\.0\.1:(\d+), gRPC 127\.0\.0\.1:(\d+)", 60
            )
            wait_for_line(log, "all workers are warm", 120)
            http_url, binary_url, grpc_url = (
                f"127.0.0.1:{ports[1]}",
                f"tcp://127.0.0.1:{ports[2]}",
                f"127.0.0.1:{ports[3]}",
            )
            http, grpc_client, binary = (
                thttp.InferenceServerClient(http_url),
                tgrpc.InferenceServerClient(grpc_url),
                Client(binary_url),
            )
            for key in ("/bench-in", "/bench-out"):
                handles.append(shm.create_shared_memory_region(key[1:], key, data.nbytes))
            http.register_system_shared_memory("in", "/bench-in", data.nbytes)
            http.register_system_shared_memory("out", "/bench-out", data.nbytes)

            def plain(module, client) -> Callable[[], None]:
                tensor = module.InferInput("input", list(SHAPE), "FP32")
                tensor.set_data_from_numpy(data)
                output = [module.InferRequestedOutput("output")]
                return lambda: client.infer("big", [tensor], outputs=output).as_numpy("output")

            def in_regions(module, client) -> Callable[[], None]:
                tensor = module.InferInput("input", list(SHAPE), "FP32")
                tensor.set_shared_memory("in", data.nbytes)
                output = module.InferRequestedOutput("output")
                output.set_shared_memory("out", data.nbytes)

                def call() -> None:
                    shm.set_shared_memory_region(handles[0], [data])
                    client.infer("big", [tensor], outputs=[output])
                    shm.get_contents_as_numpy(handles[1], np.float32, SHAPE).copy()

                return call

            cells = {
                "KServe v2 HTTP (binary data)": plain(thttp, http),
                "binary protocol": lambda: binary.infer("big", {"input": data}),
                "KServe v2 gRPC (raw contents)": plain(tgrpc, grpc_client),
                "HTTP + client shared memory": in_regions(thttp, http),
                "gRPC + client shared memory": in_regions(tgrpc, grpc_client),
            }
            results = {}
            for label, call in cells.items():
                results[label] = run_cell(call, args.duration_s, server.pid)
                print(label, results[label], flush=True)
            http.unregister_system_shared_memory()
        finally:
            for handle in handles:
                shm.destroy_shared_memory_region(handle)
            server.terminate()
            server.wait(30)

    print("\n| front | requests/s | p50 (ms) | p99 (ms) | front CPU per request (us) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us']:.0f} |")


if __name__ == "__main__":
    main()
