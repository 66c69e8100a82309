"""A tiny MetaSchedule run through the archive builder, and its records reused without tuning again."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive.load import load
from fastinfer.archive.pack import BuildOptions, build_archive
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


def test_tune_then_reuse_the_records(tmp_path):
    weight = dense_model(tmp_path / "dense.onnx")
    options = dict(name="dense", tune_trials=2, batch_sizes=(1, 2), cache_dir=str(tmp_path / "cache"))
    log = io.StringIO()
    first = build_archive(tmp_path / "dense.onnx", tmp_path / "a.fia", BuildOptions(**options, stream=log))
    assert first.tuning is not None and first.tuning.tasks_tuned_now > 0 and first.tuning.trials_per_task == 2
    assert "trials (" in log.getvalue(), "no progress was shown"
    assert set(first.libraries) == {"1", "2"}
    with zipfile.ZipFile(tmp_path / "a.fia") as archive:
        assert {"tuning/database_workload.json", "tuning/database_tuning_record.json"} <= set(archive.namelist())
        assert archive.read("tuning/database_tuning_record.json").strip()

    log = io.StringIO()
    second = build_archive(tmp_path / "dense.onnx", tmp_path / "b.fia", BuildOptions(**options, stream=log))
    assert second.tuning is not None and second.tuning.tasks_tuned_now == 0, "the same model was tuned again"
    assert "trials (" not in log.getvalue()

    loaded = load(tmp_path / "b.fia", tmp_path / "cache")
    runtime = TvmArchiveRuntime(loaded.library_paths(), second.inputs, second.outputs, second.batch_sizes)
    runtime.load()
    x = aligned_zeros((2, 32), "float32")
    x[:] = np.random.default_rng(2).standard_normal((2, 32))
    (y,) = runtime.run([x])
    np.testing.assert_allclose(y, np.maximum(x @ weight, 0), rtol=1e-4, atol=1e-5)
