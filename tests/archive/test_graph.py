"""The graph TVM compiles: inputs renamed for generated code, a batch-1 export opened to any batch.

Checked with ONNX Runtime alone (no TVM): the rewritten graph must compute what the exported one
does, sample by sample.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive.graph import at_batch, for_tvm, graph_inputs, safe_input_names, sums_as_adds, with_batch
from fastinfer.archive.manifest import ArchiveError


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def make_model(nodes: list, inputs: list, outputs: list, initializers: list = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def value(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def test_inputs_that_are_not_identifiers_are_renamed_and_keep_their_order():
    model = make_model(
        [helper.make_node("Sub", ["x_y", "x/y"], ["d"]), helper.make_node("Mul", ["d", "0in"], ["out/z"])],
        [value("x_y", [1, 3]), value("x/y", [1, 3]), value("0in", [1, 3])],
        [value("out/z", [1, 3])],
    )
    renamed = safe_input_names(model)
    assert [v.name for v in graph_inputs(renamed)] == ["x_y", "x_y_1", "input_0in"]
    assert [v.name for v in renamed.graph.output] == ["out/z"]  # outputs are not parameters: kept
    arrays = [np.random.default_rng(k).random((1, 3), dtype=np.float32) for k in range(3)]
    (expected,) = run(model, dict(zip(["x_y", "x/y", "0in"], arrays, strict=True)))
    (got,) = run(renamed, dict(zip(["x_y", "x_y_1", "input_0in"], arrays, strict=True)))
    np.testing.assert_array_equal(got, expected)
    assert safe_input_names(renamed) == renamed  # identifiers stay as they are


def hard_coded(*shapes: list[int], through_constant_node: bool = False) -> onnx.ModelProto:
    """Exported for batch 1: x [1, 2, 3, 4] -> Reshape to each of ``shapes`` -> MatMul [24, 5] -> Relu."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((24, 5)).astype(np.float32), "w")
    nodes, initializers, data = [], [weight], "in/x"
    for index, shape in enumerate(shapes):
        constant = numpy_helper.from_array(np.array(shape, np.int64), f"shape{index}")
        if through_constant_node:
            nodes.append(helper.make_node("Constant", [], [constant.name], value=constant))
        else:
            initializers.append(constant)
        nodes.append(helper.make_node("Reshape", [data, constant.name], [f"r{index}"]))
        data = f"r{index}"
    nodes += [helper.make_node("MatMul", [data, "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    return make_model(nodes, [value("in/x", [1, 2, 3, 4])], [value("y", [1, 5])], initializers)


def reshapes(graph: onnx.ModelProto) -> list[list[int]]:
    """The constant shape of each Reshape, in order."""
    constants = {init.name: init for init in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = node.attribute[0].t
    return [numpy_helper.to_array(constants[n.input[1]]).tolist() for n in graph.graph.node if n.op_type == "Reshape"]


@pytest.mark.parametrize(
    ("shapes", "through_constant_node"),
    [
        ([[1, 24]], False),
        ([[1, -1]], True),
        ([[1, 0, 12], [1, 24]], False),  # the second is opened once the first carries the batch through
    ],
)
def test_reshape_that_keeps_the_batch_axis_is_opened(shapes, through_constant_node):
    model = hard_coded(*shapes, through_constant_node=through_constant_node)
    graph = for_tvm(model, [1, 4])
    assert reshapes(graph) == [[0, *shape[1:]] for shape in shapes]
    x = np.random.default_rng(1).random((4, 2, 3, 4), dtype=np.float32)
    (together,) = run(with_batch(graph, 4), {"in_x": x})
    assert together.shape == (4, 5)
    for row in range(4):
        (alone,) = run(model, {"in/x": x[row : row + 1]})
        np.testing.assert_allclose(together[row : row + 1], alone, rtol=1e-6)


def test_batch_one_alone_leaves_the_reshape_as_exported():
    graph = for_tvm(hard_coded([1, 24]), [1])
    assert reshapes(graph) == [[1, 24]]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_at_batch_runs_a_batch_one_export_at_any_batch_outside_tvm():
    """What the benchmarks give ONNX Runtime: the export as it is at batch 1, opened above it."""
    model = hard_coded([1, 24])
    assert at_batch(model, 1) is model
    x = np.random.default_rng(2).random((3, 2, 3, 4), dtype=np.float32)
    (together,) = run(at_batch(model, 3), {"in/x": x})
    (alone,) = run(model, {"in/x": x[2:3]})
    np.testing.assert_allclose(together[2:3], alone, rtol=1e-6)


def test_reshape_that_folds_the_batch_is_refused():
    model = make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [value("x", [1, 4])],
        [value("y", [2, 2])],
        [numpy_helper.from_array(np.array([2, 2], np.int64), "shape")],
    )
    with pytest.raises(ArchiveError, match=r"fixes batch 1: its output 'y' has a leading axis of 2"):
        for_tvm(model, [1, 8])


def test_leading_one_that_is_not_the_batch_axis_is_not_opened():
    # [1, 4] -> Transpose -> [4, 1] -> Reshape [1, 4]: that 1 is the transposed axis, not the batch.
    model = make_model(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Reshape", ["t", "s"], ["y"])],
        [value("x", [1, 4])],
        [value("y", [1, 4])],
        [numpy_helper.from_array(np.array([1, 4], np.int64), "s")],
    )
    with pytest.raises(ArchiveError, match="fixes batch 1"):
        for_tvm(model, [1, 8])


@pytest.mark.parametrize("shapes", [[[1, 3]], [[2, 3], [2, 3]], [[2, 3], [1, 3], [3]]])
def test_sums_become_adds_that_compute_the_same(shapes):
    names = [f"x{index}" for index in range(len(shapes))]
    model = make_model(
        [helper.make_node("Sum", names, ["s"], name="sum"), helper.make_node("Relu", ["s"], ["y"])],
        [value(name, shape) for name, shape in zip(names, shapes, strict=True)],
        [value("y", list(np.broadcast_shapes(*shapes)))],
    )
    graph = sums_as_adds(model)
    assert [node.op_type for node in graph.graph.node] == [*(["Add"] * (len(shapes) - 1) or ["Identity"]), "Relu"]
    onnx.checker.check_model(graph, full_check=True)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in zip(names, shapes, strict=True)}
    np.testing.assert_allclose(run(graph, feeds)[0], run(model, feeds)[0], rtol=1e-6)
    assert for_tvm(model, [1]).graph.node[0].op_type != "Sum"  # the graph TVM compiles has none
