"""The ONNX graph as TVM compiles it: input names fit for generated code, the batch axis opened.

Names. TVM names a compiled function's parameters after the graph's inputs, in the C and CUDA source
it generates; ONNX allows any string (``gpu_0/data_0``), C does not, and NVRTC refuses the kernels
when the GPU worker loads them. An input whose name is not a C identifier is renamed for compiling
(an Identity node keeps the old name for the nodes that read it). The archive's signature keeps the
ONNX names that clients send: the compiled function takes its inputs by position, in graph order.

Batch. A graph exported for batch 1 may hard-code it, typically in a Reshape to a constant shape
``[1, 2048]`` before the classifier. Such a Reshape is opened to any batch (its leading 1 becomes 0,
"keep the input's axis") when ONNX shape inference shows that it keeps the batch axis: its input's
leading axis is the batch and the constant's other axes hold one sample's elements. It then does to
each sample what it did at batch 1. Whatever else fixes the batch, where inference shows an output
whose leading axis stays fixed, is refused; the build's verification compares every batch with the
exported graph run one sample at a time.

Sums. TVM's ONNX frontend turns a ``Sum`` node (ResNet-50's residual connections) into a stack of its
inputs along a new axis and a reduction over it: a copy of every input, a kernel that no
convolution fuses with, and a 5-D tensor that stops Relax's layout conversion. The same sum as a
chain of ``Add`` nodes (the same broadcasting) fuses into the convolution that makes its input, as
a residual add should.

Channels. For a CPU target, a convolution whose output channels fill no whole vector (SqueezeNet's
1000-channel classifier on AVX-512) gets zero channels to fill them, cut off again after the
operators that follow it channel by channel: :mod:`fastinfer.archive.channels`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from fastinfer.archive.manifest import ArchiveError

BATCH = "N"  # the symbolic batch axis's name
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def graph_inputs(model: Any) -> list:
    """The graph's inputs that are fed (not initializers), in order."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def with_batch(model: Any, batch: int | str) -> Any:
    """A copy of ``model`` whose inputs' and outputs' leading axis is ``batch`` (a size or a name)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]  # shapes inferred for the old batch size would contradict the new one
    initializers = {init.name for init in copy.graph.initializer}
    for value in [*copy.graph.input, *copy.graph.output]:
        if value.name in initializers or not value.type.tensor_type.shape.dim:
            continue
        dim = value.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    return copy


def for_tvm(model: Any, batch_sizes: Iterable[int] | None, target: dict | None = None) -> Any:
    """The graph to convert with TVM's ONNX frontend: inputs renamed for generated code, the batch
    axis opened when ``model`` was exported for batch 1 and is compiled for more, and, for a CPU
    ``target``, convolutions' output channels padded to whole vectors where that pays (see
    :mod:`fastinfer.archive.channels`)."""
    from fastinfer.archive import channels

    graph = sums_as_adds(safe_input_names(model))
    if target is not None:
        graph = channels.pad_output_channels(graph, channels.float32_lanes(target))
    exported = {v.type.tensor_type.shape.dim[0].dim_value for v in graph_inputs(graph) if v.type.tensor_type.shape.dim}
    if exported == {1} and any(size != 1 for size in batch_sizes or ()):
        graph = open_batch(graph)
    return graph


def safe_input_names(model: Any) -> Any:
    """A copy of ``model`` whose fed inputs are all C identifiers, in the same order."""
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = names_in(copy.graph)
    renames = []
    for value in graph_inputs(copy):
        if _IDENTIFIER.fullmatch(value.name):
            continue
        base = re.sub(r"[^A-Za-z0-9_]", "_", value.name)
        base = base if base[:1].isalpha() or base[:1] == "_" else f"input_{base}"
        name = fresh_name(base, taken)
        renames.append(helper.make_node("Identity", [name], [value.name]))
        value.name = name
    if renames:
        nodes = [*renames, *copy.graph.node]  # Identity first: nodes stay in topological order
        del copy.graph.node[:]
        copy.graph.node.extend(nodes)
    return copy


def sums_as_adds(model: Any) -> Any:
    """A copy of ``model`` whose ``Sum`` nodes are chains of ``Add`` (one input: ``Identity``)."""
    import onnx
    from onnx import helper

    if not any(node.op_type == "Sum" for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = names_in(copy.graph)
    nodes = []
    for node in copy.graph.node:
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        inputs, output = list(node.input), node.output[0]
        if len(inputs) == 1:
            nodes.append(helper.make_node("Identity", inputs, [output], name=node.name))
            continue
        total = inputs[0]
        for index, addend in enumerate(inputs[1:], start=1):
            last = index == len(inputs) - 1
            result = output if last else fresh_name(f"{output}_partial{index}", taken)
            nodes.append(helper.make_node("Add", [total, addend], [result], name=f"{node.name}_add{index}"))
            total = result
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_N`` where ``taken`` has it; the name is taken from then on."""
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    taken.add(name)
    return name


