"""A batch computed image by image through its early layers (see fastinfer.archive.image_by_image):
where the graph is cut, the outputs of the form that cut makes equal to ONNX Runtime's, and how a
build keeps the faster form. Untuned: a small model compiled with default schedules."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive import image_by_image, tuning
from fastinfer.archive.graph import for_tvm

ONE_CORE = {"kind": "llvm", "num-cores": 1}


def mobile_like() -> onnx.ModelProto:
    """An inverted residual as EfficientNet-Lite0's: a 1x1 expansion to 48 channels and ReLU6, a
    depthwise 3x3 of stride 2 and ReLU6, a 1x1 projection (all writing more per image than their
    weights hold), then a 3x3 convolution whose weights outweigh its output, with a residual add
    around it, and the classifier."""
    rng = np.random.default_rng(0)
    expand = 48

    def weight(name, *shape, scale=0.1):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * scale, name)

    nodes = [
        helper.make_node("Conv", ["x", "we"], ["e"], kernel_shape=[1, 1]),
        helper.make_node("Clip", ["e", "zero", "six"], ["ce"]),
        helper.make_node("Conv", ["ce", "wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Clip", ["d", "zero", "six"], ["cd"]),
        helper.make_node("Conv", ["cd", "wp"], ["p"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["p", "ws"], ["s"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["s", "p"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    nodes[2].attribute.append(helper.make_attribute("group", expand))
    initializers = [
        weight("we", expand, 8, 1, 1),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        weight("wd", expand, 1, 3, 3),
        weight("wp", 8, expand, 1, 1),
        weight("ws", 8, 8, 3, 3),
    ]
    graph = helper.make_graph(
        nodes,
        "mobile_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_cut_is_the_last_lone_tensor_before_the_first_layer_whose_weights_outweigh_its_output():
    graph = mobile_like()
    # "s" is no cut: the residual add reads "p" after it; the last node's output is none either
    assert [tensor for _, tensor in image_by_image.cuts(graph)] == ["e", "ce", "d", "cd", "p", "a", "g"]
    assert image_by_image.cut(graph) == "p"  # "s": 576 weights, 512 outputs an image


@pytest.mark.parametrize("heavy", [True, False])
def test_a_graph_heavy_from_its_first_layer_or_never_is_not_cut(heavy):
    """Weights outweigh the first layer's output (a classifier head alone): the batch saves reading
    them from the start. No layer's weights outweigh its output: nothing gains from the batch, but
    nothing says where the early layers end either; both stay one batch."""
    value = helper.make_tensor_value_info
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    first = helper.make_node("MatMul", ["x", "w"], ["m"]) if heavy else helper.make_node("Relu", ["x"], ["m"])
    nodes = [first, helper.make_node("Relu", ["m"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    inputs, outputs = [value("x", TensorProto.FLOAT, ["N", 64])], [value("y", TensorProto.FLOAT, ["N", 64])]
    graph = helper.make_graph(nodes, "head", inputs, outputs, initializer=[w] if heavy else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert [tensor for _, tensor in image_by_image.cuts(model)] == ["m", "r"]
    assert image_by_image.cut(model) is None


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_image_by_image_gives_the_outputs_of_onnx_runtime(layout):
    import onnxruntime as ort
    import tvm
    from tvm import relax

    model = mobile_like()
    x = np.random.default_rng(1).standard_normal((3, 8, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run(None, {"x": x})

    target = tvm.target.Target(ONE_CORE)
    mod = tuning.pre_tuning(image_by_image.module(for_tvm(model, [3]), 3, "p"), target, layout)
    main = mod["main"].script()
    assert len(re.findall(r"= before\(", main)) == 3, main  # each image through the first half
    assert len(re.findall(r"= after\(", main)) == 1, main  # the batch through the second
    executable = relax.build(mod, target=target)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def archive(tmp_path, *extra):
    from fastinfer import cli

    onnx.save(mobile_like(), str(tmp_path / "mobile.onnx"))
    path = tmp_path / "mobile.fia"
    build = ["archive", str(tmp_path / "mobile.onnx"), "--name", "mobile", "--batch-sizes", "1,4", "-o", str(path)]
    build += ["--target", '{"kind": "llvm", "num-cores": 1}', "--stored-records-only"]
    build += ["--records", str(tmp_path / "records"), *extra]
    assert cli.main(build) == 0  # verified against ONNX Runtime at each batch size before it is written
    return path


@pytest.mark.parametrize("images_faster", [True, False])
def test_a_build_keeps_the_faster_form(tmp_path, capsys, monkeypatch, images_faster):
    """Timed in turns, the image-by-image form replaces the batch's library only where it ran faster;
    the archive says so, and the loser's library leaves no file behind."""
    from fastinfer.archive.load import load

    timed = []

    def time_in_turns(paths, inputs, threads):
        timed.append(([path.name for path in paths], [x.shape for x in inputs], threads))
        return [2.0, 1.0] if images_faster else [1.0, 2.0]

    monkeypatch.setattr(image_by_image, "_time_in_turns", time_in_turns)
    path = archive(tmp_path)
    out = capsys.readouterr()
    assert timed == [(["model-b4.so", "model-b4-images.so"], [(4, 8, 16, 16)], 1)]  # batch 4 only
    manifest = load(path, tmp_path / "cache").manifest
    kept = manifest.build["tuning"].get("image_by_image")
    if images_faster:
        assert kept == {"4": {"up_to": "p", "ms": 1000.0, "one_batch_ms": 2000.0}}
        assert "batch 4: image by image (image by image up to 'p'" in out.err
        assert "computed image by image up to 'p'" in out.out  # what inspect shows, after the build
    else:
        assert kept is None
        assert "batch 4: one batch" in out.err
    assert sorted(manifest.libraries.values()) == ["lib/model-b1.so", "lib/model-b4.so"]
    assert not list(tmp_path.glob(".mobile.fia.*")), "the staging folder was removed"


def test_both_forms_are_timed_in_a_process_of_the_librarys_threads(tmp_path, capsys):
    """Not stubbed: the two libraries are timed in a child process, and the form kept is verified."""
    archive(tmp_path)
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("batch 4:"))
    times = [float(ms) for ms in re.findall(r"(\d+\.\d+) ms", line)]
    assert len(times) == 2 and all(ms > 0 for ms in times), line
    images, one_batch = times  # as printed, rounded
    assert images <= one_batch if "image by image (" in line else images >= one_batch, line


def test_a_form_that_does_not_build_leaves_the_batch_as_it_was(tmp_path, capsys, monkeypatch):
    from fastinfer.archive.load import load

    def fails(graph, batch, tensor):
        raise ValueError("the frontend cannot split this graph")

    monkeypatch.setattr(image_by_image, "module", fails)
    path = archive(tmp_path)
    assert (
        "batch 4: stays one batch (image by image did not build or run: the frontend cannot" in capsys.readouterr().err
    )
    manifest = load(path, tmp_path / "cache").manifest
    assert "image_by_image" not in manifest.build["tuning"]
    assert sorted(manifest.libraries.values()) == ["lib/model-b1.so", "lib/model-b4.so"]
