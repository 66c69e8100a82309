"""3x3 convolutions as Winograd F(4x4, 3x3): a quarter of the multiplications.

A 3x3 convolution of stride 1 computes each 4x4 tile of its output from a 6x6 tile of its input.
Winograd's algorithm transforms the input tile (``B^T d B``) and the weights (``G g G^T``), multiplies
them element by element, summed over the input channels — 36 matrix products, one per element of
the 6x6 tile — and transforms the sum back (``A^T m A``): 36 multiply-adds per output tile and
channel pair where the direct convolution does 144. ONNX Runtime's MLAS computes these
convolutions directly; ResNet-50 spends half its multiply-adds in them.

The weights are constants, so their transform is done once, here, when the graph is prepared; the
kernel transforms the input, multiplies and transforms back, with TOPI's NHWC Winograd compute
(the blocks MetaSchedule has schedule rules for) and whatever operator fusion puts after it (bias,
normalization, ReLU). Its tuning tasks differ from the direct convolution's: records tuned for one
do not cover the other (see ``tuning.pre_tuning``).

What it costs: the transforms, in proportion to the activations, which convolutions with few
channels do not earn back (:data:`MIN_CHANNELS`); and weights four times the size (36 values per
channel pair for 9), read once a run whatever the tile count, which a handful of tiles does not
earn back (:data:`MIN_TILES`). On one core, tuned alike (48-64 trials each, timed with the weights
out of the caches): 56x56 with 64 channels 0.94 against 2.18 ms direct, 14x14 with 256 (16 tiles)
0.92 against 2.03, 7x7 with 512 at batch 1 (4 tiles, 38 MB of transformed weights) 3.09 against
2.06. The algorithm is exact in exact arithmetic; in float32 the outputs agree with the direct
convolution's to 1e-5 of their scale (``tests/archive/test_winograd.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastinfer.archive.concat import static_shape

TILE = 4  # output tile: F(4x4, 3x3), TOPI's choice for NHWC; 6x6 input tiles
KERNEL = 3
MIN_CHANNELS = 64  # input and output channels at least; fewer, and the transforms outweigh the products
MIN_TILES = 16  # output tiles (of 4x4, over the batch) at least; fewer, and the weights outweigh them


def legalize(bb: Any, call: Any) -> Any:
    """``relax.nn.conv2d`` lowered to Winograd where it applies (:func:`applies`), else to TOPI's
    direct convolution as Relax's own legalization does."""
    from tvm import relax
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    if not applies(call):
        return _nn_conv2d(bb, call)
    weights = call.args[1].value.numpy()  # OHWI
    top, left, bottom, right = (int(p) for p in call.attrs.padding)
    return bb.call_te(
        conv2d_nhwc,
        call.args[0],
        relax.const(transformed_weights(weights)),
        (top, left, bottom, right),
        primfunc_name_hint="conv2d_winograd",
    )


def applies(call: Any) -> bool:
    """Whether ``call`` (a ``relax.nn.conv2d``) is one Winograd computes: NHWC activations of a
    static shape, OHWI constant float32 weights of 3x3, stride 1, no dilation, no groups, enough
    channels and output tiles."""
    from tvm.ir.expr import Constant

    attrs = call.attrs
    weights = call.args[1]
    if not isinstance(weights, Constant) or weights.ty.dtype != "float32":
        return False
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "OHWI", "NHWC"):
        return False
    if str(attrs.out_dtype or "float32") != "float32" or call.args[0].ty.dtype != "float32":
        return False
    if [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1]:
        return False
    out_channels, height, width, in_channels = (int(d) for d in weights.ty.shape)
    if int(attrs.groups) != 1 or (height, width) != (KERNEL, KERNEL):
        return False
    data = static_shape(call.args[0])
    if data is None or min(in_channels, out_channels) < MIN_CHANNELS:
        return False
    _, _, tiles_h, tiles_w = _output(data[1], data[2], tuple(int(p) for p in attrs.padding))
    return data[0] * tiles_h * tiles_w >= MIN_TILES


def transformed_weights(weights: np.ndarray) -> np.ndarray:
    """OHWI 3x3 ``weights`` as the kernel multiplies them: ``G g G^T`` for each channel pair,
    laid out (6, 6, O, I)."""
    g = _matrices()[2].astype(np.float32)
    return np.einsum("ah,bw,ohwi->aboi", g, g, weights.astype(np.float32, copy=False))  # no intermediates


