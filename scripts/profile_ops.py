"""Per-operator gap: where tuned TVM spends a batch's time, beside ONNX Runtime on the same operators.

One process pinned to ``--threads`` cores (default 1: the serving configuration, as a worker of
``fastinfer serve --devices cpu:N`` runs), TVM compiled for that many cores from the tuning records
the package ships, ONNX Runtime with as many intra-op threads. Both run the model ``--runs`` times
after warm-up; a kernel's (or node's) time is the median over the runs of its time in a run.

- TVM: the Relax VM's instrument hook (``VirtualMachine.set_instrument``; this TVM's VM has no
  ``profile()``) is called before and after every call the VM makes, so each call is timed from
  Python: a few microseconds of hook cost fall inside each timing.
- ONNX Runtime: its own profiler (``SessionOptions.enable_profiling``), per-node kernel times.

Both are grouped by the kind of operator they compute. A TVM kernel is one fused function named
after its operators (``fused_conv2d3_add2_relu21_prepacked``): it counts in the group of its main
operator, in this order: convolution, matmul/gemm, pooling (and ``mean``), softmax, elementwise
(any arithmetic or activation), layout (concat, reshape, transpose, pad, ... alone); the operators
fused into it (bias, activation, residual add) count with it, as they do in ONNX Runtime's fused
nodes. A convolution's kernel size
and whether it is depthwise come from its shapes (TVM's weights are repacked into tuned layouts,
so from the weight's element count, its input channels and its output channels). ONNX Runtime's
nodes map by op type and weight shape the same way. The two sides' groups hold the same operators
of the model, but neither the fusion nor the layout work (TVM's ``layout_transform`` kernels,
ONNX Runtime's ``ReorderInput``/``ReorderOutput``) is the same on both sides.

    python scripts/profile_ops.py --model efficientnet --runs 20
    python scripts/profile_ops.py --model squeezenet --threads 2
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import MODELS, onnx_source, tuned_archive

from fastinfer.archive.concat_in_place import TWIN_SUFFIX

WARM_UP_RUNS = 3
LAYOUT = (
    *("concatenate", "reshape", "transpose", "layout_transform", "pad", "squeeze", "expand_dims", "flatten"),
    *("strided_slice", "split", "take", "broadcast_to", "dropout"),
)
ARITHMETIC = {"add", "subtract", "multiply", "divide", "relu", "clip", "maximum", "minimum", "sigmoid", "tanh", "exp"}
ORT_LAYOUT = {"Concat", "Reshape", "Transpose", "Pad", "Squeeze", "Unsqueeze", "Flatten", "ReorderInput"}
ORT_LAYOUT |= {"ReorderOutput", "Slice", "Split", "Gather", "Expand", "Identity", "Dropout"}
ORT_POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"}


def conv_group(kernel_area: float, depthwise: bool) -> str:
    side = math.isqrt(round(kernel_area))
    if side * side != round(kernel_area):
        return "conv (other)"
    return f"conv {side}x{side}{' depthwise' if depthwise else ''}"


def tvm_group(name: str, shapes: list, channel_axis: int = 1) -> str:
    """The operator group of a TVM kernel, from its name and its arguments' shapes (activations'
    channels on ``channel_axis``: 1 for NCHW, 3 for NHWC)."""
    if name.startswith("vm.builtin."):
        return "VM builtins (allocation, tuples, views)"
    tokens = {token.rstrip("0123456789") for token in name.split("_")}
    if "conv2d_winograd" in name:  # weights transformed to 6x6: the kernel is a 3x3 convolution
        return conv_group(9, False)
    if "conv2d" in name:
        data, weight, out = shapes[0], shapes[1], shapes[-1]
        weights = math.prod(weight)
        channels_in, channels_out = data[channel_axis], out[channel_axis]
        if name.endswith(TWIN_SUFFIX) and len(shapes) > 3:  # out is the whole concatenation: the bias tells
            channels_out = math.prod(shapes[2])
        per_output = weights / channels_out  # input channels per group x kernel area
        if per_output % channels_in == 0:
            return conv_group(per_output / channels_in, False)
        return conv_group(per_output, channels_out == channels_in)
    if "matmul" in tokens or "dense" in tokens:
        return "gemm/matmul"
    if "pool" in name or "mean" in tokens:
        return "pooling"
    if "softmax" in tokens:
        return "softmax"
    if any(part in name for part in LAYOUT) and not tokens & ARITHMETIC:
        return "layout/reshape/concat"
    return "elementwise/activation"


def ort_group(op: str, input_shapes: list[list[int]]) -> str:
    if "Conv" in op:
        weight = input_shapes[1]
        return conv_group(weight[2] * weight[3], weight[1] == 1 and weight[0] > 1)
    if op in ("MatMul", "Gemm", "FusedGemm", "FusedMatMul"):
        return "gemm/matmul"
    if op in ORT_POOLING:
        return "pooling"
    if op == "Softmax":
        return "softmax"
    if op in ORT_LAYOUT:
        return "layout/reshape/concat"
    return "elementwise/activation"


def profile_tvm(library: Path, x: np.ndarray, runs: int) -> tuple[dict[str, float], dict[str, dict], float]:
    """Median ms per run of each kernel, each kernel's calls and shapes, and the plain run's median ms."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    module = tvm.runtime.load_module(str(library))
    argument = tvm.runtime.from_dlpack(x)
    plain = VirtualMachine(module, tvm.cpu())["main"]
    for _ in range(WARM_UP_RUNS):
        plain(argument)
    plain_ms = []
    for _ in range(runs):
        started = time.perf_counter()
        plain(argument)
        plain_ms.append((time.perf_counter() - started) * 1e3)

    vm = VirtualMachine(module, tvm.cpu())
    this_run: dict[str, float] = collections.defaultdict(float)
    kernels: dict[str, dict] = {}
    call_started = [0.0]

    def instrument(func, name, before_run, ret_value, *args):
        now = time.perf_counter()
        if before_run:
            call_started[0] = time.perf_counter()
            return 0
        this_run[name] += (now - call_started[0]) * 1e3
        if name not in kernels:
            shapes = [list(arg.shape) for arg in args if isinstance(arg, tvm.runtime.Tensor)]
            kernels[name] = {"shapes": shapes, "calls": 0}
        kernels[name]["calls"] += 1
        return 0

    vm.set_instrument(instrument)
    main = vm["main"]
    per_run: dict[str, list[float]] = collections.defaultdict(list)
    for number in range(WARM_UP_RUNS + runs):
        this_run.clear()
        main(argument)
        if number >= WARM_UP_RUNS:
            for name, ms in this_run.items():
                per_run[name].append(ms)
    for kernel in kernels.values():
        kernel["calls"] //= WARM_UP_RUNS + runs
    return {name: statistics.median(ms) for name, ms in per_run.items()}, kernels, statistics.median(plain_ms)


