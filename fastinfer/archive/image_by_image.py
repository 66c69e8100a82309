"""A batch computed image by image through its early layers, then as one batch.

A batch of N runs each kernel once over N images: the weights are read once for all of them, but
every tensor between two kernels is N images large. Where a model's early layers write far more
than they read of weights, that trade loses on one core: EfficientNet-Lite0's expanded tensors are
4.8 MB an image at 112x112 (38 MB at batch 8), so at batch 8 each depthwise convolution reads its
input back from memory instead of the caches, and took 1.75x its batch-1 time per image (one core,
``x86-64-v4``, tuned alike). Its batch-8 library ran in 1.01-1.15x ONNX Runtime's time, its batch-1
library in 0.88-0.94x.

So a tuned CPU build also compiles a second form of each batch size N > 1: the graph cut in two
where a single tensor connects its halves, before the first layer whose weights outweigh the
tensor it writes for one image (from there on, batching saves reading weights more than it costs
in tensors); the first half runs as a batch-1 function on each image in turn, its outputs are
concatenated, and the second half runs on the batch. The kernels are the batch-1 and batch-N
kernels the records already hold. The build times both forms on the library's threads and keeps
the faster (:mod:`.pack`): EfficientNet-Lite0's batch 8 image by image took 0.92x its batched time
on one core and 0.76x on two; SqueezeNet 1.0's and ResNet-50's 1.01-1.04x, so they stay one batch.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fastinfer.archive.graph import with_batch

ROUNDS = 5  # turns of timing each form; the median of a form's rounds decides
ROUND_S = 0.2  # each turn runs a form for at least this long (and once: a large batch takes seconds)
TIMEOUT_S = 600.0  # a timing that takes longer (a form far slower than ever pays) keeps one batch


def cut(graph: Any) -> str | None:
    """The tensor to cut ``graph`` at: the last one that alone connects the layers before it to those
    after, before the first layer whose constant inputs hold at least as many elements as its
    output holds for one image; None where there is no such tensor (or no such layer)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(with_batch(graph, 1))
    shapes = {v.name: v.type.tensor_type.shape.dim for v in [*inferred.graph.value_info, *inferred.graph.output]}
    sizes = {init.name: math.prod(init.dims) for init in inferred.graph.initializer}
    constant = _constants(inferred)
    for name in constant - sizes.keys():
        sizes[name] = _elements(shapes.get(name))
    first_heavy = None
    for index, node in enumerate(inferred.graph.node):
        weights = sum(sizes.get(name, 0) for name in node.input if name in constant)
        output = _elements(shapes.get(node.output[0])) if node.output else 0
        if set(node.output) - constant and weights and output and weights >= output:
            first_heavy = index
            break
    if first_heavy is None:
        return None
    before = [tensor for index, tensor in cuts(graph) if index < first_heavy]
    return before[-1] if before else None


def cuts(graph: Any) -> list[tuple[int, str]]:
    """(node index, tensor) where the tensor is the only one that the nodes up to that index pass to
    the nodes after it (constants aside), in graph order."""
    nodes = list(graph.graph.node)
    constant = _constants(graph)
    last_read: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constant:
                last_read[name] = index
    for value in graph.graph.output:
        last_read[value.name] = len(nodes)
    live = {value.name for value in graph.graph.input if value.name not in constant}
    found = []
    for index, node in enumerate(nodes[:-1]):
        live.update(name for name in node.output if name not in constant)
        live = {name for name in live if last_read.get(name, -1) > index}
        if len(live) == 1 and set(node.output) & live:
            found.append((index, next(iter(live))))
    return found