def names_in(graph: Any) -> set[str]:
    """Every tensor name ``graph`` uses: inputs, outputs, shapes, initializers, node ends."""
    names = {value.name for value in [*graph.input, *graph.output, *graph.value_info]}
    names.update(init.name for init in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def at_batch(model: Any, batch: int) -> Any:
    """``model`` to run outside TVM (ONNX Runtime) at ``batch``, as archives compile it: above 1, with
    its batch axis and batch-keeping Reshapes opened (a ResNet-50 exported for batch 1 reshapes to
    ``[1, 2048]``)."""
    return model if batch == 1 else with_batch(open_batch(model), batch)


def open_batch(model: Any) -> Any:
    """A copy of ``model`` (exported for batch 1) with a symbolic batch axis and its batch-keeping
    Reshapes opened; raises ArchiveError when an output's leading axis stays fixed."""
    import numpy as np
    from onnx import TensorProto, TypeProto, helper, numpy_helper

    graph = with_batch(model, BATCH)
    declared = []
    for output in graph.graph.output:
        declared.append(TypeProto())
        declared[-1].CopyFrom(output.type)
        output.type.tensor_type.ClearField("shape")  # inferred below, not taken as declared
    taken = names_in(graph.graph)
    listed = graph.ir_version < 4  # before IR 4, every initializer is also a graph input
    while True:
        shapes = _inferred_shapes(graph)
        if shapes is None:  # inference cannot follow this graph: verification is the judge
            break
        constants = _constants(graph.graph)
        opened = 0
        for node in graph.graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
                continue
            if any(a.name == "allowzero" and a.i for a in node.attribute):
                continue  # a 0 would mean an empty axis, not "keep the input's axis"
            shape = _per_sample_shape(shapes.get(node.input[0]), constants[node.input[1]])
            if shape is None:
                continue
            name = fresh_name(f"{node.input[1]}_any_batch", taken)
            graph.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name))
            if listed:
                graph.graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, [len(shape)]))
            node.input[1] = name
            opened += 1
        if not opened:
            break
    for output, kept in zip(graph.graph.output, declared, strict=True):
        dims = (shapes or {}).get(output.name)
        if dims and isinstance(dims[0], int):
            raise ArchiveError(
                f"the graph fixes batch 1: its output {output.name!r} has a leading axis of {dims[0]} at any batch; "
                "build it without --batch-sizes (batch 1), or re-export it with a dynamic batch axis"
            )
        output.type.CopyFrom(kept)  # as declared, the batch axis symbolic: ONNX's checker wants a shape
    return graph


def _inferred_shapes(model: Any) -> dict[str, list[int | str | None]] | None:
    """Each value's inferred shape: sizes, symbolic names, or None where unknown."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # onnx raises its own InferenceError, or ValueError for odd graphs
        return None
    shapes = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in value.type.tensor_type.shape.dim
            ]
    return shapes


def _constants(graph: Any) -> dict[str, list[int]]:
    """Constant 1-D integer tensors by name: initializers and Constant nodes' values."""
    from onnx import TensorProto, numpy_helper

    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value":
                tensors[node.output[0]] = attribute.t
    constants = {}
    for name, tensor in tensors.items():
        if len(tensor.dims) == 1 and tensor.data_type in (TensorProto.INT32, TensorProto.INT64):
            constants[name] = [int(v) for v in numpy_helper.to_array(tensor)]
    return constants


def _per_sample_shape(dims: list[int | str | None] | None, shape: list[int]) -> list[int] | None:
    """``shape`` with its leading 1 made 0, when reshaping ``dims`` to it keeps the batch axis and
    reshapes each sample alone; None when it does not, or cannot be shown to."""
    if not dims or dims[0] != BATCH or not shape or shape[0] != 1:
        return None
    sample = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in sample):
        return None
    elements = math.prod(sample)  # type: ignore[arg-type]
    known, free = 1, 0
    for axis, size in enumerate(shape[1:], start=1):
        if size == 0:  # ONNX: keep the input's size at this axis
            if axis >= len(dims):
                return None
            size = dims[axis]  # type: ignore[assignment]
        if size == -1:
            free += 1
        elif size > 0:
            known *= size
        else:
            return None
    fits = elements % known == 0 if free == 1 else elements == known
    return [0, *shape[1:]] if free <= 1 and fits else None
