"""Concatenations written in place by their producers' kernels, after the schedules are applied."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive import concat, concat_in_place, tuning

TARGET = {"kind": "llvm", "num-cores": 1}


def branches_model(widths: list[int], extra: list | None = None, outputs: dict | None = None) -> object:
    """A squeeze convolution feeding one convolution per entry of ``widths`` (1x1 and 3x3 in turn),
    their ReLUs concatenated along the channels, as SqueezeNet's fire modules do; random weights.
    ``extra``: more nodes; ``outputs``: more graph outputs, name -> channels."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "ws")]
    nodes = [helper.make_node("Conv", ["x", "ws"], ["s"], kernel_shape=[1, 1])]
    for i, width in enumerate(widths):
        side = 1 if i % 2 == 0 else 3
        weights.append(numpy_helper.from_array(rng.standard_normal((width, 4, side, side)).astype(np.float32), f"w{i}"))
        weights.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"))
        pads = [side // 2] * 4
        nodes.append(helper.make_node("Conv", ["s", f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[side, side], pads=pads))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"e{i}"]))
    nodes.append(helper.make_node("Concat", [f"e{i}" for i in range(len(widths))], ["y"], axis=1))
    nodes += extra or []
    graph_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, sum(widths), 6, 6])]
    graph_outputs += [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, channels, 6, 6])
        for name, channels in (outputs or {}).items()
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 6, 6])],
        graph_outputs,
        initializer=weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def compiled(model: object, tmp_path) -> tuple[object, object]:
    """``model`` in NHWC with (empty) records applied, as a tuned build prepares it, and a VM of it."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target(TARGET)
    mod = tuning.pre_tuning(from_onnx(model, keep_params_in_input=False), target, "nhwc")
    mod = tuning.apply_records(mod, target, tuning.load_database(tmp_path / "records"))
    return mod, relax.VirtualMachine(relax.build(mod, target=target), tvm.cpu())


def kernels_called(mod: object) -> list[str]:
    import tvm
    from tvm import relax

    names: list[str] = []
    call_ops = {tvm.ir.Op.get("relax.call_tir"), tvm.ir.Op.get("relax.call_tir_inplace")}

    def visit(expr: object) -> None:
        if isinstance(expr, relax.Call) and expr.op in call_ops:
            names.append(expr.args[0].name_hint)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def assert_same_as_onnxruntime(model: object, vm: object) -> None:
    import onnxruntime as ort
    import tvm

    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})
    got = vm["main"](tvm.runtime.tensor(x))
    got = [got.numpy()] if hasattr(got, "numpy") else [tensor.numpy() for tensor in got]
    for out, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize(
    "widths",
    [
        [16, 16],  # a fire module: whole vectors
        [24, 7, 40],  # three inputs, one of a width no vector divides: the slices start anywhere
    ],
)
def test_the_producers_write_the_concatenation_and_it_computes_the_same(widths, tmp_path):
    model = branches_model(widths)
    mod, vm = compiled(model, tmp_path)
    names = kernels_called(mod)
    assert not any(name.startswith("concatenate") for name in names), names
    assert len([name for name in names if name.endswith(concat_in_place.TWIN_SUFFIX)]) == len(widths), names
    assert_same_as_onnxruntime(model, vm)


def test_a_concatenation_whose_input_is_read_elsewhere_stays(tmp_path):
    # e0 is also a graph output: its kernel must keep writing a tensor of its own.
    model = branches_model([16, 16], outputs={"e0": 16})
    mod, vm = compiled(model, tmp_path)
    names = kernels_called(mod)
    assert any(name.startswith("concatenate") for name in names), names
    assert not any(name.endswith(concat_in_place.TWIN_SUFFIX) for name in names), names
    assert_same_as_onnxruntime(model, vm)


def test_the_same_tensor_twice_stays_a_copy(tmp_path):
    # e0 joined with itself: one kernel cannot write two slices.
    twice = helper.make_node("Concat", ["e0", "e0"], ["twice"], axis=1)
    model = branches_model([16], extra=[twice], outputs={"twice": 32})
    mod, vm = compiled(model, tmp_path)
    assert any(name.startswith("concatenate") for name in kernels_called(mod))
    assert_same_as_onnxruntime(model, vm)


def test_a_twin_writes_its_slice_and_nothing_else():
    import tvm

    func = concat.innermost_concat([[2, 3, 4], [2, 3, 5]], "float32")  # any scheduled kernel will do
    twin = concat_in_place.writing_into(func, [2, 3, 16], axis=2, offset=6)
    assert twin is not None and twin.attrs["tirx.is_scheduled"]
    library = tvm.compile(tvm.IRModule({"main": twin.with_attr("global_symbol", "main")}), target=TARGET)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 3, 5)).astype(np.float32)
    whole = tvm.runtime.tensor(np.full((2, 3, 16), np.nan, np.float32))
    library["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), whole)
    out = whole.numpy()
    np.testing.assert_array_equal(out[..., 6:15], np.concatenate([a, b], axis=-1))
    assert np.isnan(out[..., :6]).all() and np.isnan(out[..., 15:]).all()


def test_a_tuned_archive_writes_in_place_and_is_verified_at_each_batch_size(tmp_path):
    """End to end: ``--stored-records-only`` takes the tuned build's path (records applied, then the
    rewrite; tasks without a record keep default schedules; NHWC forced, as no record decides it),
    and the archive is written only once each batch size agrees with ONNX Runtime."""
    import onnx

    from fastinfer import cli
    from fastinfer.archive.load import load

    onnx.save(branches_model([24, 7, 40]), str(tmp_path / "branches.onnx"))
    archive = tmp_path / "branches.fia"
    build = ["archive", str(tmp_path / "branches.onnx"), "--name", "branches", "--batch-sizes", "1,3"]
    build += ["--stored-records-only", "--layout", "nhwc", "--cache-dir", str(tmp_path / "cache"), "-o", str(archive)]
    assert cli.main([*build, "--target", '{"kind": "llvm", "num-cores": 1}']) == 0
    manifest = load(archive, tmp_path / "cache").manifest
    assert manifest.build["verified"]
