"""Tuned TVM in each convolution layout against ONNX Runtime with as many threads, in one run.

Each ``--records LABEL=DIR`` is a records folder tuned with ``scripts/tune_records.py --layout
LAYOUT`` (same ``--mcpu``, ``--num-cores`` and, for a fair comparison, the same trial budget). The
model is compiled once per layout through the project's pipeline (``tuning.pre_tuning`` with that
layout, then ``tuning.apply_records``), checked against ONNX Runtime, and timed in turns with ONNX
Runtime (as many intra-op threads as ``--num-cores``, sequential): each of ``--windows`` rounds times every runner for
``--duration-s``; the median round is reported, and the ratios come from the same rounds.

    TVM_NUM_THREADS=1 python scripts/bench_layouts.py efficientnet:1 \\
        --records nchw=NCHW_DIR --records nhwc=NHWC_DIR --num-cores 1
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
from tune_records import model_path, model_spec, relax_module

TOLERANCE = 1e-3  # largest error allowed, relative to the largest reference output (as archives use)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=model_spec, help="NAME:BATCH, as scripts/tune_records.py takes them")
    parser.add_argument(
        "--records",
        action="append",
        required=True,
        help="LABEL=DIR (repeatable); LABEL is a layout, or LAYOUT-anything; with the word 'unpadded' "
        "(nhwc-unpadded) convolutions keep the model's channel counts, with 'copied' concatenations "
        "stay copies (not written in place)",
    )
    parser.add_argument("--mcpu", default="x86-64-v4")
    parser.add_argument("--num-cores", type=int, default=1)
    parser.add_argument("--windows", type=int, default=7, help="rounds; the median is reported")
    parser.add_argument("--duration-s", type=float, default=1.0, help="measuring window of one runner")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "fastinfer-tune-cache"))
    return parser.parse_args()


def compiled(
    model: onnx.ModelProto, batch: int, layout: str, records: Path, spec: dict, padded: bool, in_place: bool
) -> tuple:
    """The Relax VM's ``main`` of ``model`` at ``batch`` in ``layout`` with ``records``' schedules,
    the model's task count, and how many of them the records miss. ``padded``: convolutions'
    channels padded for ``spec`` as archives pad them, else as the model has them; ``in_place``:
    concatenations written in place by their inputs' kernels, as archives build them, else copies."""
    import tvm
    from tvm import relax

    from fastinfer.archive import tuning

    target = tvm.target.Target(spec)
    mod = tuning.pre_tuning(relax_module(model, batch, spec if padded else None), target, layout)
    database = tuning.load_database(records)
    tasks, missing = tuning.record_coverage(mod, target, database)
    executable = relax.build(tuning.apply_records(mod, target, database, in_place), target=target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"], tasks, missing


def mean_time(run: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call over a window of about ``seconds`` (after one warm-up call)."""
    run()
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / count


def main() -> None:
    args = parse()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.num_cores))  # before TVM starts its thread pool
    import onnxruntime as ort
    import tvm

    from fastinfer.archive.graph import at_batch

    spec = {"kind": "llvm", "mcpu": args.mcpu, "num-cores": args.num_cores}
    layouts = dict(spec.split("=", 1) for spec in args.records)
    print(
        f"TVM {tvm.__version__} (llvm {args.mcpu}, {args.num_cores} cores), ONNX Runtime {ort.__version__}, "
        f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}; median of {args.windows} rounds of {args.duration_s} s"
    )
    rows = []
    for name, batch in args.models:
        path = model_path(name, args.cache_dir)
        model = onnx.load(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.num_cores  # the threads TVM runs with
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        graph = at_batch(model, batch)
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0]
        shape = [batch, *[d if isinstance(d, int) else 1 for d in feed.shape[1:]]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        reference = session.run(None, {feed.name: x})[0]
        runners: dict[str, Callable[[], object]] = {"ort": partial(session.run, None, {feed.name: x})}
        coverage = {}
        for layout, records in layouts.items():
            started = time.monotonic()
            words = layout.split("-")
            padded, in_place = "unpadded" not in words, "copied" not in words
            main_fn, tasks, missing = compiled(model, batch, words[0], Path(records), spec, padded, in_place)
            data = tvm.runtime.tensor(x)
            out = main_fn(data)
            out = out if hasattr(out, "numpy") else out[0]  # one output, or a tuple of them
            error = float(np.abs(out.numpy() - reference).max() / np.abs(reference).max())
            status = "ok" if error <= TOLERANCE else "WRONG"
            print(
                f"{name}:{batch} {layout}: {tasks} tasks, {missing} without records, "
                f"compiled in {time.monotonic() - started:.0f} s, error {error:.1e} {status}",
                flush=True,
            )
            if error > TOLERANCE:
                raise SystemExit(f"{name} {layout}: outputs differ from ONNX Runtime")
            runners[layout] = partial(main_fn, data)
            coverage[layout] = (tasks, missing)
        rounds: dict[str, list[float]] = {key: [] for key in runners}
        for _ in range(args.windows):
            for key, run in runners.items():
                rounds[key].append(mean_time(run, args.duration_s))
        rows.append((name, batch, rounds, coverage))
        cells = ", ".join(f"{key} {statistics.median(v) * 1000:.2f} ms" for key, v in rounds.items())
        print(f"{name}:{batch}: {cells}", flush=True)
    print()
    first = next(iter(layouts))
    print(f"| model | batch | layout | tasks (without records) | TVM (ms) | ORT (ms) | TVM / ORT | vs {first} |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, batch, rounds, coverage in rows:
        ort_ms = statistics.median(rounds["ort"]) * 1000
        for layout in layouts:
            ms = statistics.median(rounds[layout]) * 1000
            # ratios per round (both timed in the same round), then the median
            to_ort = statistics.median(a / b for a, b in zip(rounds[layout], rounds["ort"], strict=True))
            to_first = statistics.median(a / b for a, b in zip(rounds[layout], rounds[first], strict=True))
            tasks, missing = coverage[layout]
            print(
                f"| {name} | {batch} | {layout.upper()} | {tasks} ({missing}) | {ms:.2f} | {ort_ms:.2f} | "
                f"{to_ort:.2f}x | {to_first:.2f}x |"
            )


if __name__ == "__main__":
    main()
