"""One fastinfer container against the same server outside a container, in the same run.

    python scripts/bench_container.py [--image ghcr.io/fastinfer/fastinfer:latest] [--archive M.fia --model M
        --shape 1,16 --input-name x] [--devices cpu:1] [--concurrency 8] [--duration-s 10] [--rounds 2]

Both serve the same archive with the same flags (the runtime's, as scripts/kserve renders them),
one CPU worker each; ``fastinfer bench`` loads each over HTTP, alternating, ``--rounds`` times.
Without ``--archive`` a small model (y = 2x + 1 over float32 [N, 16]) is built, which measures what
the container adds to the server's own path rather than compute. Build the image first with
scripts/kserve/build-image.sh; PODMAN_FLAGS and RUN_FLAGS hold podman's global and run flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_archive(folder: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from fastinfer.archive.pack import BuildOptions, build_archive

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    two = helper.make_tensor("two", TensorProto.FLOAT, [16], np.full(16, 2, np.float32))
    one = helper.make_tensor("one", TensorProto.FLOAT, [16], np.ones(16, np.float32))
    nodes = [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], [two, one]))
    model.ir_version, model.opset_import[0].version = 8, 17
    onnx.save(model, str(folder / "tiny.onnx"))
    output = folder / "tiny.fia"
    build_archive(folder / "tiny.onnx", output, BuildOptions(name="tiny", cache_dir=str(folder / "cache")))
    return output


def wait_ready(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {timeout_s} s")


def bench(url: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "fastinfer", "bench", "--url", url, "--model", args.model, "--json"]
    command += ["--shape", args.shape, "--input-name", args.input_name, "--concurrency", str(args.concurrency)]
    command += ["--duration-s", str(args.duration_s)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def server_args(args: argparse.Namespace, models: str, port: int) -> list[str]:
    return [
        f"--models={args.model}={models}",
        f"--http-port={port}",
        f"--management-port={free_port()}",
        f"--binary-port={free_port()}",
        f"--devices={args.devices}",
    ]


def run_native(args: argparse.Namespace, models: Path, cache: Path) -> dict:
    port = free_port()
    environ = {**os.environ, "FASTINFER_CACHE_DIR": str(cache), "FASTINFER_CONFIG": ""}
    command = [sys.executable, "-m", "fastinfer", "serve", *server_args(args, str(models), port)]
    process = subprocess.Popen(command, env=environ, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        return bench(f"http://127.0.0.1:{port}", args)
    finally:
        process.terminate()
        process.wait(60)


def run_container(args: argparse.Namespace, models: Path, cache: Path) -> dict:
    podman = ["podman", *shlex.split(os.environ.get("PODMAN_FLAGS", "--cgroup-manager=cgroupfs"))]
    flags = shlex.split(
        os.environ.get("RUN_FLAGS", "--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host")
    )
    port = free_port()
    name = f"fastinfer-bench-{port}"
    command = [*podman, "run", "--detach", "--name", name, *flags, "--read-only", "--shm-size=512m"]
    command += ["-v", f"{models}:/mnt/models:ro", "-v", f"{cache}:/var/cache/fastinfer", f"--cpus={args.cpus}"]
    subprocess.run([*command, args.image, *server_args(args, "/mnt/models", port)], check=True, capture_output=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        return bench(f"http://127.0.0.1:{port}", args)
    finally:
        subprocess.run([*podman, "rm", "--force", "--time=10", name], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="ghcr.io/fastinfer/fastinfer:latest")
    parser.add_argument("--archive", help="the model archive to serve (default: a small model built here)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--shape", default="1,16")
    parser.add_argument("--input-name", default="x")
    parser.add_argument("--devices", default="cpu:1")
    parser.add_argument("--cpus", default="0", help="podman --cpus for the container (0: no limit)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        models = work / "models"
        models.mkdir()
        archive = Path(args.archive) if args.archive else tiny_archive(work)
        (models / archive.name).write_bytes(archive.read_bytes())
        models.chmod(0o755)
        results: dict[str, list[dict]] = {"native": [], "container": []}
        for round_index in range(args.rounds):
            for where, run in (("native", run_native), ("container", run_container)):
                cache = work / f"cache-{where}-{round_index}"
                cache.mkdir()
                os.chown(cache, 1000, 1000) if os.geteuid() == 0 else None
                result = run(args, models, cache)
                results[where].append(result)
                print(
                    f"{where:>9} round {round_index + 1}: {result['throughput_rps']:9.1f} req/s  "
                    f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms",
                    flush=True,
                )
        for where, runs in results.items():
            best = max(runs, key=lambda r: r["throughput_rps"])
            print(f"{where:>9} best: {best['throughput_rps']:.1f} req/s, p99 {best['p99_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
