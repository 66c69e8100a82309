"""Convolutions' output channels padded to whole CPU vectors: the graph computes what it did."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive import channels
from fastinfer.archive.graph import at_batch, graph_inputs


def classifier(
    out_channels: int, opset: int = 13, after: tuple[str, ...] = ("Relu", "GlobalAveragePool")
) -> onnx.ModelProto:
    """SqueezeNet's tail in small: a 1x1 convolution with bias, then ``after``, then Flatten."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((out_channels, 16, 1, 1)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t0"], kernel_shape=[1, 1])]
    for index, op in enumerate(after):
        nodes.append(helper.make_node(op, [f"t{index}"], [f"t{index + 1}"]))
    nodes.append(helper.make_node("Flatten", [f"t{len(after)}"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 5, 5])]
    if opset < 10:  # IR version 3, as the onnx package's light models: initializers are inputs too
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in (weight, bias)]
    spatial = 1 if after and after[-1] == "GlobalAveragePool" else 25
    graph = helper.make_graph(
        nodes,
        "classifier",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels * spatial])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset < 10 else 7
    return model


def outputs(model: onnx.ModelProto, batch: int = 2) -> list[np.ndarray]:
    x = np.random.default_rng(1).standard_normal((batch, 16, 5, 5)).astype(np.float32)
    session = ort.InferenceSession(at_batch(model, batch).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {graph_inputs(model)[0].name: x})


def conv_channels(model: onnx.ModelProto) -> int:
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    weight = next(init for init in model.graph.initializer if init.name == conv.input[1])
    return weight.dims[0]


@pytest.mark.parametrize("opset", [9, 13])  # the split's sizes: an attribute before opset 13, an input since
def test_a_classifier_of_1000_channels_runs_1008_and_gives_the_same_outputs(opset):
    model = classifier(1000, opset)
    padded = channels.pad_output_channels(model, 16)

    onnx.checker.check_model(padded)
    assert conv_channels(padded) == 1008
    ops = [node.op_type for node in padded.graph.node]
    assert ops == ["Conv", "Relu", "GlobalAveragePool", "Split", "Flatten"]  # padding rides through ReLU and pooling
    np.testing.assert_allclose(outputs(padded)[0], outputs(model)[0], rtol=1e-5)
    assert conv_channels(model) == 1000  # the model itself is left as it was


def test_the_padding_stops_before_a_tensor_two_nodes_read():
    model = classifier(1000, after=("Relu",))
    graph = model.graph
    graph.node[-1].input[0] = "t1"
    graph.node.append(helper.make_node("Sigmoid", ["t1"], ["s"]))  # a second reader of the ReLU's output
    graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1000, 5, 5]))
    padded = channels.pad_output_channels(model, 16)

    onnx.checker.check_model(padded)
    assert [node.op_type for node in padded.graph.node] == ["Conv", "Relu", "Split", "Flatten", "Sigmoid"]
    for got, expected in zip(outputs(padded), outputs(model), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_a_convolution_whose_output_is_the_graphs_is_cut_right_after_it():
    model = classifier(1000, after=())
    graph = model.graph
    del graph.node[-1]  # no Flatten: the convolution's output is the graph's
    graph.node[0].output[0] = "y"
    graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000, 5, 5]))
    padded = channels.pad_output_channels(model, 16)

    assert [node.op_type for node in padded.graph.node] == ["Conv", "Split"]
    assert padded.graph.node[-1].output[0] == "y"
    np.testing.assert_allclose(outputs(padded)[0], outputs(model)[0], rtol=1e-5)


@pytest.mark.parametrize(
    ("out_channels", "lanes", "why"),
    [
        (24, 16, "a third more work"),
        (1000, 8, "whole 8-lane vectors already"),
        (1000, 1, "not a CPU target"),
        (1024, 16, "whole vectors already"),
    ],
)
def test_no_padding_where_it_would_not_pay(out_channels, lanes, why):
    model = classifier(out_channels)
    assert channels.pad_output_channels(model, lanes) is model, why


def test_grouped_convolutions_and_computed_weights_are_left_alone():
    grouped = classifier(1000)
    grouped.graph.node[0].attribute.append(helper.make_attribute("group", 2))
    assert channels.pad_output_channels(grouped, 16) is grouped

    computed = classifier(1000)  # the weight is an input, not a constant: nothing to pad
    computed.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1000, 16, 1, 1]))
    del computed.graph.initializer[0]
    assert channels.pad_output_channels(computed, 16) is computed


def test_weights_made_by_constant_of_shape_are_padded():
    """The onnx package's light models hold their weights as ConstantOfShape nodes."""
    model = classifier(1000)
    graph = model.graph
    shape = numpy_helper.from_array(np.array([1000, 16, 1, 1], np.int64), "w_shape")
    fill = numpy_helper.from_array(np.array([0.25], np.float32), "fill")
    graph.node.insert(0, helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=fill))
    del graph.initializer[0]
    graph.initializer.append(shape)
    padded = channels.pad_output_channels(model, 16)

    assert conv_channels(padded) == 1008
    np.testing.assert_allclose(outputs(padded)[0], outputs(model)[0], rtol=1e-5)


def test_lanes_follow_the_target():
    assert channels.float32_lanes({"kind": "llvm", "mcpu": "x86-64-v4"}) == 16
    assert channels.float32_lanes({"kind": "llvm", "mcpu": "x86-64-v3"}) == 8
    assert channels.float32_lanes({"kind": "cuda", "arch": "sm_90"}) == 1


def test_an_archive_of_a_padded_convolution_is_verified(tmp_path):
    """End to end through TVM: the archive is checked against ONNX Runtime at each batch size."""
    from fastinfer import cli
    from fastinfer.archive.load import load

    model = classifier(250)  # padded on vectors of 4, 8 or 16 lanes alike
    onnx.save(model, str(tmp_path / "tail.onnx"))
    archive = tmp_path / "tail.fia"
    build = ["archive", str(tmp_path / "tail.onnx"), "--name", "tail", "--batch-sizes", "1,3", "-o", str(archive)]
    assert cli.main([*build, "--target", '{"kind": "llvm", "num-cores": 1}']) == 0
    assert load(archive, tmp_path / "cache").manifest.build["verified"]
