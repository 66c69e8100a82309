"""Archives of the ``onnx`` package's light models: built, checked, loaded, run, inspected, refused.

The light models are real architectures (SqueezeNet 1.0, ResNet-50, ...) with constant weights;
their expected outputs for the input ``arange(n) / n`` ship beside them.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import LIGHT, expected_output, light_input
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_graph import hard_coded

from fastinfer.archive.commands import describe
from fastinfer.archive.load import load
from fastinfer.archive.manifest import MANIFEST_NAME, ArchiveError, Manifest
from fastinfer.archive.pack import BuildOptions, build_archive
from fastinfer.cli import main as cli
from fastinfer.worker.model import aligned_zeros, load_model
from fastinfer.worker.runtime import TvmArchiveRuntime

MODELS = ["squeezenet", "resnet50", "shufflenet", "bvlc_alexnet"]


def leftovers(folder: Path) -> list[str]:
    """Hidden staging files or folders (temporary archives, extraction staging)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".seeded" not in p.name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each light model archived once for the module: name -> archive path."""
    folder = tmp_path_factory.mktemp("archives")
    cache = tmp_path_factory.mktemp("archive-cache")
    paths = {}
    for name in MODELS:
        output = folder / f"{name}.fia"
        build_archive(LIGHT / f"light_{name}.onnx", output, BuildOptions(name=name, cache_dir=str(cache)))
        paths[name] = output
    return paths, cache


def loaded_runtime(archive) -> TvmArchiveRuntime:
    manifest = archive.manifest
    runtime = TvmArchiveRuntime(archive.library_paths(), manifest.inputs, manifest.outputs, manifest.batch_sizes)
    runtime.load()
    return runtime


@pytest.mark.parametrize("name", MODELS)
def test_light_model_archive_matches_expected_output(built, name, tmp_path):
    paths, _ = built
    archive = load(paths[name], tmp_path)
    manifest = archive.manifest
    assert manifest.name == name and manifest.tuning is None
    assert manifest.batch_sizes == (1,)
    runtime = loaded_runtime(archive)
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    sample = light_input(model)
    batch = aligned_zeros(sample.shape, "float32")
    batch[:] = sample
    (output,) = runtime.run([batch])
    expected = expected_output(name)
    assert output.shape == expected.shape
    np.testing.assert_allclose(output, expected, rtol=1e-3, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    assert not leftovers(paths[name].parent) and not leftovers(tmp_path)


def test_load_model_serves_an_archive(built, tmp_path):
    paths, _ = built
    loaded = load_model("sq", str(paths["squeezenet"]), cache_dir=str(tmp_path), num_cores=2, max_image_pixels=10**6)
    assert loaded.signature.name == "sq" and loaded.signature.batch_sizes == (1,)
    assert loaded.signature.inputs[0].shape == (3, 224, 224)
    loaded.warm_up(1)


def test_inspect_says_what_the_archive_holds(built, capsys):
    paths, _ = built
    assert cli(["inspect", str(paths["squeezenet"])]) == 0
    text = capsys.readouterr().out
    assert "model      squeezenet, version 1" in text
    assert "data_0: float32 [batch, 3, 224, 224]" in text
    assert "tuned      no" in text and "verified   against" in text
    assert "lib/model-b1.so" in text and "target     llvm" in text
    assert cli(["inspect", str(paths["squeezenet"]), "--json"]) == 0
    manifest = Manifest.from_json(capsys.readouterr().out)
    assert set(manifest.files) == {"lib/model-b1.so"}


def test_symbolic_batch_with_batch_sizes(tmp_path):
    """--batch-sizes turns the fixed batch of 1 into a symbolic axis; batch 4 equals four batch-1 runs."""
    output = tmp_path / "sq.fia"
    manifest = build_archive(
        LIGHT / "light_squeezenet.onnx",
        output,
        BuildOptions(name="sq", batch_sizes=(1, 4), cache_dir=str(tmp_path / "cache")),
    )
    assert manifest.batch_sizes == (1, 4) and set(manifest.libraries) == {"any"}
    assert [c["batch"] for c in manifest.build["verified"]["checks"]] == [1, 3]
    runtime = loaded_runtime(load(output, tmp_path / "cache"))
    batch = aligned_zeros((4, 3, 224, 224), "float32")
    batch[:] = np.random.default_rng(1).random((4, 3, 224, 224), dtype=np.float32)
    (together,) = runtime.run([batch])
    for row in range(4):
        one = aligned_zeros((1, 3, 224, 224), "float32")
        one[:] = batch[row : row + 1]
        np.testing.assert_allclose(runtime.run([one])[0][0], together[row], rtol=1e-4, atol=1e-6)


def test_resnet50_opens_its_batch_and_keeps_its_input_name(tmp_path):
    """The light ResNet-50 was exported for batch 1 (a Reshape to a constant [1, 2048]) and names its
    input gpu_0/data_0, which is no C identifier: its archive serves batches under the ONNX name.

    The light models' weights are constants, so their outputs are uniform (0.001 for every class):
    that rows are computed sample by sample is the tiny models' test, below and in test_graph.py.
    """
    output = tmp_path / "resnet50.fia"
    manifest = build_archive(
        LIGHT / "light_resnet50.onnx",
        output,
        BuildOptions(name="resnet50", batch_sizes=(1, 8), cache_dir=str(tmp_path / "cache")),
    )
    assert [spec.name for spec in manifest.inputs] == ["gpu_0/data_0"]
    assert manifest.batch_sizes == (1, 8) and set(manifest.libraries) == {"any"}
    assert [c["batch"] for c in manifest.build["verified"]["checks"]] == [1, 3]
    model = load_model("resnet50", str(output), cache_dir=str(tmp_path / "cache"), num_cores=2, max_image_pixels=1)
    assert model.signature.inputs[0].name == "gpu_0/data_0"
    batch = aligned_zeros((2, 3, 224, 224), "float32")
    batch[:] = light_input(onnx.load(str(LIGHT / "light_resnet50.onnx")))
    (got,) = model.runtime.run([batch])
    expected = expected_output("resnet50")
    np.testing.assert_allclose(got, np.concatenate([expected, expected]), rtol=1e-3, atol=1e-6)


def test_batch_one_export_runs_each_sample_as_exported(tmp_path):
    source = tmp_path / "hard.onnx"
    onnx.save(hard_coded([1, 0, 12], [1, 24]), str(source))  # random weights: rows differ
    output = tmp_path / "hard.fia"
    manifest = build_archive(source, output, BuildOptions(name="hard", batch_sizes=(1, 4), cache_dir=str(tmp_path)))
    assert [spec.name for spec in manifest.inputs] == ["in/x"]
    assert [c["batch"] for c in manifest.build["verified"]["checks"]] == [1, 3]
    runtime = loaded_runtime(load(output, tmp_path / "cache"))
    batch = aligned_zeros((4, 2, 3, 4), "float32")
    batch[:] = np.random.default_rng(2).random((4, 2, 3, 4), dtype=np.float32)
    (together,) = runtime.run([batch])
    reference = ReferenceEvaluator(str(source))
    for row in range(4):
        (alone,) = reference.run(None, {"in/x": batch[row : row + 1]})
        np.testing.assert_allclose(together[row : row + 1], alone, rtol=1e-4, atol=1e-6)
    assert not np.allclose(together[0], together[1])


def test_graph_that_hard_codes_batch_one_is_refused_at_larger_batches(tmp_path):
    source = tiny_model(tmp_path / "m.onnx", op="Reshape", dims=(1, 4))  # folds the batch into 2 x 2
    model = onnx.load(str(source))
    model.graph.node[0].input.append("shape")
    model.graph.initializer.append(numpy_helper.from_array(np.array([2, 2], np.int64), "shape"))
    onnx.save(model, str(source))
    build_fails(tmp_path, source, r"graph fixes batch 1: its output 'y' has a leading axis of 2", batch_sizes=(1, 4))


# --- bad input -----------------------------------------------------------------------------------


def tiny_model(path: Path, op: str = "Relu", dims: list = (1, 4), domain: str = "") -> Path:
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def build_fails(tmp_path: Path, source: Path, match: str, **options) -> None:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(ArchiveError, match=match):
        build_archive(source, out / "m.fia", BuildOptions(name="m", cache_dir=str(tmp_path / "cache"), **options))
    assert os.listdir(out) == [], "a failed build left files behind"


def test_not_onnx(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    build_fails(tmp_path, source, "is not an ONNX model")


def test_unsupported_operator_is_named(tmp_path):
    build_fails(tmp_path, tiny_model(tmp_path / "m.onnx", op="FancyOp", domain="com.example"), "com.example.FancyOp")


def test_dynamic_input_shape_names_the_flag(tmp_path):
    source = tiny_model(tmp_path / "m.onnx", dims=["N", 3, "H", "W"])
    build_fails(tmp_path, source, r"axis 2 \(H\).*--input-shape x=1,3,\?,\?")
    manifest = build_archive(
        source,
        tmp_path / "fixed.fia",
        BuildOptions(name="m", input_shapes={"x": (1, 3, 8, 8)}, cache_dir=str(tmp_path / "cache")),
    )
    assert manifest.inputs[0].shape == (3, 8, 8) and manifest.batch_sizes == (1,)


def test_disagreeing_build_is_refused(tmp_path, monkeypatch):
    from fastinfer.archive import pack

    real = pack._run_library
    monkeypatch.setattr(pack, "_run_library", lambda *a: [x + 1.0 for x in real(*a)])
    build_fails(tmp_path, tiny_model(tmp_path / "m.onnx"), "disagrees with")


def test_a_build_that_computes_nan_is_refused(tmp_path, monkeypatch):
    # A NaN difference slips past max() and ">": such a build was verified with error 0.
    from fastinfer.archive import pack

    real = pack._run_library
    monkeypatch.setattr(pack, "_run_library", lambda *a: [np.full_like(x, np.nan) for x in real(*a)])
    build_fails(tmp_path, tiny_model(tmp_path / "m.onnx"), "disagrees with")


def test_relative_errors_count_nan_and_infinities_only_where_they_differ():
    from fastinfer.archive.pack import relative_errors

    expected = np.array([1.0, -2.0, np.inf, np.nan, 4.0], np.float32)
    same = relative_errors(expected.copy(), expected)
    np.testing.assert_array_equal(same, np.zeros(5))  # equal infinities and NaN where the reference has NaN
    got = np.array([1.0, -2.0, 3.0, 0.0, np.nan], np.float32)
    errors = relative_errors(got, expected)
    assert errors[0] == errors[1] == 0.0 and np.isinf(errors[2:]).all()
    np.testing.assert_allclose(relative_errors(np.array([1.5, 0.0]), np.array([1.0, 4.0])), [0.125, 1.0])


@pytest.fixture
def small_archive(tmp_path) -> Path:
    output = tmp_path / "tiny.fia"
    build_archive(tiny_model(tmp_path / "m.onnx"), output, BuildOptions(name="tiny", cache_dir=str(tmp_path / "c")))
    return output


def rewrite(archive: Path, change) -> None:
    """Rewrite the zip with ``change(name, data) -> (name, data) | None`` applied to each entry."""
    entries = []
    with zipfile.ZipFile(archive) as source:
        for name in source.namelist():
            result = change(name, source.read(name))
            if result is not None:
                entries.append(result)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as sink:
        for name, data in entries:
            sink.writestr(name, data)
    archive.write_bytes(buffer.getvalue())


def load_fails(archive: Path, tmp_path: Path, match: str) -> None:
    cache = tmp_path / "load-cache"
    with pytest.raises(ArchiveError, match=match):
        load(archive, cache)
    assert not (cache / "archives").exists() or not [p for p in (cache / "archives").iterdir() if p.is_dir()]


def test_truncated_archive(small_archive, tmp_path):
    data = small_archive.read_bytes()
    small_archive.write_bytes(data[: len(data) // 2])
    load_fails(small_archive, tmp_path, "not a model archive, or it is truncated")


def test_edited_library_is_named(small_archive, tmp_path):
    def edit(name, data):
        if name.endswith(".so"):
            data = data[:-1] + bytes([data[-1] ^ 1])
        return name, data

    rewrite(small_archive, edit)
    load_fails(small_archive, tmp_path, r"lib/model-b1\.so does not match its sha256")


def test_entry_escaping_the_folder_is_refused(small_archive, tmp_path):
    with zipfile.ZipFile(small_archive, "a") as archive:
        archive.writestr("../../evil.sh", b"echo owned")
    load_fails(small_archive, tmp_path, "outside the archive's folder")
    assert not (tmp_path / "evil.sh").exists()


def edit_manifest(archive: Path, **changes) -> None:
    def edit(name, data):
        if name == MANIFEST_NAME:
            manifest = json.loads(data)
            manifest.update(changes)
            data = json.dumps(manifest).encode()
        return name, data

    rewrite(archive, edit)


def test_other_tvm_version_is_refused(small_archive, tmp_path):
    edit_manifest(small_archive, tvm_version="0.19.0")
    load_fails(small_archive, tmp_path, r"built with TVM 0\.19\.0; this server runs TVM")


def test_other_target_is_refused(small_archive, tmp_path):
    from fastinfer.archive.target import mismatch

    foreign = [cpu for cpu in ("sapphirerapids", "graniterapids", "znver5") if mismatch({"kind": "llvm", "mcpu": cpu})]
    if not foreign:
        pytest.skip("this host runs code for every CPU tried")
    edit_manifest(small_archive, target={"kind": "llvm", "mcpu": foreign[0], "num-cores": 2})
    load_fails(small_archive, tmp_path, rf"'{foreign[0]}', whose instructions this host's CPU .* lacks: ")


def test_describe_mentions_tuning_source(small_archive):
    from fastinfer.archive.load import read_manifest

    assert "tuned      no" in describe(read_manifest(small_archive))


def test_cli_archive_and_inspect_with_preprocess_and_labels(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(1000)))
    output = tmp_path / "sq-3.fia"
    argv = ["archive", str(LIGHT / "light_squeezenet.onnx"), "--name", "sq", "--version", "3"]
    argv += ["--preprocess", "imagenet", "--labels", str(labels), "-o", str(output), "--cache-dir", str(tmp_path)]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert f"wrote {output}" in text and "model      sq, version 3" in text
    assert "preprocess image: resize shorter side to 256, center crop 224" in text
    assert "postprocess top 5 classes, labels from labels.txt" in text
    loaded = load_model("sq", str(output), cache_dir=str(tmp_path), num_cores=2, max_image_pixels=10**7)
    assert loaded.signature.takes_images and loaded.signature.top_k == 5
    assert loaded.labels is not None and loaded.labels[7] == "class 7"


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    source.write_text("not a model")
    assert cli(["archive", str(source), "--name", "m", "-o", str(tmp_path / "m.fia")]) == 1
    assert "fastinfer archive: error: " in capsys.readouterr().err
    assert not (tmp_path / "m.fia").exists()
    assert cli(["inspect", str(source)]) == 1
    assert "is not a model archive" in capsys.readouterr().err


def test_preprocess_must_fit_the_input(tmp_path):
    source = tiny_model(tmp_path / "m.onnx")
    build_fails(tmp_path, source, r"preprocess makes float32 samples of shape \(3, 224, 224\)", preprocess="imagenet")
