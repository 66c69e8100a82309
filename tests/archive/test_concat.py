"""Concatenation along the innermost axis as one vectorized copy per input (NHWC channel concat)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive import concat, tuning


@pytest.mark.parametrize("num_cores", [1, 2])
@pytest.mark.parametrize(
    "shapes",
    [
        [(1, 5, 5, 64), (1, 5, 5, 64)],  # SqueezeNet's fire module: vectorized copies
        [(2, 3, 4, 24), (2, 3, 4, 7), (2, 3, 4, 40)],  # a width no vector divides, between two that do
        [(6, 3), (6, 1)],  # rank 2, and a single channel
    ],
)
def test_the_kernel_joins_its_inputs_in_order(shapes, num_cores):
    import tvm

    func = concat.innermost_concat([list(s) for s in shapes], "float32", num_cores)
    assert func.attrs["tirx.is_scheduled"]
    func = func.with_attr("global_symbol", "main")  # private in the model's module; standalone here
    library = tvm.compile(
        tvm.IRModule({"main": func}), target=tvm.target.Target({"kind": "llvm", "num-cores": num_cores})
    )
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    expected = np.concatenate(inputs, axis=-1)
    out = tvm.runtime.tensor(np.full(expected.shape, np.nan, np.float32))
    library["main"](*[tvm.runtime.tensor(x) for x in inputs], out)
    np.testing.assert_array_equal(out.numpy(), expected)


def fire_model() -> object:
    """A squeeze convolution feeding two expand convolutions whose outputs are concatenated along
    the channels (axis 1 in the model's NCHW), as SqueezeNet's fire modules do."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "ws"], ["s"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["s", "we1"], ["e1"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["s", "we3"], ["e3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["e1", "e3"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fire",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32, 6, 6])],
        initializer=[weight("ws", 4, 8, 1, 1), weight("we1", 16, 4, 1, 1), weight("we3", 16, 4, 3, 3)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_an_nhwc_channel_concat_is_no_tuning_task_and_computes_the_same(tmp_path):
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = fire_model()
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    (reference,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )

    tasks = {}
    for layout in ("nchw", "nhwc"):
        mod = tuning.pre_tuning(from_onnx(model, keep_params_in_input=False), target, layout)
        tasks[layout] = [task.task_name for task in tuning.all_tasks(mod, target)]
        executable = relax.build(
            tuning.apply_records(mod, target, tuning.load_database(tmp_path / "records")), target=target
        )
        out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    # NCHW's concat (axis 1: contiguous runs) keeps TOPI's kernel and its tuning task; NHWC's
    # (the innermost axis) comes scheduled: its convolutions, and the transposes at its edges, are
    # left to tune.
    assert any("concat" in name for name in tasks["nchw"]), tasks
    assert not any("concat" in name for name in tasks["nhwc"]), tasks
    assert len([name for name in tasks["nhwc"] if "conv2d" in name]) == 3, tasks
