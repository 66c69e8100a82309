"""Compiled-model latency: TVM untuned, TVM tuned, and ONNX Runtime, on the same thread count.

SqueezeNet 1.0 (the ``onnx`` package's ``light_squeezenet.onnx``: the real architecture, constant
weights) and EfficientNet-Lite0 (fastinfer's default model, real weights), at batch 1 and 8. Each
cell is the median over ``--repeats`` rounds of the mean time of ``--number`` runs, after warm-up.

TVM builds go through ``fastinfer.archive.pack`` exactly as ``fastinfer archive`` does: untuned is
one library with a symbolic batch axis; tuned is one library per batch size from the tuning records
(those shipped in the package, plus the cache; ``--tune-trials N`` tunes what they miss first).

    python scripts/bench_compiled.py                 # threads: all cores
    python scripts/bench_compiled.py --threads 1 --only squeezenet
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for TVM and ONNX Runtime")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--only", choices=["squeezenet", "efficientnet_lite0"], action="append")
    parser.add_argument("--repeats", type=int, default=7, help="rounds; the median round is reported")
    parser.add_argument("--number", type=int, default=5, help="runs per round (batch 1; fewer for larger batches)")
    parser.add_argument("--tune-trials", type=int, default=0, help="tune tasks the records miss, N trials each")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "fastinfer-bench-cache"))
    parser.add_argument("--skip-untuned", action="store_true", help="untuned EfficientNet at batch 8 takes seconds")
    return parser.parse_args()


ARGS = parse()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # before TVM loads its thread pool

import numpy as np  # noqa: E402
import onnx  # noqa: E402


def models(cache_dir: str) -> dict[str, Path]:
    from fastinfer.models import default

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    found = {"squeezenet": light / "light_squeezenet.onnx", "efficientnet_lite0": default.onnx_path(cache_dir)}
    return {name: path for name, path in found.items() if not ARGS.only or name in ARGS.only}


def timed(run, batch: int) -> float:
    """Median over rounds of the mean seconds per call."""
    number = max(1, ARGS.number // batch) if batch > 1 else ARGS.number
    for _ in range(2):
        run()
    rounds = []
    for _ in range(ARGS.repeats):
        started = time.perf_counter()
        for _ in range(number):
            run()
        rounds.append((time.perf_counter() - started) / number)
    return statistics.median(rounds)


def tvm_runner(onnx_path: Path, name: str, sizes: tuple[int, ...], tuned: bool, workdir: Path):
    from fastinfer.archive.load import load
    from fastinfer.archive.pack import BuildOptions, build_archive
    from fastinfer.worker.runtime import TvmArchiveRuntime

    output = workdir / f"{name}-{'tuned' if tuned else 'untuned'}.fia"
    started = time.monotonic()
    manifest = build_archive(
        onnx_path,
        output,
        BuildOptions(
            name=name,
            batch_sizes=sizes,
            cache_dir=ARGS.cache_dir,
            use_stored_records=tuned,
            tune_trials=ARGS.tune_trials if tuned else 0,
            num_cores=ARGS.threads,
            stream=sys.stderr,
        ),
    )
    print(f"built {output.name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    archive = load(output, ARGS.cache_dir)
    runtime = TvmArchiveRuntime(archive.library_paths(), manifest.inputs, manifest.outputs, manifest.batch_sizes)
    runtime.load()
    return runtime, manifest


def aligned(array: np.ndarray) -> np.ndarray:
    from fastinfer.worker.model import aligned_zeros

    out = aligned_zeros(array.shape, array.dtype.name)
    out[:] = array
    return out


def ort_session(onnx_path: Path, batch: int):
    import onnxruntime as ort

    from fastinfer.archive.graph import with_batch

    model = with_batch(onnx.load(str(onnx_path)), batch)
    options = ort.SessionOptions()
    options.intra_op_num_threads = ARGS.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> int:
    import onnxruntime as ort
    import tvm

    from fastinfer.archive import target as targets

    sizes = tuple(int(b) for b in ARGS.batches.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        for name, path in models(ARGS.cache_dir).items():
            runtimes = {}
            if not ARGS.skip_untuned:
                runtimes["untuned"] = tvm_runner(path, name, sizes, False, workdir)
            runtimes["tuned"] = tvm_runner(path, name, sizes, True, workdir)
            spec = runtimes["tuned"][1].inputs[0]
            for batch in sizes:
                x = np.random.default_rng(0).random((batch, *spec.shape), dtype=np.float32)
                xa = aligned(x)
                cells = {}
                outputs = {}
                for kind, (runtime, _) in runtimes.items():
                    outputs[kind] = runtime.run([xa])[0]
                    cells[kind] = timed(lambda r=runtime, a=xa: r.run([a]), batch)
                session = ort_session(path, batch)
                feed = {session.get_inputs()[0].name: x}
                reference = session.run(None, feed)[0]
                cells["ort"] = timed(lambda s=session, f=feed: s.run(None, f), batch)
                for kind, got in outputs.items():
                    error = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-6))
                    assert error < 1e-3, f"{name} {kind} batch {batch} disagrees with ONNX Runtime: {error:.1e}"
                rows.append((name, batch, cells))
                print(
                    f"{name} batch {batch}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in cells.items()),
                    file=sys.stderr,
                )

    tuned_target = targets.resolve("cpu", ARGS.threads)
    print(
        f"\nhost {targets.host_cpu()}, {os.cpu_count()} cores; {ARGS.threads} threads each; TVM {tvm.__version__} "
        f"({targets.describe(tuned_target)}), ONNX Runtime {ort.__version__}; median of {ARGS.repeats} rounds\n"
    )
    print("| model | batch | TVM untuned (ms) | TVM tuned (ms) | ONNX Runtime (ms) | tuned vs ORT |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, batch, cells in rows:
        untuned = f"{cells['untuned'] * 1e3:.2f}" if "untuned" in cells else "-"
        ratio = cells["tuned"] / cells["ort"]
        print(
            f"| {name} | {batch} | {untuned} | {cells['tuned'] * 1e3:.2f} | {cells['ort'] * 1e3:.2f} | "
            f"{ratio:.2f}x {'slower' if ratio > 1 else 'faster'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
