"""Compiled-model latency: TVM untuned, TVM tuned, and ONNX Runtime, in two configurations.

- all threads: one process, TVM (``TVM_NUM_THREADS``) and ONNX Runtime (``intra_op_num_threads``)
  on every core (``--threads``);
- serving: one single-threaded process per core, all running at once, each pinned to its core with
  ``os.sched_setaffinity`` — as ``fastinfer serve --devices cpu:N`` runs its workers — with TVM
  compiled for ``num-cores`` 1 and ONNX Runtime on one intra-op thread.

Models: SqueezeNet 1.0 and ResNet-50 (the ``onnx`` package's ``light_*.onnx``: real architectures,
constant weights) and EfficientNet-Lite0 (fastinfer's default model, real weights), at each batch
size of ``--batches``. Each cell is the median over ``--rounds`` of the mean time per batch over a
window of ``--duration-s``, after warm-up; in the serving configuration all processes measure the
same window at once, and a round's figure is the mean over the processes.

TVM builds go through ``fastinfer.archive.pack`` exactly as ``fastinfer archive`` does: untuned is
one library with a symbolic batch axis (all-threads configuration only); tuned is one library per
batch size from the tuning records (those shipped in the package, plus the cache; ``--tune-trials
N`` tunes what they miss first). Every TVM output is checked against ONNX Runtime before it is timed.

    python scripts/bench_compiled.py --only squeezenet --rounds 3 --duration-s 3
    python scripts/bench_compiled.py --only resnet50 --batches 1 --skip-untuned
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import MODELS, onnx_source, run_pinned

CONFIGS = ("all-threads", "serving")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=MODELS, action="append", help="this model only (repeatable)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5, help="the median round is reported")
    parser.add_argument("--duration-s", type=float, default=2.0, help="measuring window of one round")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="all-threads: threads")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="all-threads, serving, or both")
    parser.add_argument("--skip-untuned", action="store_true", help="untuned ResNet-50 takes seconds a batch")
    parser.add_argument(
        "--layout",
        choices=("auto", "nchw", "nhwc", "winograd"),
        default="auto",
        help="how tuned builds' convolutions compute (see fastinfer archive --layout)",
    )
    parser.add_argument("--tune-trials", type=int, default=0, help="tune tasks the records miss, N trials each")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "fastinfer-bench-cache"))
    return parser.parse_args()


def build(source: Path, name: str, sizes: tuple[int, ...], tuned: bool, num_cores: int, args, folder: Path) -> Path:
    """The model's archive: tuned (one library per batch size) or untuned, for ``num_cores``."""
    from fastinfer.archive.pack import BuildOptions, build_archive

    output = folder / f"{name}-{'tuned' if tuned else 'untuned'}-{num_cores}-cores.fia"
    started = time.monotonic()
    options = BuildOptions(
        name=name,
        batch_sizes=sizes,
        cache_dir=args.cache_dir,
        use_stored_records=tuned,
        tune_trials=args.tune_trials if tuned else 0,
        num_cores=num_cores,
        layout=args.layout if tuned else "auto",  # untuned builds are NCHW only
        stream=sys.stderr,
    )
    build_archive(source, output, options)
    print(f"built {output.name} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return output


def tvm_runtime(archive: Path, cache_dir: str):
    from fastinfer.archive.load import load
    from fastinfer.worker.runtime import TvmArchiveRuntime

    loaded = load(archive, cache_dir)
    manifest = loaded.manifest
    runtime = TvmArchiveRuntime(loaded.library_paths(), manifest.inputs, manifest.outputs, manifest.batch_sizes)
    runtime.load()
    return runtime


def ort_session(source: Path, batch: int, threads: int):
    import onnxruntime as ort

    from fastinfer.archive.graph import at_batch

    model = at_batch(onnx.load(str(source)), batch)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def sample(runtime, batch: int) -> np.ndarray:
    """A random input batch, 64-byte aligned as TVM wants it."""
    from fastinfer.worker.model import aligned_zeros

    spec = runtime.inputs[0]
    array = aligned_zeros((batch, *spec.shape), spec.dtype)
    array[:] = np.random.default_rng(0).random(array.shape)
    return array


def checked_runs(runtimes: dict, session, x: np.ndarray, label: str) -> dict[str, Callable[[], object]]:
    """Each TVM runtime and the ONNX Runtime session as a call on ``x``, once the TVM outputs agree
    with ONNX Runtime's."""
    feed = {session.get_inputs()[0].name: x}
    reference = session.run(None, feed)[0]
    for kind, runtime in runtimes.items():
        got = runtime.run([x])[0]
        error = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-6))
        assert error < 1e-3, f"{label}: TVM {kind} disagrees with ONNX Runtime: {error:.1e}"
    calls: dict[str, Callable[[], object]] = {kind: partial(runtime.run, [x]) for kind, runtime in runtimes.items()}
    return calls | {"ort": partial(session.run, None, feed)}


def mean_time(run: Callable[[], object], seconds: float, begin: float | None = None) -> float:
    """Mean seconds per call over a window of ``seconds`` (from ``begin``, a time.time(), if given);
    at least one call."""
    if begin is not None:
        while time.time() < begin:
            time.sleep(0.001)
    started = time.perf_counter()
    calls = 0
    while calls == 0 or time.perf_counter() - started < seconds:
        run()
        calls += 1
    return (time.perf_counter() - started) / calls


