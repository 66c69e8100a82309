"""CUDA archives: compile-only builds on a machine without a GPU (run here), and on-device twins."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import onnx
import pytest
from conftest import LIGHT
from gpu_models import ARCH, cuda_compiler, needs_cuda_compiler, needs_gpu, prebuilt, tiny_conv, tiny_reference

from fastinfer.archive.commands import describe
from fastinfer.archive.load import load
from fastinfer.archive.manifest import ArchiveError
from fastinfer.archive.pack import BuildOptions, build_archive
from fastinfer.cli import main as cli
from fastinfer.worker.cuda import cuda_available
from fastinfer.worker.model import aligned_zeros, load_model


@needs_cuda_compiler
def test_cuda_archive_compiles_without_a_gpu(tmp_path):
    source = tiny_conv(tmp_path / "tiny.onnx")
    manifest = build_archive(
        source, tmp_path / "tiny.fia", BuildOptions(name="tiny", target=f"cuda:{ARCH}", cache_dir=str(tmp_path))
    )
    assert manifest.target == {"kind": "cuda", "arch": ARCH}
    assert manifest.libraries == {"any": "lib/model.so"}
    assert [(o.name, o.dtype, o.shape) for o in manifest.outputs] == [("y", "float32", (4,))]
    text = describe(manifest)
    if cuda_available(0):
        assert manifest.build["verified"]["checks"]
    else:
        assert "not verified on-device" in manifest.build["verified"]["skipped"]
        assert "verified   no: not verified on-device" in text
        with pytest.raises(ArchiveError, match="no CUDA device"):
            load(tmp_path / "tiny.fia", tmp_path / "cache")  # a server here refuses it, saying why


@needs_cuda_compiler
def test_json_cuda_target_is_accepted(tmp_path):
    source = tiny_conv(tmp_path / "tiny.onnx")
    target = json.dumps({"kind": "cuda", "arch": ARCH})
    code = cli(["archive", str(source), "--name", "tiny", "--target", target, "-o", str(tmp_path / "t.fia")])
    assert code == 0
    assert cli(["inspect", str(tmp_path / "t.fia")]) == 0


@needs_cuda_compiler
def test_cuda_without_arch_and_without_gpu_names_the_fix(tmp_path, capsys):
    if cuda_available(0):
        pytest.skip("a GPU is here: its architecture is detected")
    source = tiny_conv(tmp_path / "tiny.onnx")
    assert cli(["archive", str(source), "--name", "t", "--target", "cuda", "-o", str(tmp_path / "t.fia")]) == 1
    assert "--target cuda:sm_90" in capsys.readouterr().err


@needs_cuda_compiler
def test_one_archive_holds_cpu_and_cuda_libraries(tmp_path):
    source = tiny_conv(tmp_path / "tiny.onnx")
    path = tmp_path / "both.fia"
    manifest = build_archive(
        source, path, BuildOptions(name="both", target=f"cpu,cuda:{ARCH}", cache_dir=str(tmp_path))
    )
    assert manifest.kinds() == ["llvm", "cuda"]
    assert manifest.more_targets["cuda"]["libraries"] == {"any": "lib/cuda/model.so"}
    assert "lib/cuda/model.so" in manifest.files
    assert "also       cuda sm_90" in describe(manifest)
    # A CPU worker serves the CPU library of the same archive.
    model = load_model("both", str(path), cache_dir=str(tmp_path / "cache"), num_cores=1, max_image_pixels=1)
    x = aligned_zeros((3, 3, 8, 8), "float32")  # CPU inputs are wrapped without a copy: aligned
    x[...] = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    (got,) = model.runtime.run([x])
    np.testing.assert_allclose(got, tiny_reference(x, source), rtol=1e-4, atol=1e-5)
    if not cuda_available(0):
        with pytest.raises(ArchiveError, match="no CUDA device"):
            load(path, tmp_path / "cache", "cuda")


@needs_cuda_compiler
def test_cpu_archive_refuses_a_gpu_worker(tmp_path):
    source = tiny_conv(tmp_path / "tiny.onnx")
    build_archive(source, tmp_path / "cpu.fia", BuildOptions(name="cpu", cache_dir=str(tmp_path)))
    with pytest.raises(ArchiveError, match="holds libraries for llvm, not cuda"):
        load_model(
            "cpu", str(tmp_path / "cpu.fia"), cache_dir=str(tmp_path), num_cores=1, max_image_pixels=1, device="cuda:0"
        )


@needs_cuda_compiler
def test_squeezenet_compiles_for_cuda(tmp_path):
    started = time.monotonic()
    manifest = build_archive(
        LIGHT / "light_squeezenet.onnx",
        tmp_path / "sq.fia",
        BuildOptions(name="squeezenet", target=f"cuda:{ARCH}", cache_dir=str(tmp_path)),
    )
    assert manifest.outputs[0].shape == (1000, 1, 1)
    assert time.monotonic() - started < 300


@needs_cuda_compiler
def test_resnet50_compiles_for_cuda_at_any_batch(tmp_path):
    """The light ResNet-50 names its input gpu_0/data_0 (no C identifier: a kernel parameter named so
    did not compile) and reshapes to a constant [1, 2048]; its archive takes any batch, under that name."""
    log = io.StringIO()
    manifest = build_archive(
        LIGHT / "light_resnet50.onnx",
        tmp_path / "r50.fia",
        BuildOptions(name="resnet50", target=f"cuda:{ARCH}", batch_sizes=(1, 8), cache_dir=str(tmp_path), stream=log),
    )
    assert [spec.name for spec in manifest.inputs] == ["gpu_0/data_0"]
    assert manifest.batch_sizes == (1, 8) and manifest.libraries == {"any": "lib/model.so"}
    assert [(o.name, o.shape) for o in manifest.outputs] == [("gpu_0/softmax_1", (1000,))]
    if cuda_available(0):
        assert [c["batch"] for c in manifest.build["verified"]["checks"]] == [1, 3]
    else:  # compile-only: the kernels were compiled here, as the GPU worker will compile them
        assert f"CUDA kernels compile ({cuda_compiler()}, {ARCH})" in log.getvalue()


@needs_cuda_compiler
def test_kernels_that_do_not_compile_fail_a_compile_only_build(tmp_path, monkeypatch):
    if cuda_available(0):
        pytest.skip("a GPU is here: verification compiles the kernels")
    from fastinfer.archive import pack

    model = onnx.load(str(tiny_conv(tmp_path / "tiny.onnx")))
    model.graph.input[0].name = model.graph.node[0].input[0] = "in/x"
    onnx.save(model, str(tmp_path / "slash.onnx"))

    def as_exported(model, sizes, target=None):  # the names as exported, into the kernels
        return model

    monkeypatch.setattr(pack, "for_tvm", as_exported)
    out = tmp_path / "out"
    options = BuildOptions(name="t", target=f"cuda:{ARCH}", cache_dir=str(tmp_path))
    with pytest.raises(ArchiveError, match=r"CUDA kernels of t batch N do not compile \(.*\): .*\(\d+\): error"):
        build_archive(tmp_path / "slash.onnx", out / "t.fia", options)
    assert list(out.iterdir()) == []


@needs_gpu
def test_cuda_archive_runs_on_the_gpu_at_several_batch_sizes(tmp_path):
    source = tiny_conv(tmp_path / "tiny.onnx")  # the same weights as a prebuilt tiny archive's
    path = prebuilt("tiny") or tmp_path / "tiny.fia"
    if path.parent == tmp_path:
        if cuda_compiler() is None:
            pytest.skip("no CUDA compiler here and no prebuilt tiny.fia (FASTINFER_GPU_ARCHIVES)")
        build_archive(source, path, BuildOptions(name="tiny", target="cuda", cache_dir=str(tmp_path)))
    model = load_model(
        "tiny", str(path), cache_dir=str(tmp_path / "c"), num_cores=1, max_image_pixels=1, device="cuda:0"
    )
    runtime = model.runtime
    for rows in (1, 3, 8, 3):
        x = np.random.default_rng(rows).random((rows, 3, 8, 8), dtype=np.float32)
        out = np.zeros((rows, 4), np.float32)
        runtime.run_into([x], [out])  # type: ignore[attr-defined]
        np.testing.assert_allclose(out, tiny_reference(x, source), rtol=1e-4, atol=1e-5)
    assert sorted(runtime._gpu.buffers) == [1, 3, 8]  # type: ignore[attr-defined]  # once per size