def module(graph: Any, batch: int, tensor: str) -> Any:
    """A Relax module whose ``main`` takes a batch of ``batch`` and computes ``graph`` image by image
    up to ``tensor`` (a function ``before`` at batch 1, called on each image), then as one batch
    (``after``, at ``batch``)."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(graph))
    inputs = [value.name for value in graph.graph.input if value.name not in _constants(graph)]
    outputs = [value.name for value in graph.graph.output]
    first = from_onnx(with_batch(extractor.extract_model(inputs, [tensor]), 1), keep_params_in_input=False)
    second = from_onnx(with_batch(extractor.extract_model([tensor], outputs), batch), keep_params_in_input=False)
    if len(first["main"].params) != len(inputs):  # an input the first half never reads
        raise ValueError("the first half does not take every input of the graph")
    builder = relax.BlockBuilder()
    before = _add_functions(builder, first, "before")
    after = _add_functions(builder, second, "after")
    params = [relax.Var(param.name, _batched(param.ty, batch)) for param in first["main"].params]
    with builder.function("main", params):
        with builder.dataflow():
            images = [builder.emit(relax.op.split(param, batch, axis=0)) for param in params]
            outs = [
                builder.emit(relax.Call(before, [builder.emit(relax.TupleGetItem(split, i)) for split in images]))
                for i in range(batch)
            ]
            joined = builder.emit(relax.op.concat(outs, axis=0))
            result = builder.emit_output(relax.Call(after, [joined]))
        builder.emit_func_output(result)
    return builder.get()


def _add_functions(builder: Any, mod: Any, name: str) -> Any:
    """Add ``mod``'s functions to ``builder``: its ``main`` as ``name``, the TIR functions the ONNX
    frontend emitted (ReLU6's ``maximum``/``minimum``) under names the builder keeps unique, with the
    calls to them renamed alike. Returns ``name``'s GlobalVar."""
    from tvm import relax

    renamed = {
        var: builder.add_func(func, var.name_hint)
        for var, func in mod.functions_items()
        if not isinstance(func, relax.Function)
    }

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def visit_global_var_(self, var: Any) -> Any:
            return renamed.get(var, var)

    return builder.add_func(Rename().visit_expr(mod["main"]).without_attr("global_symbol"), name)


def _batched(ty: Any, batch: int) -> Any:
    from tvm import relax

    return relax.TensorType([batch, *(int(d) for d in ty.shape.values[1:])], ty.dtype)


def _constants(graph: Any) -> set[str]:
    """The initializers and what nodes compute from them alone (the light models' ConstantOfShape)."""
    constant = {init.name for init in graph.graph.initializer}
    for node in graph.graph.node:
        if all(name in constant for name in node.input if name):
            constant.update(node.output)
    return constant


def _elements(dims: Any) -> int:
    """Elements of a shape whose axes are all known, else 0."""
    if not dims or any(not d.HasField("dim_value") for d in dims):
        return 0
    return math.prod(d.dim_value for d in dims)


@dataclass
class Kept:
    """The image-by-image form of a batch size, kept: its module (prepared for tuning), the tensor
    up to which it computes image by image, and the two forms' median run times."""

    module: Any
    tensor: str
    seconds: float
    one_batch_seconds: float

    def summary(self) -> dict:
        """What the manifest records (``build.tuning.image_by_image``), times in milliseconds."""
        return {
            "up_to": self.tensor,
            "ms": round(self.seconds * 1e3, 2),
            "one_batch_ms": round(self.one_batch_seconds * 1e3, 2),
        }


def choose(
    graph: Any,
    batch: int,
    layout: str,
    target: dict,
    batched: Path,
    build: Callable[[Any, Path], None],
    inputs: list[np.ndarray],
    stream: TextIO,
) -> Kept | None:
    """Build the image-by-image form of ``graph`` at ``batch`` (in ``layout``, by ``build``) beside
    ``batched``, the batch's library, time the two in turns on ``inputs`` with the library's threads,
    and keep the faster at ``batched``: what was kept where the image-by-image form won, else None.
    A graph without a cut stays one batch, and so does one whose image-by-image form cannot be
    built or timed (said on ``stream``)."""
    import tvm

    from fastinfer.archive import tuning

    images = batched.with_name(batched.stem + "-images" + batched.suffix)
    try:
        tensor = cut(graph)
        if tensor is None:
            return None
        prepared = tuning.pre_tuning(module(graph, batch, tensor), tvm.target.Target(target), layout)
        build(prepared, images)
        one_batch_s, images_s = _time_in_turns([batched, images], inputs, int(target.get("num-cores", 0)))
    except Exception as error:  # ONNX's or TVM's own errors, from a graph their passes do not carry through
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        print(f"batch {batch}: stays one batch (image by image did not build or run: {reason})", file=stream)
        images.unlink(missing_ok=True)
        return None
    figures = f"image by image up to {tensor!r} {images_s * 1e3:.2f} ms, one batch {one_batch_s * 1e3:.2f} ms"
    if images_s >= one_batch_s:
        print(f"batch {batch}: one batch ({figures})", file=stream, flush=True)
        images.unlink()
        return None
    print(f"batch {batch}: image by image ({figures})", file=stream, flush=True)
    images.replace(batched)
    return Kept(prepared, tensor, images_s, one_batch_s)


def _time_in_turns(paths: list[Path], inputs: list[np.ndarray], threads: int) -> list[float]:
    """Median seconds a run of each library takes, timed in turns (A, B, A, B, ...) so that whatever
    load comes falls on all alike, in a process of ``threads`` TVM threads as a worker runs them
    (TVM sizes its thread pool once, from ``TVM_NUM_THREADS``)."""
    feeds = paths[0].with_name(paths[0].stem + "-inputs.npz")
    np.savez(feeds, *inputs)
    try:
        environment = {**os.environ, "TVM_NUM_THREADS": str(threads or os.cpu_count() or 1)}
        command = [sys.executable, "-m", __name__, str(feeds), *map(str, paths)]
        done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False, timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"timing failed: {done.stderr.strip().splitlines()[-1:]}")
        return [float(seconds) for seconds in done.stdout.split()]
    finally:
        feeds.unlink(missing_ok=True)


def _timed_here(feeds: str, paths: list[str]) -> list[float]:
    """:func:`_time_in_turns`'s child process."""
    import tvm
    from tvm import relax

    device = tvm.cpu()
    with np.load(feeds) as arrays:
        args = [tvm.runtime.tensor(arrays[name], device) for name in arrays.files]
    mains = [relax.VirtualMachine(tvm.runtime.load_module(path), device)["main"] for path in paths]
    for main in mains:
        main(*args)  # warm-up: first touch of the workspace
    rounds: list[list[float]] = [[] for _ in paths]
    for _ in range(ROUNDS):
        for main, times in zip(mains, rounds, strict=True):
            runs, started = 0, time.perf_counter()
            while runs == 0 or time.perf_counter() - started < ROUND_S:
                main(*args)
                runs += 1
            times.append((time.perf_counter() - started) / runs)
    return [statistics.median(times) for times in rounds]


if __name__ == "__main__":
    print(*_timed_here(sys.argv[1], sys.argv[2:]))
