"""Served throughput and latency against the model's own best, and against Flask + gunicorn.

One run on this machine, the same compiled model everywhere (``--model``: SqueezeNet 1.0, the onnx
package's light model, or EfficientNet-Lite0, the default model's graph, both tuned from the records
the package ships), in rounds; each round measures
1. in-process: the compiled model called directly at each compiled batch size, all cores busy at
   once (the best is the round's ceiling);
2. fastinfer over the binary protocol and over HTTP (raw tensors), closed loop, at several
   concurrencies (``fastinfer bench``);
3. Flask + gunicorn (one sync worker a core) over HTTP, the same way: calling the same TVM archive
   (one TVM thread a worker), and calling ONNX Runtime on the same ONNX file (one intra-op thread
   a worker).
It prints the medians over the rounds, each served rate taken against its own round's ceiling
(the machine is shared) and against Flask + ONNX Runtime at the same concurrency, and with
``--out DIR`` writes serving.md and a plot there.

    python scripts/bench_serving.py --duration-s 6 --rounds 3 --batch-sizes 1 --out docs
    python scripts/bench_serving.py --model efficientnet --duration-s 6 --rounds 1 --concurrency 32 --batch-sizes 1
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
MEDIANS = ("throughput_rps", "of_best", "vs_flask_ort", "p50_ms", "p99_ms")
MODELS = ("squeezenet", "resnet50", "efficientnet")
ORT_BASELINE = "flask+onnxruntime"


def onnx_source(model: str, cache_dir: str | Path) -> Path:
    """The ONNX file of a benchmark model: squeezenet and resnet50 are the onnx package's light
    models (real architectures, constant weights); efficientnet is the default model's graph
    (EfficientNet-Lite0, real weights), written into ``cache_dir`` once."""
    if model == "efficientnet":
        from fastinfer.models import default

        return default.onnx_path(cache_dir)
    return Path(onnx.__file__).parent / f"backend/test/data/light/light_{model}.onnx"


def tuned_archive(
    model: str, folder: Path, batch_sizes: str, num_cores: int | None = None, layout: str = "auto"
) -> Path:
    """``model`` as a tuned archive, one library per batch size, compiled for ``num_cores`` (None:
    all) and ``layout`` from the tuning records the package ships (tasks they miss get default schedules)."""
    from fastinfer.archive.pack import BuildOptions, build_archive

    cache = folder / "cache"
    path = folder / f"{model}-{num_cores or 'all'}-cores-{layout}.fia"
    sizes = tuple(int(size) for size in batch_sizes.split(","))
    options = BuildOptions(
        name=model,
        batch_sizes=sizes,
        cache_dir=str(cache),
        use_stored_records=True,
        num_cores=num_cores,
        layout=layout,
    )
    build_archive(onnx_source(model, cache), path, options)
    return path


def squeezenet_archive(folder: Path, batch_sizes: str) -> Path:
    """SqueezeNet 1.0 as a tuned archive (see tuned_archive)."""
    return tuned_archive("squeezenet", folder, batch_sizes)


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


# A process of run_pinned(): pinned to its cores, it calls FUNCTION(cores, wait_for_start, *ARGUMENTS)
# of a module in scripts/ and prints what it returns as JSON.
PINNED_CHILD = """
import importlib, json, os, sys
sys.path.insert(0, sys.argv[1])
cores = [int(core) for core in sys.argv[3].split(",")]
os.sched_setaffinity(0, cores)
module, _, function = sys.argv[2].partition(":")

def wait_for_start():
    print("ready", flush=True)
    return float(sys.stdin.readline())

