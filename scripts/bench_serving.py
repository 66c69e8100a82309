"""Served throughput and latency against the model's own best, and against Flask + gunicorn.

One run on this machine, the same compiled SqueezeNet 1.0 everywhere, in rounds; each round measures
1. in-process: the compiled model called directly at each compiled batch size, all cores busy at
   once (the best is the round's ceiling);
2. fastinfer over the binary protocol and over HTTP (raw tensors), closed loop, at several
   concurrencies (``fastinfer bench``);
3. Flask + gunicorn (2 sync workers, one TVM thread each) over HTTP, the same way.
It prints the medians over the rounds, each served rate taken against its own round's ceiling
(the machine is shared), and with ``--out DIR`` writes serving.md and a plot there.

    python scripts/bench_serving.py --duration-s 6 --rounds 3 --batch-sizes 1 --out docs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from fastinfer.worker.model import load_model

HERE = Path(__file__).resolve().parent
CONCURRENCIES = (1, 4, 16, 32)
MEDIANS = ("throughput_rps", "of_best", "p50_ms", "p99_ms")


def squeezenet_archive(folder: Path, batch_sizes: str) -> Path:
    """The onnx package's light SqueezeNet 1.0 as a tuned archive, one library per batch size,
    compiled from the tuning records the package ships (tasks they miss get default schedules)."""
    from fastinfer.archive.pack import BuildOptions, build_archive

    source = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    path = folder / "squeezenet.fia"
    sizes = tuple(int(size) for size in batch_sizes.split(","))
    options = BuildOptions(
        name="squeezenet", batch_sizes=sizes, cache_dir=str(folder / "cache"), use_stored_records=True
    )
    build_archive(source, path, options)
    return path


def in_process_rates(model, seconds: float, start_at: float) -> dict[int, float]:
    """Samples per second of the compiled model called directly, by batch size: batch size k is
    measured in window k, ``seconds`` long, counted from ``start_at`` (a time.time()), so that
    processes started together measure the same batch size at the same time."""
    from fastinfer.worker.model import aligned_zeros

    spec = model.signature.inputs[0]
    rates = {}
    for window, batch in enumerate(model.signature.batch_sizes or (1, 2, 4, 8)):
        array = aligned_zeros((batch, *spec.shape), spec.dtype)
        array[:] = np.random.default_rng(0).random(array.shape)
        model.runtime.run([array])
        begin = start_at + window * (seconds + 0.5)
        while time.time() < begin:
            time.sleep(0.001)
        runs, now = 0, begin
        while (now := time.time()) < begin + seconds:
            model.runtime.run([array])
            runs += 1
        rates[batch] = batch * runs / (now - begin)
    return rates


def measure_in_children(
    archive: Path,
    folder: Path,
    core_sets: list[list[int]],
    seconds: float,
    on_start: Callable[[float], None] | None = None,
) -> dict[int, float]:
    """in_process_rates() in one fresh process per core set (pinned, one TVM thread a core), all
    measuring at once; the samples per second of all of them together, by batch size.
    ``on_start`` is told when (a time.time()) their first measuring window begins."""
    code = (
        "import json, os, sys, time; sys.path.insert(0, sys.argv[1]); import bench_serving as b;"
        "cores = [int(c) for c in sys.argv[4].split(',')]; os.sched_setaffinity(0, cores);"
        "m = b.load_model('m', sys.argv[2], cache_dir=sys.argv[3], num_cores=len(cores), max_image_pixels=0);"
        "print('ready', flush=True); start_at = float(sys.stdin.readline());"
        "print(json.dumps(b.in_process_rates(m, float(sys.argv[5]), start_at)))"
    )
    children = []
    for cores in core_sets:
        environment = {**os.environ, "TVM_NUM_THREADS": str(len(cores))}
        arguments = [str(HERE), str(archive), str(folder / "cache"), ",".join(map(str, cores)), str(seconds)]
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *arguments],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=environment,
            )
        )
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    start_at = time.time() + 0.5
    for child in children:
        assert child.stdin is not None
        child.stdin.write(f"{start_at}\n")
        child.stdin.close()
    if on_start is not None:
        on_start(start_at)
    outputs = [child.stdout.read() for child in children]  # type: ignore[union-attr]
    for child in children:
        child.wait()
    if any(child.returncode for child in children):
        raise RuntimeError("an in-process measurement failed")
    total: dict[int, float] = {}
    for output in outputs:
        for batch, rate in json.loads(output.splitlines()[-1]).items():
            total[int(batch)] = total.get(int(batch), 0.0) + rate
    return total


def wait_for_line(log: Path, pattern: str, timeout_s: float) -> re.Match:
    """Wait for a line of a process's log (a file, so that a full pipe never blocks the process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(pattern, log.read_text()):
            return match
        time.sleep(0.2)
    raise RuntimeError(f"no line matching {pattern!r} in {log}")


