"""3x3 convolutions by Winograd's algorithm (the "winograd" layout of the tuning pipeline): the
convolutions it applies to, the same outputs as ONNX Runtime and as the direct convolution at each
batch size, and how builds choose it. Untuned: a small model compiled with default schedules."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive import tuning, winograd
from fastinfer.archive.graph import for_tvm, with_batch

ONE_CORE = {"kind": "llvm", "num-cores": 1}


def resnet_like() -> onnx.ModelProto:
    """What ResNet-50's 3x3 convolutions see, small, on 15x15 activations (tiles of 4 do not divide
    them; 16 tiles at batch 1): a 3x3 convolution with batch normalization and ReLU, a depthwise
    3x3, a 3x3 with padding on two sides only and a channel count that is no multiple of a vector,
    then two that stay direct: one of stride 2, one with few channels."""
    rng = np.random.default_rng(0)

    def weight(name, *shape, scale=0.05):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * scale, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["d1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=64),
        helper.make_node("Conv", ["d1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 0, 0, 1]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c3", "w4"], ["c4"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c4"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["y"]),
    ]
    initializers = [
        weight("w1", 64, 64, 3, 3),
        weight("b1", 64),
        weight("gamma", 64, scale=1.0),
        weight("beta", 64),
        weight("mean", 64),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 64).astype(np.float32), "var"),
        weight("wd", 64, 1, 3, 3, scale=0.3),
        weight("w2", 72, 64, 3, 3),
        weight("w3", 16, 72, 3, 3),
        weight("w4", 16, 16, 3, 3, scale=0.2),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 15, 15])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def prepared(model, batch: int, layout: str):
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(with_batch(for_tvm(model, [batch]), batch), keep_params_in_input=False)
    return tuning.pre_tuning(mod, tvm.target.Target(ONE_CORE), layout)


@pytest.mark.parametrize("batch", [1, 3])
def test_winograd_gives_the_outputs_of_onnx_runtime_and_of_the_direct_convolution(tmp_path, batch):
    import onnxruntime as ort
    import tvm
    from tvm import relax

    model = resnet_like()
    x = np.random.default_rng(1).standard_normal((batch, 64, 15, 15)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run(None, {"x": x})
    target = tvm.target.Target(ONE_CORE)
    database = tuning.load_database(tmp_path / "records")

    outputs = {}
    for layout in ("nhwc", "winograd"):
        mod = prepared(model, batch, layout)
        kernels = re.findall(r"call_tir\((\w+)", mod["main"].script())
        convolutions = [k for k in kernels if "conv2d" in k]
        executable = relax.build(tuning.apply_records(mod, target, database), target=target)
        outputs[layout] = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(outputs[layout], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
        if layout == "winograd":
            # The two stride-1 convolutions with 64 channels and more; the depthwise, the strided
            # and the narrow one stay direct. The normalization and ReLU fuse into the first.
            assert len([k for k in convolutions if "winograd" in k]) == 2, kernels
            assert len(convolutions) == 5, kernels
            assert any("winograd" in k and "relu" in k for k in convolutions), kernels
            assert winograd.used(mod)
        else:
            assert not any("winograd" in k for k in kernels), kernels
    np.testing.assert_allclose(outputs["winograd"], outputs["nhwc"], rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def conv(batch: int, size: int, channels: int, **attrs):
    import tvm
    from tvm import relax

    weights = relax.const(np.zeros((channels, 3, 3, channels), np.float32))
    x = relax.Var("x", relax.TensorType((batch, size, size, channels), "float32"))
    layouts = {"data_layout": "NHWC", "kernel_layout": "OHWI"}
    return tvm.relax.op.nn.conv2d(x, weights, **{"padding": 1, **layouts, **attrs})


def test_winograd_applies_to_enough_channels_and_tiles():
    assert winograd.applies(conv(1, 56, 64))
    assert winograd.applies(conv(1, 14, 64))  # 16 tiles
    assert not winograd.applies(conv(1, 7, 64))  # 4 tiles: the weights' size outweighs them
    assert winograd.applies(conv(4, 7, 64))  # 16 over the batch
    assert not winograd.applies(conv(1, 56, 32))
    assert not winograd.applies(conv(1, 56, 64, strides=2))
    assert not winograd.applies(conv(1, 56, 64, dilation=2))


def test_transformed_weights_recover_the_direct_convolution_of_one_tile():
    """``A^T [(G g G^T) * (B^T d B)] A`` is the 4x4 output of the 3x3 kernel ``g`` over the 6x6 tile
    ``d``: the transform the kernel multiplies by is the one the algorithm needs."""
    rng = np.random.default_rng(2)
    tile = rng.standard_normal((6, 6))
    g = rng.standard_normal((3, 3))
    a, b, _ = winograd._matrices()
    transformed = winograd.transformed_weights(g.reshape(1, 3, 3, 1).astype(np.float32))[:, :, 0, 0]
    got = a.T @ (transformed * (b.T @ tile @ b)) @ a
    direct = np.array([[np.sum(tile[i : i + 3, j : j + 3] * g) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5)


def test_a_model_without_such_convolutions_is_called_nhwc():
    import io

    import tvm
    from test_layout import conv_model  # 3x3 convolutions of 8 channels, or strided
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(with_batch(for_tvm(conv_model(), [1]), 1), keep_params_in_input=False)
    prepared_mod, layout = tuning.pre_tuning_auto(mod, tvm.target.Target(ONE_CORE), io.StringIO())
    assert layout == "nhwc"
    assert not winograd.used(prepared_mod)


def test_stored_records_choose_winograd_only_where_they_cover_it(monkeypatch):
    """Built from stored records, a batch size takes Winograd where the records cover its kernels as
    well as the direct ones', NHWC where they cover only the direct kernels (records that shipped
    before Winograd, or for a CPU level nobody searched it on)."""
    import io

    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(with_batch(for_tvm(resnet_like(), [1]), 1), keep_params_in_input=False)
    target = tvm.target.Target(ONE_CORE)

    monkeypatch.setattr(tuning, "untuned_tasks", lambda mod, target, database: [])
    assert tuning.pre_tuning_covered(mod, target, None, io.StringIO())[1] == "winograd"

    def winograd_unrecorded(mod, target, database):
        return [gvar for gvar in mod.functions if "conv2d_winograd" in gvar.name_hint]

    monkeypatch.setattr(tuning, "untuned_tasks", winograd_unrecorded)
    assert tuning.pre_tuning_covered(mod, target, None, io.StringIO())[1] == "nhwc"


def test_archive_with_winograd_is_verified_and_says_so(tmp_path, capsys):
    from fastinfer import cli
    from fastinfer.archive.load import load

    onnx.save(resnet_like(), str(tmp_path / "convs.onnx"))
    archive = tmp_path / "convs.fia"
    build = ["archive", str(tmp_path / "convs.onnx"), "--name", "convs", "--batch-sizes", "1,2", "-o", str(archive)]
    build += ["--target", '{"kind": "llvm", "num-cores": 1}', "--layout", "winograd"]
    build += ["--stored-records-only", "--records", str(tmp_path / "records")]
    assert cli.main(build) == 0  # verified against ONNX Runtime at each batch size before it is written
    assert "convolutions in NHWC with Winograd 3x3" in capsys.readouterr().out
    manifest = load(archive, tmp_path / "cache").manifest
    assert manifest.build["layout"] == "winograd"
    assert manifest.build["verified"], manifest.build