def all_threads(source: Path, name: str, archives: dict[str, Path], batch: int, args) -> dict[str, float]:
    """Median seconds per batch, one process on ``--threads`` threads (TVM untuned, tuned, ORT)."""
    runtimes = {kind: tvm_runtime(path, args.cache_dir) for kind, path in archives.items()}
    x = sample(runtimes["tuned"], batch)
    calls = checked_runs(runtimes, ort_session(source, batch, args.threads), x, f"{name} batch {batch}")
    for call in calls.values():
        call()  # warm-up
    rounds: dict[str, list[float]] = {kind: [] for kind in calls}
    for _ in range(args.rounds):
        for kind, call in calls.items():
            rounds[kind].append(mean_time(call, args.duration_s))
    return {kind: statistics.median(times) for kind, times in rounds.items()}


def serving_child(cores, wait_for_start, source, archive, cache_dir, batch, rounds, seconds) -> dict[str, list[float]]:
    """In one pinned single-threaded process (run_pinned): seconds per batch of tuned TVM and of ONNX
    Runtime, each round in its own window, the same windows in every process."""
    batch, rounds, seconds = int(batch), int(rounds), float(seconds)
    runtime = tvm_runtime(Path(archive), cache_dir)
    x = sample(runtime, batch)
    calls = checked_runs({"tuned": runtime}, ort_session(Path(source), batch, 1), x, f"{source} batch {batch}")
    for call in calls.values():
        call()
    start_at = wait_for_start()
    times: dict[str, list[float]] = {kind: [] for kind in calls}
    window = 0
    for _ in range(rounds):
        for kind, call in calls.items():
            times[kind].append(mean_time(call, seconds, start_at + window * (seconds + 0.5)))
            window += 1
    return times


def serving(source: Path, archive: Path, batch: int, args) -> dict[str, float]:
    """Median over rounds of the mean over the pinned processes of seconds per batch."""
    cores = [[core] for core in sorted(os.sched_getaffinity(0))]
    arguments = [str(source), str(archive), args.cache_dir, str(batch), str(args.rounds), str(args.duration_s)]
    results = run_pinned("bench_compiled:serving_child", cores, arguments)
    return {
        kind: statistics.median(statistics.mean(times) for times in zip(*(r[kind] for r in results), strict=True))
        for kind in results[0]
    }


def table(config: str, rows: list[tuple[str, int, dict[str, float]]], header: str) -> str:
    untuned = any("untuned" in cells for _, _, cells in rows)
    lines = [
        header,
        "",
        "| model | batch |" + (" TVM untuned (ms) |" if untuned else "") + " TVM tuned (ms) | ONNX Runtime (ms) "
        "| tuned vs ORT |",
        "| --- | ---: |" + (" ---: |" if untuned else "") + " ---: | ---: | ---: |",
    ]
    for name, batch, cells in rows:
        ratio = cells["tuned"] / cells["ort"]
        first = f" {cells['untuned'] * 1e3:.2f} |" if untuned else ""
        lines.append(
            f"| {name} | {batch} |{first} {cells['tuned'] * 1e3:.2f} | {cells['ort'] * 1e3:.2f} | "
            f"{ratio:.2f}x {'slower' if ratio > 1 else 'faster'} |"
        )
    return "\n".join(lines)


def main() -> int:
    args = parse()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    import onnxruntime as ort
    import tvm

    from fastinfer.archive import target as targets

    configs = args.configs.split(",")
    sizes = tuple(int(b) for b in args.batches.split(","))
    cores = len(os.sched_getaffinity(0))
    rows: dict[str, list] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in args.only or MODELS:
            source = onnx_source(name, args.cache_dir)
            archives = {}
            if "all-threads" in configs:
                if not args.skip_untuned:
                    archives["untuned"] = build(source, name, sizes, False, args.threads, args, folder)
                archives["tuned"] = build(source, name, sizes, True, args.threads, args, folder)
            one_core = build(source, name, sizes, True, 1, args, folder) if "serving" in configs else None
            for batch in sizes:
                if "all-threads" in configs:
                    rows["all-threads"].append((name, batch, all_threads(source, name, archives, batch, args)))
                if one_core is not None:
                    rows["serving"].append((name, batch, serving(source, one_core, batch, args)))
                for config in configs:
                    cells = rows[config][-1][2]
                    report = ", ".join(f"{kind} {seconds * 1e3:.2f} ms" for kind, seconds in cells.items())
                    print(f"{name} batch {batch}, {config}: {report}", file=sys.stderr, flush=True)

    versions = f"TVM {tvm.__version__}, ONNX Runtime {ort.__version__}; median of {args.rounds} rounds"
    described = {threads: targets.describe(targets.resolve("cpu", threads)) for threads in (args.threads, 1)}
    headers = {
        "all-threads": f"All threads: one process, {args.threads} threads each ({described[args.threads]})",
        "serving": f"Serving: {cores} pinned processes at once, 1 thread each ({described[1]}); "
        "ms per batch in each process",
    }
    print(f"\nhost {targets.host_cpu()}, {cores} cores; {versions}\n")
    print("\n\n".join(table(config, rows[config], headers[config]) for config in configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
