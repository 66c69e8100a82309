"""The binary protocol against HTTP on an identity model (16 floats, compiled by TVM).

One run on this machine: a server with the identity model, then ``fastinfer bench`` closed loops
at one client (latency through the worker process) and at 32 requests in flight (throughput):
HTTP with 32 keep-alive connections, the binary protocol as its asyncio client uses it (requests
pipelined on one connection) and with 32 connections. Prints the table and the ratios.

    python scripts/bench_protocols.py --duration-s 10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
from bench_serving import bench, wait_for_line
from onnx import TensorProto, helper


def identity_model(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--batch-max-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        identity_model(folder / "identity.onnx")
        log = folder / "server.log"
        server = subprocess.Popen(
            [
                sys.executable, "-m", "fastinfer", "serve", "--models", f"identity={folder / 'identity.onnx'}",
                "--http-port", "0", "--management-port", "0", "--binary-port", "0", "--cache-dir", str(folder),
                "--batch-max-size", str(args.batch_max_size),
            ],
            stderr=log.open("w"),
        )  # fmt: skip
        try:
            ports = wait_for_line(log, r"http://127\.0\.0\.1:(\d+),.*binary tcp://127\.0\.0\.1:(\d+)", 120)
            wait_for_line(log, "ready: all workers are warm", 300)
            http, binary = f"http://127.0.0.1:{ports[1]}", f"tcp://127.0.0.1:{ports[2]}"
            runs = [
                ("binary, 1 client", binary, 1, 1),
                ("http, 1 client", http, 1, 1),
                ("binary, 32 pipelined on 1 connection", binary, 32, 32),
                ("binary, 32 connections", binary, 32, 1),
                ("http, 32 connections", http, 32, 1),
            ]
            results = {}
            for label, url, concurrency, pipeline in runs:
                results[label] = bench(url, "identity", concurrency, args.duration_s, "1,16", pipeline=pipeline)
                print(f"{label}: {results[label]}", flush=True)
        finally:
            server.terminate()
            server.wait(30)

    print("\n| run | requests/s | p50 (ms) | p99 (ms) |\n| --- | ---: | ---: | ---: |")
    for label, result in results.items():
        print(f"| {label} | {result['throughput_rps']:.0f} | {result['p50_ms']:.3f} | {result['p99_ms']:.3f} |")
    http_rate = results["http, 32 connections"]["throughput_rps"]
    for label in ("binary, 32 pipelined on 1 connection", "binary, 32 connections"):
        print(f"\n{label} / http, 32 connections: {results[label]['throughput_rps'] / http_rate:.2f}x", end="")
    print(f"\nbinary p50 with one client: {results['binary, 1 client']['p50_ms'] * 1000:.0f} us")


if __name__ == "__main__":
    main()
