"""Convolutions' output channels padded to a whole number of CPU vectors.

A tuned convolution vectorizes over its output channels. SqueezeNet's classifier convolution
(13x13, 512 -> 1000 channels, a quarter of the model's time) has a channel count no 16-lane AVX-512
vector divides: its kernel works 8 channels at a time. With 1008 channels (zero weights and biases
for the 8 added) it runs 16 at a time, and the whole model in 0.96x its time on one core (0.92x on
two threads at batch 1; docs/benchmarks.md, "SqueezeNet's classifier padded to whole vectors").
The added channels ride along through the operators after the convolution that treat each channel
alone (activations, pooling), and a Split after the last of them gives the graph back its own
tensor: every later node, and every output, is unchanged.

Only where the padding adds little work: at most one sixteenth more channels (1000 -> 1008, not
24 -> 32, a third more). Only for CPU targets, and the lane count is the target's: ``x86-64-v3``'s
8-lane vectors divide 1000 already. The padded convolution is a workload of its own, so records
tuned before it existed do not cover it.
"""

from __future__ import annotations

from typing import Any

from fastinfer.archive.graph import fresh_name, names_in

# Operators that compute each channel from that channel alone (their other inputs, if any, are
# scalars such as Clip's bounds): padded channels pass through them to the Split that cuts them off.
PER_CHANNEL = frozenset(
    {
        "Relu",
        "Clip",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Elu",
        "Selu",
        "Softplus",
        "Dropout",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "AveragePool",
        "MaxPool",
    }
)
MOST_ADDED = 1 / 16  # of the channels: padding past this costs more work than whole vectors win


def float32_lanes(target: dict) -> int:
    """How many float32 a vector of ``target`` holds (1 for non-CPU targets: nothing to pad)."""
    if target.get("kind") != "llvm":
        return 1
    import tvm
    from tvm.target import codegen

    features = set(codegen.llvm_get_cpu_features(tvm.target.Target(target)))
    return 16 if "avx512f" in features else 8 if "avx" in features else 4


def padded_channels(channels: int, lanes: int) -> int:
    """``channels`` rounded up to whole vectors where that adds at most :data:`MOST_ADDED`, else as is."""
    padded = -(-channels // lanes) * lanes
    return padded if padded - channels <= channels * MOST_ADDED else channels


def pad_output_channels(model: Any, lanes: int) -> Any:
    """A copy of ``model`` whose convolutions have whole vectors of output channels where that pays
    (see the module's docstring); ``model`` itself when none needs it."""
    import onnx

    if lanes <= 1:
        return model
    constants = _Constants(model.graph)
    if not any(_padding(node, constants, lanes, sizes_only=True) for node in model.graph.node):
        return model  # the usual case: no copy of the weights
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    values = _Constants(graph)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    taken = names_in(graph)
    listed = copy.ir_version < 4
    opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), 1)
    splits, gone = [], set()
    for node in list(graph.node):
        plan = _padding(node, values, lanes)
        if plan is None:
            continue
        channels, padded, weight, bias = plan
        chain = _chain(node, consumers, outputs)
        last = chain[-1].output[0] if chain else node.output[0]
        _add_initializer(graph, node, 1, _pad(weight, padded), taken, listed)
        if bias is not None:
            _add_initializer(graph, node, 2, _pad(bias, padded), taken, listed)
        for member in [node, *chain]:  # the padded tensors get names of their own
            old = member.output[0]
            new = fresh_name(f"{old}_padded", taken)
            member.output[0] = new
            if old != last:
                gone.add(old)
            for reader in chain:
                reader.input[:] = [new if name == old else name for name in reader.input]
        source = chain[-1].output[0] if chain else node.output[0]
        splits.append(_cut(source, last, channels, padded, opset, graph, taken, listed))
    if not splits:
        return model
    _insert_after_producers(graph, splits)
    kept = [value for value in graph.value_info if value.name not in gone]  # shapes of tensors now padded
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return copy


def _padding(node: Any, values: _Constants, lanes: int, sizes_only: bool = False) -> tuple | None:
    """(channels, padded, weight, bias) for a convolution worth padding, else None; with
    ``sizes_only``, (channels, padded), without making the weight's array."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    if any(a.name == "group" and a.i != 1 for a in node.attribute):
        return None  # grouped and depthwise: channels are tied to the input's
    channels = values.leading_size(node.input[1])
    if channels is None or padded_channels(channels, lanes) == channels:
        return None
    if sizes_only:
        return channels, padded_channels(channels, lanes)
    weight = values.get(node.input[1])
    bias = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if weight is None or (len(node.input) > 2 and node.input[2] and bias is None):
        return None
    return channels, padded_channels(channels, lanes), weight, bias


def _chain(node: Any, consumers: dict, outputs: set[str]) -> list[Any]:
    """The per-channel nodes that follow ``node`` one after another, each its tensor's only reader."""
    chain: list[Any] = []
    current = node
    while True:
        name = current.output[0]
        readers = consumers.get(name, [])
        if name in outputs or len(readers) != 1:
            return chain
        reader = readers[0]
        if reader.op_type not in PER_CHANNEL or reader.input[0] != name or name in reader.input[1:]:
            return chain
        if any(extra and (consumers.get(extra) or extra in outputs) for extra in reader.output[1:]):
            return chain  # Dropout's mask or MaxPool's indices, read by someone
        chain.append(reader)
        current = reader