def conv2d_nhwc(data: Any, transformed: Any, padding: tuple[int, int, int, int]) -> Any:
    """The TE compute: ``data`` (N, H, W, I) convolved with weights already transformed
    (:func:`transformed_weights`), padded by ``padding`` (top, left, bottom, right). TOPI's
    ``_conv2d_winograd_nhwc_impl`` with the weight transform left out (TOPI's own variant for
    transformed weights is a removed legacy path)."""
    from tvm import te, topi
    from tvm.topi.nn.winograd_util import winograd_transform_matrices

    batch, height, width, in_channels = (int(d) for d in data.shape)
    alpha, out_channels = int(transformed.shape[0]), int(transformed.shape[2])
    top, left, bottom, right = padding
    a, b, _ = winograd_transform_matrices(TILE, KERNEL, str(data.dtype))
    out_height, out_width, tiles_h, tiles_w = _output(height, width, padding)
    tiles = batch * tiles_h * tiles_w
    # Zeros past the bottom and right edges too, so that every tile reads a whole 6x6 input tile.
    extra_h = (tiles_h - 1) * TILE + alpha - (height + top + bottom)
    extra_w = (tiles_w - 1) * TILE + alpha - (width + left + right)
    padded = topi.nn.pad(
        data, (0, top, left, 0), (0, bottom + extra_h, right + extra_w, 0), name="data_pad",
        attrs={"schedule_rule": "None"},
    )  # fmt: skip

    def tile_origin(p: Any) -> tuple[Any, Any, Any]:
        return p // (tiles_h * tiles_w), (p // tiles_w) % tiles_h * TILE, p % tiles_w * TILE

    input_tile = te.compute(
        (alpha, alpha, tiles, in_channels),
        lambda eps, nu, p, ci: padded[tile_origin(p)[0], tile_origin(p)[1] + eps, tile_origin(p)[2] + nu, ci],
        name="input_tile",
        attrs={"schedule_rule": "None"},
    )
    r_a, r_b = te.reduce_axis((0, alpha), "r_a"), te.reduce_axis((0, alpha), "r_b")
    data_pack = te.compute(
        (alpha, alpha, tiles, in_channels),
        lambda eps, nu, p, ci: te.sum(input_tile[r_a, r_b, p, ci] * b[r_a, eps] * b[r_b, nu], axis=[r_a, r_b]),
        name="data_pack",
        attrs={
            "auto_scheduler_simplify_const_tensor_indices": ["eps", "nu", "r_a", "r_b"],
            "schedule_rule": "conv2d_nhwc_winograd_data_pack",
        },
    )
    ci = te.reduce_axis((0, in_channels), name="ci")
    bgemm = te.compute(
        (alpha, alpha, tiles, out_channels),
        lambda eps, nu, p, co: te.sum(data_pack[eps, nu, p, ci] * transformed[eps, nu, co, ci], axis=[ci]),
        name="bgemm",
        attrs={"meta_schedule.write_cache_level": [2]},
    )
    r_a, r_b = te.reduce_axis((0, alpha), "r_a"), te.reduce_axis((0, alpha), "r_b")
    inverse = te.compute(
        (TILE, TILE, tiles, out_channels),
        lambda vh, vw, p, co: te.sum(bgemm[r_a, r_b, p, co] * a[r_a, vh] * a[r_b, vw], axis=[r_a, r_b]),
        name="inverse",
        attrs={
            "auto_scheduler_simplify_const_tensor_indices": ["vh", "vw", "r_a", "r_b"],
            "schedule_rule": "conv2d_nhwc_winograd_inverse",
        },
    )
    return te.compute(
        (batch, out_height, out_width, out_channels),
        lambda n, h, w, co: inverse[h % TILE, w % TILE, n * tiles_h * tiles_w + h // TILE * tiles_w + w // TILE, co],
        name="conv2d_winograd",
    )


def _output(height: int, width: int, padding: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The output's rows and columns, and its tiles down and across, of an input of ``height`` x
    ``width`` padded by ``padding`` (top, left, bottom, right)."""
    top, left, bottom, right = padding
    out_height, out_width = height + top + bottom - KERNEL + 1, width + left + right - KERNEL + 1
    return out_height, out_width, -(-out_height // TILE), -(-out_width // TILE)


def _matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A, B, G of F(4x4, 3x3) as numpy arrays, from the points TOPI's kernel uses."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    return _cook_toom_convolution(_interpolation_points(TILE + KERNEL - 2), TILE, KERNEL)


def used(mod: Any) -> bool:
    """Whether ``mod`` (prepared for tuning) computes a convolution with Winograd's algorithm."""
    return any("conv2d_winograd" in gvar.name_hint for gvar in mod.functions)
