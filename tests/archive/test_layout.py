"""The NHWC convolution layout of the tuning pipeline: same outputs as ONNX Runtime and as NCHW,
untuned (no search: a tiny model compiled with default schedules)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import mobile_block
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive import tuning
from fastinfer.archive.graph import for_tvm, with_batch


def conv_model() -> onnx.ModelProto:
    """What EfficientNet-Lite0 and SqueezeNet are made of, small: a strided conv with ReLU6, a
    depthwise conv and a 1x1 conv (``mobile_block``), the 1x1 with a residual sum (ONNX Sum, as
    ResNet-50 exports it: the frontend would stack its inputs in 5-D), a fire module's concat,
    dropout, pooling and a flattened classifier."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    block, block_weights = mobile_block(rng, pointwise_channels=8, output="p1")
    nodes = [
        *block,
        helper.make_node("Sum", ["p1", "r1", "r2"], ["a1"]),
        helper.make_node("Conv", ["a1", "we"], ["e1"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["a1", "we3"], ["e3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["e1", "e3"], ["cat"], axis=1),
        helper.make_node("Relu", ["cat"], ["r3"]),
        helper.make_node("Dropout", ["r3"], ["dr"]),
        helper.make_node("MaxPool", ["dr"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["mp"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], transB=1),
    ]
    initializers = [
        *block_weights,
        weight("we", 6, 8, 1, 1),
        weight("we3", 6, 8, 3, 3),
        weight("wf", 10, 12),
        weight("bf", 10),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def compiled(model, batch: int, layout: str, records, target):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(with_batch(for_tvm(model, [batch]), batch), keep_params_in_input=False)
    mod = tuning.pre_tuning(mod, target, layout)
    kernels = re.findall(r"call_tir\((\w+)", mod["main"].script())
    executable = relax.build(tuning.apply_records(mod, target, tuning.load_database(records)), target=target)
    return relax.VirtualMachine(executable, tvm.cpu())["main"], kernels


@pytest.mark.parametrize("batch", [1, 3])
def test_nhwc_gives_the_outputs_of_onnx_runtime_and_of_nchw(tmp_path, batch):
    import onnxruntime as ort
    import tvm

    model = conv_model()
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    x = np.random.default_rng(1).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run(None, {"x": x})

    outputs = {}
    for layout in ("nchw", "nhwc"):
        main, kernels = compiled(model, batch, layout, tmp_path / "records", target)
        outputs[layout] = main(tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(outputs[layout], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
        if layout == "nhwc":
            # Activations are transposed at the edges only (the input, and the flatten before the
            # classifier): ReLU6 fuses into its convolution instead of a transpose round trip.
            transposes = [k for k in kernels if "transpose" in k]
            assert len(transposes) <= 2, kernels
            assert any("conv2d" in k and "maximum" in k and "minimum" in k for k in kernels), kernels
    np.testing.assert_allclose(outputs["nhwc"], outputs["nchw"], rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_an_unknown_layout_is_refused():
    import tvm

    with pytest.raises(ValueError, match="unknown layout"):
        tuning.pre_tuning(tvm.IRModule(), tvm.target.Target("llvm"), "nchw16c")


def test_archive_with_the_nhwc_layout_is_verified_and_says_so(tmp_path, capsys):
    from fastinfer import cli
    from fastinfer.archive.load import load

    model = conv_model()
    onnx.save(model, str(tmp_path / "convs.onnx"))
    archive = tmp_path / "convs.fia"
    build = ["archive", str(tmp_path / "convs.onnx"), "--name", "convs", "--batch-sizes", "1,2", "-o", str(archive)]
    build += ["--target", '{"kind": "llvm", "num-cores": 1}', "--layout", "nhwc"]

    assert cli.main(build) == 1  # untuned builds do not go through the layout conversion
    assert "--layout applies to tuned CPU builds" in capsys.readouterr().err

    # Records from an empty folder: default schedules, but the NHWC pipeline; the archive is
    # verified against ONNX Runtime at each batch size before it is written.
    assert cli.main([*build, "--stored-records-only", "--records", str(tmp_path / "records")]) == 0
    assert "weight prepacking, convolutions in NHWC" in capsys.readouterr().out
    manifest = load(archive, tmp_path / "cache").manifest
    assert manifest.build["layout"] == "nhwc"
    assert manifest.build["verified"], manifest.build


def test_a_graph_the_layout_conversion_refuses_builds_in_nchw(tmp_path, capsys, monkeypatch):
    from fastinfer import cli
    from fastinfer.archive.load import load

    def refuses(mod):
        raise RuntimeError("Traceback ...\nInvalid SLayout:can't find S in source layoutABCDE")

    monkeypatch.setattr(tuning, "convert_layout", refuses)  # as TVM did on ResNet-50's 5-D sums
    onnx.save(conv_model(), str(tmp_path / "convs.onnx"))
    archive = tmp_path / "convs.fia"
    build = ["archive", str(tmp_path / "convs.onnx"), "--name", "convs", "--batch-sizes", "1", "-o", str(archive)]
    build += ["--target", '{"kind": "llvm", "num-cores": 1}', "--stored-records-only", "--records", str(tmp_path / "r")]
    assert cli.main(build) == 0  # --layout auto, the default
    said = "".join(capsys.readouterr())
    assert "convolutions stay NCHW: TVM could not convert this graph to NHWC (Invalid SLayout" in said, said
    assert load(archive, tmp_path / "cache").manifest.build.get("layout", "nchw") == "nchw"

    assert cli.main([*build, "--layout", "nhwc"]) == 1  # asked for by name: the error, not a fallback
    assert "Invalid SLayout" in capsys.readouterr().err
