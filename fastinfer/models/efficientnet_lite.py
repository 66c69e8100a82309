"""EfficientNet-Lite0 as an ONNX graph, built from its PyTorch weights without PyTorch.

Lite variants drop squeeze-and-excitation, use ReLU6, fix the stem at 32 and the head at 1280
channels, and (as ported from TensorFlow) pad "same" and use batch-norm epsilon 1e-3. Batch
norm is folded into the convolution before it, so the graph is Conv/Clip/Add only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

IMAGE_SIZE = 224
BN_EPSILON = 1e-3
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

# (blocks, stride of the first block) per stage; kernel sizes and expansion come from the weights.
STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))


def block_strides() -> Iterator[int]:
    """Stride of every MBConv block, in order."""
    for count, stride in STAGES:
        yield stride
        yield from (1 for _ in range(count - 1))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding for one spatial axis: (before, after); the odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def fold_batch_norm(weights: dict[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Convolution weight and bias with the batch norm after it folded in."""
    scale = weights[f"{bn}.weight"] / np.sqrt(weights[f"{bn}.running_var"] + BN_EPSILON)
    weight = weights[f"{conv}.weight"] * scale[:, None, None, None]
    bias = weights[f"{bn}.bias"] - weights[f"{bn}.running_mean"] * scale
    return weight.astype(np.float32), bias.astype(np.float32)


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv_bn(
        self, x: str, size: int, weight: np.ndarray, bias: np.ndarray, stride: int, groups: int = 1
    ) -> tuple[str, int]:
        kernel = weight.shape[-1]
        before, after = same_padding(size, kernel, stride)
        out = self.node(
            "Conv",
            [x, self.constant("w", weight), self.constant("b", bias)],
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[before, before, after, after],
            group=groups,
        )
        return out, math.ceil(size / stride)

    def relu6(self, x: str) -> str:
        low = self.constant("zero", np.array(0.0, np.float32))
        high = self.constant("six", np.array(6.0, np.float32))
        return self.node("Clip", [x, low, high])


def build_onnx(weights: dict[str, np.ndarray]):  # -> onnx.ModelProto
    """The EfficientNet-Lite0 ONNX model, input ``image`` [N,3,224,224] float32, output ``logits`` [N,1000]."""
    from onnx import TensorProto, helper

    g = _GraphBuilder()
    size = IMAGE_SIZE
    x, size = g.conv_bn(INPUT_NAME, size, *fold_batch_norm(weights, "_conv_stem", "_bn0"), stride=2)
    x = g.relu6(x)

    channels = weights["_conv_stem.weight"].shape[0]
    for index, stride in enumerate(block_strides()):
        prefix = f"_blocks.{index}"
        block_input, block_channels = x, channels
        if f"{prefix}._expand_conv.weight" in weights:
            x, _ = g.conv_bn(x, size, *fold_batch_norm(weights, f"{prefix}._expand_conv", f"{prefix}._bn0"), stride=1)
            x = g.relu6(x)
        weight, bias = fold_batch_norm(weights, f"{prefix}._depthwise_conv", f"{prefix}._bn1")
        x, size = g.conv_bn(x, size, weight, bias, stride=stride, groups=weight.shape[0])
        x = g.relu6(x)
        weight, bias = fold_batch_norm(weights, f"{prefix}._project_conv", f"{prefix}._bn2")
        x, _ = g.conv_bn(x, size, weight, bias, stride=1)
        channels = weight.shape[0]
        if stride == 1 and channels == block_channels:
            x = g.node("Add", [x, block_input])

    x, _ = g.conv_bn(x, size, *fold_batch_norm(weights, "_conv_head", "_bn1"), stride=1)
    x = g.relu6(x)
    x = g.node("GlobalAveragePool", [x])
    x = g.node("Flatten", [x], axis=1)
    g.node("Gemm", [x, g.constant("fc_w", weights["_fc.weight"]), g.constant("fc_b", weights["_fc.bias"])], transB=1)
    g.nodes[-1].output[0] = OUTPUT_NAME

    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1000])],
        g.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="fastinfer")