def bench_command(
    url: str, model: str, concurrency: int, seconds: float, shape: str, input_name: str | None = None, pipeline: int = 1
) -> list[str]:
    """``fastinfer bench`` with its result as one JSON line."""
    command = [
        sys.executable, "-m", "fastinfer", "bench", "--url", url, "--model", model, "--shape", shape,
        "--concurrency", str(concurrency), "--pipeline", str(pipeline), "--duration-s", str(seconds), "--json",
    ]  # fmt: skip
    return command + (["--input-name", input_name] if input_name else [])


def bench(
    url: str, model: str, concurrency: int, seconds: float, shape: str, input_name: str | None = None, pipeline: int = 1
) -> dict:
    command = bench_command(url, model, concurrency, seconds, shape, input_name, pipeline)
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def start_fastinfer(archive: Path, folder: Path, devices: str) -> tuple[subprocess.Popen, dict[str, str]]:
    log = folder / "server.log"
    command = [
        sys.executable, "-m", "fastinfer", "serve", "--models", f"squeezenet={archive}",
        "--http-port", "0", "--management-port", "0", "--binary-port", "0", "--cache-dir", str(folder / "cache"),
        "--devices", devices, "--queue-max-size", "1024",
    ]  # fmt: skip
    server = subprocess.Popen(command, stderr=log.open("w"))
    ports = wait_for_line(log, r"http://127\.0\.0\.1:(\d+),.*binary tcp://127\.0\.0\.1:(\d+)", 120)
    wait_for_line(log, "ready: all workers are warm", 600)
    return server, {"fastinfer binary": f"tcp://127.0.0.1:{ports[2]}", "fastinfer http": f"http://127.0.0.1:{ports[1]}"}