print(json.dumps(getattr(importlib.import_module(module), function)(cores, wait_for_start, *sys.argv[4:])))
"""


def run_pinned(
    call: str, core_sets: list[list[int]], arguments: list[str], on_start: Callable[[float], None] | None = None
) -> list:
    """Call ``call`` ("module:function", a module in scripts/) in one fresh process per core set,
    pinned to it with one TVM thread a core, all at once; their results (JSON), in order.

    Each process gets ready (loads its model), then calls ``wait_for_start()``, which returns when
    all are ready with the same start time (a time.time(), a moment later) for all of them.
    ``on_start`` is told that time too."""
    children = []
    for cores in core_sets:
        environment = {**os.environ, "TVM_NUM_THREADS": str(len(cores))}
        command = [sys.executable, "-c", PINNED_CHILD, str(HERE), call, ",".join(map(str, cores)), *arguments]
        children.append(
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment)
        )
    try:
        for child in children:
            assert child.stdout is not None
            while (line := child.stdout.readline()) and line.strip() != "ready":
                pass
            if not line:
                raise RuntimeError(f"a pinned process of {call} failed before it was ready")
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
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if any(child.returncode for child in children):
        raise RuntimeError(f"a pinned process of {call} failed")
    return [json.loads(output.splitlines()[-1]) for output in outputs]


def _child_rates(cores: list[int], wait_for_start: Callable[[], float], archive: str, cache: str, seconds: str):
    """In a pinned process: load the archive, then in_process_rates() from the common start."""
    model = load_model("m", archive, cache_dir=cache, num_cores=len(cores), max_image_pixels=0)
    return in_process_rates(model, float(seconds), wait_for_start())


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
    arguments = [str(archive), str(folder / "cache"), str(seconds)]
    total: dict[int, float] = {}
    for rates in run_pinned("bench_serving:_child_rates", core_sets, arguments, on_start):
        for batch, rate in rates.items():
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
    url: str,
    model: str,
    concurrency: int,
    seconds: float,
    shape: str,
    input_name: str | None = None,
    pipeline: int = 1,
    image: Path | None = None,
) -> list[str]:
    """``fastinfer bench`` with its result as one JSON line; ``image``: send that encoded image."""
    command = [
        sys.executable, "-m", "fastinfer", "bench", "--url", url, "--model", model, "--shape", shape,
        "--concurrency", str(concurrency), "--pipeline", str(pipeline), "--duration-s", str(seconds), "--json",
    ]  # fmt: skip
    return command + (["--input-name", input_name] if input_name else []) + (["--image", str(image)] if image else [])


def bench(
    url: str,
    model: str,
    concurrency: int,
    seconds: float,
    shape: str,
    input_name: str | None = None,
    pipeline: int = 1,
    image: Path | None = None,
) -> dict:
    command = bench_command(url, model, concurrency, seconds, shape, input_name, pipeline, image)
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def start_fastinfer(
    archive: Path | None, folder: Path, devices: str, name: str = "squeezenet", cache: Path | None = None
) -> tuple[subprocess.Popen, dict[str, str]]:
    """``fastinfer serve`` with ``archive`` as model ``name`` (None: the default model); its URLs."""
    log = folder / "server.log"
    models = ["--models", f"{name}={archive}"] if archive is not None else []
    command = [
        sys.executable, "-m", "fastinfer", "serve", *models,
        "--http-port", "0", "--management-port", "0", "--binary-port", "0", "--grpc-port", "0",
        "--cache-dir", str(cache or folder / "cache"), "--devices", devices, "--queue-max-size", "1024",
    ]  # fmt: skip
    server = subprocess.Popen(command, stderr=log.open("w"))
    ports = wait_for_line(log, r"http://127\.0\.0\.1:(\d+),.*binary tcp://127\.0\.0\.1:(\d+)", 120)
    wait_for_line(log, "ready: all workers are warm", 600)
    return server, {"fastinfer binary": f"tcp://127.0.0.1:{ports[2]}", "fastinfer http": f"http://127.0.0.1:{ports[1]}"}


def start_flask(app: str, environment: dict[str, str], folder: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """gunicorn with ``workers`` sync workers running ``app`` (a module in scripts/), once each has
    loaded its model (the apps print "baseline ready" then); its URL."""
    log = folder / f"{app}.log"
    command = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", "127.0.0.1:0", "--chdir", str(HERE)]
    server = subprocess.Popen([*command, f"{app}:app"], stderr=log.open("w"), env={**os.environ, **environment})
    port = wait_for_line(log, r"Listening at: http://127\.0\.0\.1:(\d+)", 60)[1]
    deadline = time.monotonic() + 120
    while log.read_text().count("baseline ready") < workers:
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"{app} did not start; see {log}")
        time.sleep(0.2)
    return server, f"http://127.0.0.1:{port}"


def start_gunicorn(archive: Path, folder: Path, cores: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """Flask + gunicorn calling the TVM archive, one worker (one TVM thread) a core."""
    environment = {"FASTINFER_BASELINE_ARCHIVE": str(archive), "TVM_NUM_THREADS": "1"}
    server, url = start_flask("flask_baseline", environment, folder, cores)
    return server, {"flask+gunicorn": url}


def start_gunicorn_onnxruntime(source: Path, folder: Path, cores: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """Flask + gunicorn calling ONNX Runtime on the ONNX file, one worker (one intra-op thread) a core."""
    server, url = start_flask("flask_onnxruntime", {"FASTINFER_BASELINE_ONNX": str(source)}, folder, cores)
    return server, {ORT_BASELINE: url}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("squeezenet", "efficientnet"), default="squeezenet")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="measure everything this many times; report medians")
    parser.add_argument("--out", type=Path, help="write serving.md and serving.png here")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--batch-sizes", default="1,8", help="compiled batch sizes of the archive")
    parser.add_argument("--devices", default=None, help="fastinfer's --devices (default: cpu:N, one worker a core)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Workers of --devices cpu:N run one thread each: the code tuned for one core is what serves.
        one_per_core = args.devices is None or args.devices.startswith("cpu:")
        archive = tuned_archive(args.model, folder, args.batch_sizes, num_cores=1 if one_per_core else None)
        cores = len(os.sched_getaffinity(0))
        model = load_model(
            args.model, str(archive), cache_dir=str(folder / "cache"), num_cores=cores, max_image_pixels=0
        )
        spec = model.signature.inputs[0]
        shape = ",".join(str(d) for d in (1, *spec.shape))
        del model
        print(f"{args.model}, {cores} cores, input {spec.name} {shape}", flush=True)

        servers: list[subprocess.Popen] = []
        try:
            server, urls = start_fastinfer(archive, folder, args.devices or f"cpu:{cores}", args.model)
            servers.append(server)
            server, baseline_urls = start_gunicorn(archive, folder, cores)
            servers.append(server)
            urls |= baseline_urls
            server, baseline_urls = start_gunicorn_onnxruntime(onnx_source(args.model, folder / "cache"), folder, cores)
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
                    served = {}
                    for name, url in urls.items():
                        served[name] = bench(url, args.model, concurrency, args.duration_s, shape, spec.name)
                    for name, result in served.items():
                        rate = result["throughput_rps"]
                        rows.append(
                            {
                                "server": name,
                                "round": number,
                                "of_best": rate / best,
                                "vs_flask_ort": rate / max(served[ORT_BASELINE]["throughput_rps"], 1e-9),
                                **result,
                            }
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
                    **{key: median(row[key] for row in mine) for key in MEDIANS},
                    "shares": [row["of_best"] for row in mine],
                }
            )
    lines = [
        f"{args.model}: median of {args.rounds} rounds; each ratio is taken within its round",
        "",
        "| server | concurrency | throughput (req/s) | of in-process best | each round | vs Flask + ORT "
        "| p50 (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in merged:
        shares = ", ".join(f"{share:.0%}" for share in row["shares"])
        lines.append(
            f"| {row['server']} | {row['concurrency']} | {row['throughput_rps']:.1f} | {row['of_best']:.0%} | "
            f"{shares} | {row['vs_flask_ort']:.2f}x | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
        )
    table = "\n".join(lines)
    ceiling_lines = "\n".join(
        f"- round {number}: " + ", ".join(f"{k}: {r:.1f} samples/s" for k, r in ceiling.items())
        for number, ceiling in enumerate(ceilings, 1)
    )
    at = max(args.concurrency)
    target = ", ".join(
        f"{row['server']} {row['vs_flask_ort']:.2f}x"
        for row in merged
        if row["concurrency"] == at and row["server"].startswith("fastinfer")
    )
    print(f"\nin-process ceiling:\n{ceiling_lines}\n\n{table}\n\nat {at} clients, against Flask + ORT: {target}")
    if args.out is None:
        return
    stem = "serving" if args.model == "squeezenet" else f"serving-{args.model}"
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
    figure.savefig(args.out / f"{stem}.png", dpi=100)
    (args.out / f"{stem}.md").write_text(
        f"In-process ceiling:\n\n{ceiling_lines}\n\n{table}\n\n![throughput and p99 latency]({stem}.png)\n"
    )


if __name__ == "__main__":
    main()
