"""Tuning: one tiny MetaSchedule run (`fastinfer tune`, stopped by its time budget), its records
reused by `fastinfer archive --stored-records-only` and shown by `inspect`; the rest without a search."""

from __future__ import annotations

import functools
import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer import cli
from fastinfer.archive import tuning
from fastinfer.archive.load import load
from fastinfer.archive.manifest import Manifest
from fastinfer.worker.model import aligned_zeros
from fastinfer.worker.runtime import TvmArchiveRuntime


def dense_model(path):
    weight = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return weight


@pytest.mark.timeout(900)  # builder processes import TVM's tensor intrinsics first: minutes on a busy host
def test_tune_within_a_time_budget_then_build_from_the_records_alone(tmp_path, monkeypatch, capsys):
    weight = dense_model(tmp_path / "dense.onnx")
    records = tmp_path / "records"
    # The clock jumps past the budget once both tasks' first batches are measured: the search must
    # stop there (8 of the 12 trials) instead of spending the rest.
    now = [0.0]
    batches = []
    measured = tuning.Progress.measured

    def measured_then_late(self, *args):
        measured(self, *args)
        batches.append(args)
        now[0] = 1e6 if len(batches) >= 2 else 0.0

    monkeypatch.setattr(tuning.Progress, "measured", measured_then_late)
    monkeypatch.setattr(tuning, "tune", functools.partial(tuning.tune, clock=lambda: now[0], terminal=False))
    tune_args = ["tune", str(tmp_path / "dense.onnx"), "--batch-sizes", "1,2", "--records", str(records)]
    code = cli.main([*tune_args, "--trials-per-task", "8", "--trials", "12", "--tune-time", "30m"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 tasks, 8/12 trials" in err and "stopped: time budget spent" in err, err
    assert "timing the best schedules of 2 tasks again, side by side" in err, err  # the search's best, settled
    assert tuning.database_summary(records) == {"workloads": 2, "records": 2}
    assert not list(records.glob(".tuning-*")), "the scratch database was left behind"

    assert cli.main(tune_args) == 0
    assert "nothing to tune" in capsys.readouterr().out, "a second run searched again"

    def no_tuning(*args, **kwargs):
        raise AssertionError("--stored-records-only tuned")

    monkeypatch.setattr(tuning, "tune", no_tuning)
    archive = tmp_path / "dense.fia"
    build = ["archive", str(tmp_path / "dense.onnx"), "--name", "dense", "--batch-sizes", "1,2", "-o", str(archive)]
    assert cli.main([*build, "--stored-records-only", "--records", str(records)]) == 0
    out = capsys.readouterr().out
    manifest = Manifest.from_json(load(archive, tmp_path / "cache").manifest.to_json())
    assert manifest.tuning is not None and manifest.tuning.tasks_tuned_now == 0
    for size in (1, 2):
        assert f"batch {size}: 1 tasks, 1 with records, estimated " in out, out

    loaded = load(archive, tmp_path / "cache")
    runtime = TvmArchiveRuntime(loaded.library_paths(), manifest.inputs, manifest.outputs, manifest.batch_sizes)
    runtime.load()
    x = aligned_zeros((2, 32), "float32")
    x[:] = np.random.default_rng(2).standard_normal((2, 32))
    (y,) = runtime.run([x])
    np.testing.assert_allclose(y, np.maximum(x @ weight, 0), rtol=1e-4, atol=1e-5)


def test_progress_on_a_terminal_rewrites_one_line():
    stream = io.StringIO()
    now = [100.0]
    progress = tuning.Progress(40, "m", stream, weights=[1.0, 2.0], clock=lambda: now[0], terminal=True)
    now[0] = 110.0
    progress.measured(0, 10, 1, 0.002)
    now[0] = 120.0
    progress.measured(1, 10, 0, 0.001)
    progress.measured(1, 0, 0, 0.003)  # a worse result does not replace the best
    progress.finish("done")
    lines = stream.getvalue().split("\r")[1:]
    assert len(lines) == 4 and stream.getvalue().count("\n") == 1
    assert lines[0].startswith("tuning m: 2 tasks, 10/40 trials (25%), est. 2 ms (1/2 tasks measured), 1 failed, 10 s")
    assert "about 30 s left" in lines[0]  # a quarter of the trials in 10 s
    assert "20/40 trials (50%), est. 4 ms (2/2 tasks measured)" in lines[1]  # 2 ms + 2 x 1 ms
    assert lines[3].endswith("20 s; done\x1b[K\n")


def test_progress_elsewhere_is_a_line_a_minute_and_one_at_the_end():
    stream = io.StringIO()
    now = [0.0]
    progress = tuning.Progress(
        100, "m", stream, weights=[1.0], time_budget_s=90.0, clock=lambda: now[0], terminal=False
    )
    for second in (10, 50, 59):
        now[0] = second
        progress.measured(0, 1, 0, 0.001)
    assert stream.getvalue() == ""
    now[0] = 61
    progress.measured(0, 1, 0, 0.001)
    now[0] = 100
    progress.measured(0, 1, 0, 0.001)
    assert stream.getvalue().count("\n") == 1
    assert "4/100 trials" in stream.getvalue() and "about 29 s left" in stream.getvalue()  # the budget's end
    now[0] = 125
    progress.measured(0, 1, 0, 0.001)
    progress.finish("stopped: time budget spent")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in stream.getvalue()
    assert lines[1].startswith("tuning m: 1 tasks, 6/100 trials")
    assert lines[2].endswith("2m05s; stopped: time budget spent")


def test_stop_after_its_deadline_or_when_interrupted():
    import os
    import signal

    now = [0.0]
    stop = tuning.Stop(10.0, lambda: now[0])
    assert not stop.requested()
    now[0] = 10.0
    assert stop.requested() and stop.reason == "time budget spent"
    assert not tuning.Stop(None, lambda: 1e9).requested()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = tuning.Stop(None)
        stream = io.StringIO()
        with tuning._interrupt_stops(stop, stream):
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop gracefully
            assert stop.requested() and stop.reason == "interrupted"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the second: at once
        assert "Ctrl-C again" in stream.getvalue()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_handler_left_on_meta_schedules_logger_does_not_fail_the_next_run(tmp_path):
    """MetaSchedule names its logger's handlers in the logging config it applies; an unnamed one
    (left by an earlier run or a host's logging set-up) once failed a whole tuning run."""
    import logging

    from tvm.s_tir.meta_schedule.logging import create_loggers

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.addHandler(logging.StreamHandler())
    try:
        tuning._reset_meta_schedule_handlers()
        create_loggers(str(tmp_path), [{"logger_name": "task", "log_dir": str(tmp_path)}])
    finally:
        logger.handlers.clear()


def test_only_keeps_the_tasks_it_holds_true_for(tmp_path):
    """``tune(only=...)`` spends the budget on some kernels (``tune_records.py --depthwise-only``):
    with every task left out, nothing is searched and the records stay as they were."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    dense_model(tmp_path / "dense.onnx")
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    mod = tuning.pre_tuning(from_onnx(onnx.load(str(tmp_path / "dense.onnx")), keep_params_in_input=False), target)
    asked = []

    def none_of_them(workload):
        asked.append(workload)
        return False

    assert tuning.tune([mod], target, tmp_path / "records", 4, stream=io.StringIO(), only=none_of_them) == 0
    assert len(asked) == len(tuning.all_tasks(mod, target)) >= 1
    assert all(isinstance(workload, tvm.IRModule) for workload in asked)
    assert tuning.database_summary(tmp_path / "records") == {"workloads": 0, "records": 0}


def test_tune_records_tells_depthwise_and_pointwise_convolutions_apart(tmp_path):
    """``scripts/tune_records.py --depthwise-only`` and ``--pointwise-only`` pick tasks by their
    kernels: each of a 3x3, a depthwise 3x3 and a 1x1 convolution goes to the right kind, in NHWC
    as the shipped records are tuned."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(0)
    weights = {
        "full": rng.standard_normal((8, 8, 3, 3)),
        "depthwise": rng.standard_normal((8, 1, 3, 3)),
        "pointwise": rng.standard_normal((16, 8, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "full"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "depthwise"], ["c"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Conv", ["d", "pointwise"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 10, 10])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    mod = tuning.pre_tuning(from_onnx(model, keep_params_in_input=False), target, "nhwc")
    workloads = [task.dispatched[0] for task in tuning.all_tasks(mod, target)]
    convolutions = [w for w in workloads if tuning.conv_reductions(w)]
    kinds = sorted((tuning.depthwise(w), tuning.pointwise(w)) for w in convolutions)
    assert kinds == [(False, False), (False, True), (True, False)]  # the 3x3, the 1x1, the depthwise