def start_gunicorn(archive: Path, folder: Path, cores: int) -> tuple[subprocess.Popen, dict[str, str]]:
    environment = {**os.environ, "FASTINFER_BASELINE_ARCHIVE": str(archive), "TVM_NUM_THREADS": "1"}
    log = folder / "baseline.log"
    command = [sys.executable, "-m", "gunicorn", "-w", str(cores), "-b", "127.0.0.1:0", "--chdir", str(HERE)]
    server = subprocess.Popen([*command, "flask_baseline:app"], stderr=log.open("w"), env=environment)
    port = wait_for_line(log, r"Listening at: http://127\.0\.0\.1:(\d+)", 60)[1]
    time.sleep(3)  # workers import TVM
    return server, {"flask+gunicorn": f"http://127.0.0.1:{port}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="measure everything this many times; report medians")
    parser.add_argument("--out", type=Path, help="write benchmarks.md and serving.png here")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--batch-sizes", default="1,8", help="compiled batch sizes of the archive")
    parser.add_argument("--devices", default=None, help="fastinfer's --devices (default: cpu:N, one worker a core)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        archive = squeezenet_archive(folder, args.batch_sizes)
        cores = len(os.sched_getaffinity(0))
        model = load_model(
            "squeezenet", str(archive), cache_dir=str(folder / "cache"), num_cores=cores, max_image_pixels=0
        )
        spec = model.signature.inputs[0]
        shape = ",".join(str(d) for d in (1, *spec.shape))
        del model
        print(f"SqueezeNet 1.0, {cores} cores, input {spec.name} {shape}", flush=True)

        servers: list[subprocess.Popen] = []
        try:
            server, urls = start_fastinfer(archive, folder, args.devices or f"cpu:{cores}")
            servers.append(server)
            server, baseline_urls = start_gunicorn(archive, folder, cores)
            servers.append(server)
            urls |= baseline_urls
            # Each round measures the ceiling, then every server at every concurrency, so that a
            # served rate is compared with the ceiling of its own round (the machine is shared).
            rows, ceilings = [], []
            for number in range(1, args.rounds + 1):
                ceiling = measure_ceiling(archive, folder, args.duration_s)
                best = max(ceiling.values())
                ceilings.append(ceiling)
                print(f"round {number}, in-process: " + ", ".join(f"{k}: {r:.1f}/s" for k, r in ceiling.items()))
                for concurrency in args.concurrency:
                    for name, url in urls.items():
                        result = bench(url, "squeezenet", concurrency, args.duration_s, shape, spec.name)
                        rows.append(
                            {"server": name, "round": number, "of_best": result["throughput_rps"] / best, **result}
                        )
                        print(rows[-1], flush=True)
        finally:
            for server in servers:
                server.terminate()
                server.wait(30)

    report(rows, ceilings, args)


def measure_ceiling(archive: Path, folder: Path, seconds: float) -> dict[str, float]:
    """The model called directly: all cores on one process's batches, or one single-threaded
    process per core, all of them running at once (as a server's workers do); samples/s by setup."""
    all_cores = sorted(os.sched_getaffinity(0))
    shared = measure_in_children(archive, folder, [all_cores], seconds)
    one_each = measure_in_children(archive, folder, [[core] for core in all_cores], seconds)
    ceiling = {f"{len(all_cores)} threads, batch {b}": rate for b, rate in shared.items()}
    return ceiling | {f"{len(all_cores)} x 1 thread, batch {b}": rate for b, rate in one_each.items()}


def report(rows: list[dict], ceilings: list[dict[str, float]], args) -> None:
    """Medians over the rounds: throughput, its share of the round's ceiling, latencies."""
    median = statistics.median
    merged = []
    for server in dict.fromkeys(row["server"] for row in rows):
        for concurrency in args.concurrency:
            mine = [row for row in rows if row["server"] == server and row["concurrency"] == concurrency]
            merged.append(
                {
                    "server": server,
                    "concurrency": concurrency,
                    **{
                        key: median(row[key] for row in mine)
                        for key in ("throughput_rps", "of_best", "p50_ms", "p99_ms")
                    },
                    "shares": [row["of_best"] for row in mine],
                }
            )
    lines = [
        "| server | concurrency | throughput (req/s) | of in-process best | each round | p50 (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for row in merged:
        shares = ", ".join(f"{share:.0%}" for share in row["shares"])
        lines.append(
            f"| {row['server']} | {row['concurrency']} | {row['throughput_rps']:.1f} | {row['of_best']:.0%} | "
            f"{shares} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
        )
    table = "\n".join(lines)
    ceiling_lines = "\n".join(
        f"- round {number}: " + ", ".join(f"{k}: {r:.1f} samples/s" for k, r in ceiling.items())
        for number, ceiling in enumerate(ceilings, 1)
    )
    print(f"\nin-process ceiling:\n{ceiling_lines}\n\n{table}")
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = median(max(ceiling.values()) for ceiling in ceilings)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server in dict.fromkeys(row["server"] for row in merged):
        mine = [row for row in merged if row["server"] == server]
        left.plot([r["concurrency"] for r in mine], [r["throughput_rps"] for r in mine], marker="o", label=server)
        right.plot([r["concurrency"] for r in mine], [r["p99_ms"] for r in mine], marker="o", label=server)
    left.axhline(best, linestyle="--", color="grey", label="in-process best")
    left.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="Throughput (median of rounds)")
    right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="p99 latency")
    left.legend()
    figure.tight_layout()
    figure.savefig(args.out / "serving.png", dpi=100)
    (args.out / "serving.md").write_text(
        f"In-process ceiling:\n\n{ceiling_lines}\n\n{table}\n\n![throughput and p99 latency](serving.png)\n"
    )


if __name__ == "__main__":
    main()
