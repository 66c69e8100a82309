"""The compiled network against an independent numpy forward pass of the same weights.

The reference reads the raw checkpoint (batch norm not folded), pads "same" the TensorFlow way
and convolves with sliding windows in float64; nothing of the ONNX builder is reused.
"""

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from fastinfer.archive.cached import archive_for_onnx
from fastinfer.archive.load import load
from fastinfer.models import default
from fastinfer.models.pth import load_legacy_state_dict
from fastinfer.preprocess import preprocess_into
from fastinfer.worker.model import aligned_zeros
from fastinfer.worker.runtime import TvmArchiveRuntime

# (kernel, stride, expand ratio, output channels, repeats) of EfficientNet-Lite0.
BLOCKS = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]


def conv(x, w, stride, depthwise=False):
    """x: (C, H, W); w: (O, C or 1, k, k); TensorFlow "same" padding."""
    k, (_, h, wd) = w.shape[-1], x.shape
    pads = []
    for size in (h, wd):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads.append((total // 2, total - total // 2))
    padded = np.pad(x, [(0, 0), *pads])
    windows = sliding_window_view(padded, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    if depthwise:
        return np.einsum("chwij,cij->chw", windows, w[:, 0], optimize=True)
    return np.einsum("chwij,ocij->ohw", windows, w, optimize=True)


def batch_norm(x, weights, name):
    scale = weights[f"{name}.weight"] / np.sqrt(weights[f"{name}.running_var"] + 1e-3)
    return (x - weights[f"{name}.running_mean"][:, None, None]) * scale[:, None, None] + weights[f"{name}.bias"][
        :, None, None
    ]


def relu6(x):
    return np.clip(x, 0, 6)


def reference_forward(weights, image):
    weights = {k: v.astype(np.float64) for k, v in weights.items()}
    x = relu6(batch_norm(conv(image.astype(np.float64), weights["_conv_stem.weight"], 2), weights, "_bn0"))
    index = 0
    for kernel, stride, expand, out_channels, repeats in BLOCKS:
        for repeat in range(repeats):
            p = f"_blocks.{index}"
            s = stride if repeat == 0 else 1
            inputs = x
            if expand != 1:
                x = relu6(batch_norm(conv(x, weights[f"{p}._expand_conv.weight"], 1), weights, f"{p}._bn0"))
            assert weights[f"{p}._depthwise_conv.weight"].shape[-1] == kernel
            x = relu6(
                batch_norm(conv(x, weights[f"{p}._depthwise_conv.weight"], s, depthwise=True), weights, f"{p}._bn1")
            )
            x = batch_norm(conv(x, weights[f"{p}._project_conv.weight"], 1), weights, f"{p}._bn2")
            assert x.shape[0] == out_channels
            if s == 1 and inputs.shape == x.shape:
                x = x + inputs
            index += 1
    x = relu6(batch_norm(conv(x, weights["_conv_head.weight"], 1), weights, "_bn1"))
    pooled = x.mean(axis=(1, 2))
    return weights["_fc.weight"] @ pooled + weights["_fc.bias"]


@pytest.fixture(scope="module")
def compiled(cache_dir):
    path = archive_for_onnx(default.NAME, default.onnx_path(cache_dir), cache_dir, num_cores=2)
    archive = load(path, cache_dir, "llvm")
    manifest = archive.manifest
    assert manifest.batch_sizes is None, "the batch axis stays symbolic"
    runtime = TvmArchiveRuntime(archive.library_paths("llvm"), manifest.inputs, manifest.outputs, None, "llvm", 0)
    runtime.load()
    return runtime


def test_tvm_matches_numpy_reference(compiled, photos):
    """One batch of two photos: each row must match the reference run alone."""
    batch = aligned_zeros((2, 3, 224, 224), "float32")
    for row, photo in enumerate(["chelsea.png", "coffee.png"]):
        preprocess_into((photos / photo).read_bytes(), default.preprocess(40_000_000), batch[row])
    (logits,) = compiled.run([batch])
    assert logits.shape == (2, 1000)
    weights = load_legacy_state_dict(default.weights_path())
    for row in range(2):
        expected = reference_forward(weights, batch[row])
        np.testing.assert_allclose(logits[row], expected, rtol=0, atol=1e-4)