def _pad(array: Any, padded: int) -> Any:
    import numpy as np

    widths = [(0, padded - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, widths)


def _add_initializer(graph: Any, node: Any, index: int, array: Any, taken: set[str], listed: bool) -> None:
    """Give ``node`` ``array`` as its input ``index``; the initializer it replaces goes if unread."""
    old = node.input[index]
    name = fresh_name(f"{old}_padded", taken)
    _initializer(graph, array, name, listed)
    node.input[index] = name
    if not any(old in other.input for other in graph.node):
        for values in (graph.initializer, graph.input):
            for position, value in enumerate(values):
                if value.name == old:
                    del values[position]
                    break


def _initializer(graph: Any, array: Any, name: str, listed: bool) -> None:
    """Add ``array`` as initializer ``name``; ``listed``: as a graph input too (before IR version 4
    every initializer is one)."""
    from onnx import helper, numpy_helper

    tensor = numpy_helper.from_array(array, name)
    graph.initializer.append(tensor)
    if listed:
        graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(array.shape)))


def _cut(
    source: str, target: str, channels: int, padded: int, opset: int, graph: Any, taken: set[str], listed: bool
) -> Any:
    """A node ``target = source[:, :channels]``: a Split, whose form TVM's ONNX frontend reads at
    every opset (it reads Slice only as opset 10 writes it, with inputs for the bounds)."""
    import numpy as np
    from onnx import helper

    rest = fresh_name(f"{target}_padding", taken)
    if opset < 13:  # the sizes were an attribute then
        return helper.make_node("Split", [source], [target, rest], axis=1, split=[channels, padded - channels])
    sizes = fresh_name(f"{target}_split", taken)
    _initializer(graph, np.array([channels, padded - channels], np.int64), sizes, listed)
    return helper.make_node("Split", [source, sizes], [target, rest], axis=1)


def _insert_after_producers(graph: Any, splits: list[Any]) -> None:
    """Put each split right after the node that makes its input: nodes stay in topological order."""
    after = {split.input[0]: split for split in splits}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(after[name] for name in node.output if name in after)
    del graph.node[:]
    graph.node.extend(nodes)


class _Constants:
    """Tensors whose values the graph fixes, as numpy arrays, made when asked for (a model's weights
    are most of its size): initializers, Constant nodes, and ConstantOfShape nodes of a constant
    shape (the onnx package's light models hold their weights so)."""

    def __init__(self, graph: Any) -> None:
        self.tensors = {init.name: init for init in graph.initializer}
        self.nodes = {node.output[0]: node for node in graph.node if node.op_type in ("Constant", "ConstantOfShape")}

    def leading_size(self, name: str) -> int | None:
        """The size of the constant's first axis, without making the array; None if not a constant."""
        if name in self.tensors:
            dims = self.tensors[name].dims
            return int(dims[0]) if dims else None
        node = self.nodes.get(name)
        if node is None or node.op_type == "Constant":
            array = self.get(name)  # a Constant node's value is inline and small
            return int(array.shape[0]) if array is not None and array.ndim else None
        shape = self.get(node.input[0])
        return int(shape[0]) if shape is not None and shape.size and shape[0] > 0 else None

    def get(self, name: str) -> Any:
        import numpy as np
        from onnx import numpy_helper

        if name in self.tensors:
            return numpy_helper.to_array(self.tensors[name])
        node = self.nodes.get(name)
        if node is None:
            return None
        attributes = {a.name: a for a in node.attribute}
        if node.op_type == "Constant":
            return numpy_helper.to_array(attributes["value"].t) if "value" in attributes else None
        shape = self.get(node.input[0])
        if shape is None or shape.ndim != 1 or (shape < 0).any():
            return None  # not a shape: left to the frontend, which says what is wrong
        fill = numpy_helper.to_array(attributes["value"].t) if "value" in attributes else np.zeros(1, np.float32)
        return np.full(shape.astype(np.int64), fill.reshape(-1)[0], fill.dtype)
