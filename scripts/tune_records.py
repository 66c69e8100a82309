"""Tune models for a portable CPU level and keep the best record of each task in one folder.

This produced the records that ship in ``fastinfer/models/tuning/<level>/`` for the default
EfficientNet-Lite0. Run it niced: it takes every core for minutes.

    nice -n 19 python scripts/tune_records.py --mcpu x86-64-v4 --trials 8 --out DIR efficientnet:1 squeezenet:1

Records for workers that run one thread each (``--devices cpu:N``) are tuned with ``--num-cores 1``
into a folder of their own, and ship in ``<level>/1-core/``, which one-core targets prefer:

    nice -n 19 python scripts/tune_records.py --mcpu x86-64-v4 --num-cores 1 --trials 64 --out DIR1 ...

To search the shipped records again and ship what the search finds, seed a folder with what a
build for that core count reads, search it with ``--retune``, time it beside the shipped records
(``scripts/bench_layouts.py --records``), then put what changed into the package::

    python scripts/ship_records.py --seed DIR1 --mcpu x86-64-v4 --num-cores 1
    nice -n 19 python scripts/tune_records.py --mcpu x86-64-v4 --num-cores 1 --layout nhwc --retune \\
        --trials 48 --total 300 --out DIR1 squeezenet:1
    python scripts/ship_records.py --mcpu x86-64-v4 --num-cores 1 DIR1

``--layout nhwc`` tunes the graph with its convolutions converted to NHWC (the workloads differ
from the default layout's: keep its records in a folder of their own); ``--layout winograd`` also
computes its 3x3 convolutions by Winograd's algorithm, and shares NHWC's records for the rest: a
folder of NHWC records searched so gains records for those convolutions only::

    nice -n 19 python scripts/tune_records.py --mcpu x86-64-v4 --num-cores 1 --layout winograd \
        --trials 100 --total 400 --out DIR1 resnet50:1

A search can start from records tuned for another core count (a schedule replays on any): a build
for several cores reads the one-core records for the tasks its own folder lacks, so the all-core
NHWC records of ``x86-64-v4`` were searched from the one-core ones (``--seed DIR --num-cores 2``,
then ``--num-cores 2 --layout nhwc --retune``); only the records that changed ship in ``<level>/``.
A task the search left to the one-core record keeps it there, and a one-core schedule may have no
loop to split across cores: ``--fallbacks-only`` searches again just the tasks ``<level>/`` has no record of::

    nice -n 19 python scripts/tune_records.py --mcpu x86-64-v4 --num-cores 2 --layout nhwc --retune \\
        --fallbacks-only --trials 48 --total 300 --out DIR2 resnet50:1 resnet50:8

A search at batch 8 seldom finds the schedule that computes one image after another, which keeps
one image's working set in the caches; ``--lift`` first tries each task's batch-1 record with its
batch loop outermost, beside the batch's own record, and keeps the faster (``--trials 0``: only
that, no search)::

    TVM_NUM_THREADS=1 python scripts/tune_records.py --mcpu x86-64-v4 --num-cores 1 --layout nhwc --lift \\
        --trials 0 --out DIR1 efficientnet:8

A run interrupted (Ctrl-C, or killed) keeps what it measured: run it again to go on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from fastinfer.archive import tuning


def model_path(name: str, cache: str) -> str:
    if name == "efficientnet":
        from fastinfer.models import default

        return str(default.onnx_path(cache))
    return str(Path(onnx.__file__).parent / "backend/test/data/light" / f"light_{name}.onnx")


def model_spec(text: str) -> tuple[str, int]:
    """NAME[:BATCH] (batch 1 by default): efficientnet, or a light_NAME model of the onnx package."""
    name, _, batch = text.partition(":")
    if name != "efficientnet" and not Path(model_path(name, "")).is_file():
        raise argparse.ArgumentTypeError(f"{name}: not efficientnet or a light model of the onnx package")
    if not (batch or "1").isdigit() or int(batch or 1) < 1:
        raise argparse.ArgumentTypeError(f"{text}: the batch size is a positive number (NAME:BATCH)")
    return name, int(batch or 1)


def relax_module(model: onnx.ModelProto, batch: int, target: dict | None) -> object:
    """``model`` at ``batch`` as a Relax module, converted as archives for ``target`` convert it
    (None: without the graph changes a target asks for, such as padded channels)."""
    from tvm.relax.frontend.onnx import from_onnx

    from fastinfer.archive.graph import for_tvm, with_batch

    return from_onnx(with_batch(for_tvm(model, [batch], target), batch), keep_params_in_input=False)


def tasks_to_search(args: argparse.Namespace, spec: dict) -> Callable[[object], bool] | None:
    """The predicate on workloads that ``tuning.tune(only=...)`` takes for these flags (None: all)."""
    from fastinfer.archive import shipped

    kind = tuning.depthwise if args.depthwise_only else tuning.pointwise if args.pointwise_only else None
    if not args.fallbacks_only:
        return kind
    recorded = shipped.recorded_by_own_folder(spec)
    return lambda workload: not recorded(workload) and (kind is None or kind(workload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models", nargs="+", type=model_spec, help="NAME:BATCH, NAME efficientnet or a light_NAME model of onnx"
    )
    parser.add_argument("--mcpu", default="x86-64-v4")
    parser.add_argument("--num-cores", type=int, default=os.cpu_count())
    parser.add_argument("--trials", type=int, default=8, help="trials per task (0: no search, with --lift)")
    parser.add_argument("--total", type=int, help="trials in all per model (the scheduler picks the tasks)")
    parser.add_argument("--tune-time", type=float, help="minutes per model; the search stops after that")
    parser.add_argument(
        "--layout",
        default="nchw",
        choices=tuning.LAYOUTS,
        help="how convolutions compute: nchw (the model's layout), nhwc, or winograd (nhwc, 3x3 by Winograd)",
    )
    parser.add_argument("--retune", action="store_true", help="search tasks that have records too")
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument(
        "--depthwise-only",
        action="store_true",
        help="search only the depthwise convolutions (the search's scheduler gives them little of a budget)",
    )
    kinds.add_argument("--pointwise-only", action="store_true", help="search only the 1x1 convolutions")
    parser.add_argument(
        "--fallbacks-only",
        action="store_true",
        help="search only the tasks the records shipped for this core count lack (a build takes those "
        "from the other core count's records; with any kind above, only that kind's)",
    )
    parser.add_argument(
        "--lift",
        action="store_true",
        help="before searching NAME:BATCH (BATCH > 1), try the batch-1 records in --out at that batch, each "
        "image computed as batch 1 computes it; the faster of that and the batch's own record stays",
    )
    parser.add_argument("--out", required=True, help="records folder (merged into when it exists)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "fastinfer-tune-cache"))
    args = parser.parse_args()
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

    import tvm

    from fastinfer.archive import lift

    spec = {"kind": "llvm", "mcpu": args.mcpu, "num-cores": args.num_cores}
    target = tvm.target.Target(spec)
    only = tasks_to_search(args, spec)
    for name, batch in args.models:
        model = onnx.load(model_path(name, args.cache_dir))
        mod = tuning.pre_tuning(relax_module(model, batch, spec), target, args.layout)
        if args.lift and batch > 1:
            one = tuning.pre_tuning(relax_module(model, 1, spec), target, args.layout)
            lift.lift(one, mod, batch, target, Path(args.out), sys.stderr)
        if args.trials < 1:
            continue
        budget = args.tune_time * 60 if args.tune_time else None
        tuning.tune(
            [mod],
            target,
            Path(args.out),
            args.trials,
            label=f"{name}:{batch}",
            total_trials=args.total,
            retune=args.retune or args.fallbacks_only,  # the seeded folder holds them all
            time_budget_s=budget,
            only=only,
        )


if __name__ == "__main__":
    main()
