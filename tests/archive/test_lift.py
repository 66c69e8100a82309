"""Batch-1 schedules tried at a larger batch (``fastinfer.archive.lift``): the same loop nest over
each image in turn computes what the batch's own kernel computes, and a model built from the records
it puts gives ONNX Runtime's outputs. No search: the batch-1 records are MetaSchedule's design
spaces, post-processed as a search's candidates are."""

from __future__ import annotations

import io

import numpy as np
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from conftest import mobile_block  # noqa: E402
from tvm import s_tir, te  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from fastinfer.archive import lift, tuning  # noqa: E402
from fastinfer.archive.graph import for_tvm, with_batch  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 1})


def batched_matmul(batch: int) -> tvm.IRModule:
    a = te.placeholder((batch, 16, 32), name="A")
    b = te.placeholder((32, 24), name="B")
    k = te.reduce_axis((0, 32), name="k")
    c = te.compute((batch, 16, 24), lambda n, i, j: te.sum(a[n, i, k] * b[k, j], axis=k), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def tiled(mod: tvm.IRModule, batch_first: bool) -> s_tir.Trace:
    """A batch-1 schedule that tiles its rows (and, first or not at all, its batch axis)."""
    sch = s_tir.Schedule(mod)
    n, i, j, k = sch.get_loops(sch.get_sblock("C"))
    if batch_first:
        sch.split(n, sch.sample_perfect_tile(n, n=2, decision=[1, 1]))
    i_outer, i_inner = sch.split(i, sch.sample_perfect_tile(i, n=2, decision=[4, 4]))
    sch.reorder(i_outer, k, i_inner, j)
    sch.vectorize(j)
    return sch.trace


def test_a_lifted_schedule_computes_every_image_as_the_batch_kernel_does():
    trace = lift.lifted(tiled(batched_matmul(1), batch_first=True), 4)
    assert trace is not None
    first_tiling = next(inst for inst in trace.insts if inst.kind.name == "SamplePerfectTile")
    assert [int(f) for f in trace.decisions[first_tiling]] == [4, 1]

    sch = s_tir.Schedule(batched_matmul(4))
    trace.apply_to_schedule(sch, remove_postproc=False)
    run = tvm.compile(sch.mod, target=TARGET)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 16, 32)).astype(np.float32)
    b = rng.standard_normal((32, 24)).astype(np.float32)
    c = tvm.runtime.tensor(np.full((4, 16, 24), np.nan, np.float32))
    run["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-5, atol=1e-5)


def test_a_schedule_that_tiles_a_longer_axis_first_is_not_lifted():
    assert lift.lifted(tiled(batched_matmul(1), batch_first=False), 4) is None


def small_model():
    """A strided convolution with ReLU6, a depthwise one and a 1x1, as EfficientNet-Lite0 has them."""
    nodes, initializers = mobile_block(np.random.default_rng(0), pointwise_channels=16, output="y")
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def at_batch(model, batch: int) -> tvm.IRModule:
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(with_batch(for_tvm(model, [batch]), batch), keep_params_in_input=False)
    return tuning.pre_tuning(mod, TARGET, "nhwc")


def record_design_spaces(mod: tvm.IRModule, records) -> None:
    """A record for each task of ``mod``: its first design space, post-processed, with a made-up figure."""
    database = tuning.load_database(records)
    for task in tuning.all_tasks(mod, TARGET):
        workload = task.dispatched[0]
        context = ms.TuneContext(workload, target=TARGET, space_generator="post-order-apply", task_name=task.task_name)
        sch = context.generate_design_space()[0]
        sch.enter_postproc()
        assert all(postproc.apply(sch) for postproc in context.space_generator.postprocs)
        args = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
        database.commit_tuning_record(
            ms.database.TuningRecord(sch.trace, database.commit_workload(workload), [1e-3], TARGET, args)
        )


def test_lift_records_batch_ones_schedules_for_the_batch_and_the_model_stays_right(tmp_path, in_process_builder):
    import onnxruntime as ort
    from tvm import relax

    model = small_model()
    records = tmp_path / "records"
    one, three = at_batch(model, 1), at_batch(model, 3)
    record_design_spaces(one, records)
    stream = io.StringIO()

    put = lift.lift(one, three, 3, TARGET, records, stream, in_process_builder)

    convolutions = [t.dispatched[0] for t in tuning.all_tasks(three, TARGET) if tuning.conv_reductions(t.dispatched[0])]
    assert put >= len(convolutions) == 3  # nothing to beat at batch 3: every lifted schedule is kept
    assert "trying 3 batch-1 schedules at batch 3" in stream.getvalue()
    assert f"batch 3: {put} of 3 batch-1 schedules ran faster, kept" in stream.getvalue()
    database = tuning.load_database(records)
    for workload in convolutions:
        (record,) = database.get_top_k(database.commit_workload(workload), 1)
        first_tiling = next(inst for inst in record.trace.insts if inst.kind.name == "SamplePerfectTile")
        assert [int(f) for f in record.trace.decisions[first_tiling]] == [3, 1, 1, 1]
        assert len(record.run_secs) > 1  # timed here, not the batch-1 figure

    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run(None, {"x": x})
    executable = relax.build(tuning.apply_records(three, TARGET, database), target=TARGET)
    output = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(output, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())

    assert lift.lift(one, three, 3, TARGET, records, io.StringIO()) == 0  # lifted already: nothing to try


def test_a_search_that_ran_to_its_end_tries_the_batch_one_schedules_at_larger_batches(
    tmp_path, monkeypatch, in_process_builder
):
    """``fastinfer tune`` of several batch sizes (``tuning.tune(batch_sizes=...)``) lifts after its
    search, unless the search stopped early (its time budget, Ctrl-C). The search itself is left out."""
    model = small_model()
    one, three = at_batch(model, 1), at_batch(model, 3)
    lifted_to = []
    monkeypatch.setattr(ms.tune, "tune_tasks", lambda **kwargs: None)
    monkeypatch.setattr(tuning, "make_builder", lambda *args: in_process_builder)
    monkeypatch.setattr(lift, "lift", lambda one, mod, batch, *args: lifted_to.append(batch) or 0)

    tuning.tune([one, three], TARGET, tmp_path / "records", 4, stream=io.StringIO(), batch_sizes=[1, 3])
    assert lifted_to == [3]

    lifted_to.clear()
    budget_spent = {"time_budget_s": 0.0, "clock": lambda: 0.0}
    tuning.tune([one, three], TARGET, tmp_path / "other", 4, stream=io.StringIO(), batch_sizes=[1, 3], **budget_spent)
    assert lifted_to == []