def profile_ort(source: Path, x: np.ndarray, runs: int, threads: int, folder: Path) -> tuple[dict, dict, float]:
    """Median ms per run of each node, each node's op type and input shapes, and the plain run's median ms."""
    import onnx
    import onnxruntime as ort

    from fastinfer.archive.graph import at_batch

    model = at_batch(onnx.load(str(source)), x.shape[0]).SerializeToString()

    def session(profiling: bool):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_profiling = profiling
        options.profile_file_prefix = str(folder / "ort-profile")
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    plain = session(False)
    feed = {plain.get_inputs()[0].name: x}
    for _ in range(WARM_UP_RUNS):
        plain.run(None, feed)
    plain_ms = []
    for _ in range(runs):
        started = time.perf_counter()
        plain.run(None, feed)
        plain_ms.append((time.perf_counter() - started) * 1e3)

    profiled = session(True)
    for _ in range(WARM_UP_RUNS + runs):
        profiled.run(None, feed)
    events = json.loads(Path(profiled.end_profiling()).read_text())
    durations: dict[str, list[float]] = collections.defaultdict(list)
    nodes: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name = event["name"].removesuffix("_kernel_time")
        durations[name].append(event["dur"] / 1e3)  # microseconds
        shapes = [next(iter(shape.values())) for shape in event["args"].get("input_type_shape", [])]
        nodes[name] = {"op": event["args"]["op_name"], "shapes": shapes}
    node_ms = {name: statistics.median(ms[WARM_UP_RUNS:] or ms) for name, ms in durations.items()}
    return node_ms, nodes, statistics.median(plain_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="efficientnet")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="cores (pinned) and threads for TVM and ORT")
    parser.add_argument("--runs", type=int, default=20, help="measured runs, after warm-up")
    parser.add_argument(
        "--layout", choices=("nchw", "nhwc", "winograd"), default="nchw", help="TVM's convolution layout"
    )
    parser.add_argument("--top", type=int, default=10, help="TVM kernels listed")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cores)
    os.environ["TVM_NUM_THREADS"] = str(len(cores))  # before TVM starts its thread pool
    from fastinfer.archive.load import load
    from fastinfer.worker.model import aligned_zeros

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        archive = tuned_archive(args.model, folder, str(args.batch), num_cores=len(cores), layout=args.layout)
        loaded = load(archive, str(folder / "cache"))
        spec = loaded.manifest.inputs[0]
        x = aligned_zeros((args.batch, *spec.shape), spec.dtype)
        x[:] = np.random.default_rng(0).random(x.shape)
        tvm_ms, kernels, tvm_plain = profile_tvm(loaded.library_paths()[args.batch], x, args.runs)
        ort_ms, nodes, ort_plain = profile_ort(
            onnx_source(args.model, folder / "cache"), x, args.runs, len(cores), folder
        )

    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, ms in tvm_ms.items():
        groups[tvm_group(name, kernels[name]["shapes"], 1 if args.layout == "nchw" else 3)][0] += ms
    for name, ms in ort_ms.items():
        groups[ort_group(nodes[name]["op"], nodes[name]["shapes"])][1] += ms
    tvm_total, ort_total = sum(tvm_ms.values()), sum(ort_ms.values())

    print(
        f"\n{args.model}, batch {args.batch}, {len(cores)} pinned core(s), {len(cores)} thread(s); median of "
        f"{args.runs} runs. A run without profiling: TVM {tvm_plain:.2f} ms, ONNX Runtime {ort_plain:.2f} ms "
        f"({tvm_plain / ort_plain:.2f}x). Summed kernel times: TVM {tvm_total:.2f} ms in {len(tvm_ms)} kernels "
        f"(timed from Python, each call pays the hook), ONNX Runtime {ort_total:.2f} ms in {len(ort_ms)} nodes.\n"
        "Groups: a fused kernel or node counts under its main operator (conv > matmul > pooling > softmax > "
        "elementwise > layout), with what is fused into it; conv kind from the weight's shape.\n"
    )
    print("| op group | TVM ms | TVM share | ORT ms | ORT share | TVM / ORT |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for group, (tvm, ort) in sorted(groups.items(), key=lambda item: -item[1][0]):
        ratio = f"{tvm / ort:.2f}x" if ort > 0 else "-"
        print(f"| {group} | {tvm:.3f} | {tvm / tvm_total:.0%} | {ort:.3f} | {ort / ort_total:.0%} | {ratio} |")
    print(f"| all | {tvm_total:.3f} | 100% | {ort_total:.3f} | 100% | {tvm_total / ort_total:.2f}x |")

    print(f"\nTop {args.top} TVM kernels:\n")
    print("| kernel | group | calls | ms | share | argument shapes (inputs, then outputs) |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for name, ms in sorted(tvm_ms.items(), key=lambda item: -item[1])[: args.top]:
        kernel = kernels[name]
        shapes = " ".join("x".join(map(str, shape)) or "()" for shape in kernel["shapes"])  # (): a scalar
        group = tvm_group(name, kernel["shapes"], 1 if args.layout == "nchw" else 3)
        print(f"| {name} | {group} | {kernel['calls']} | {ms:.3f} | {ms / tvm_total:.0%} | {shapes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
