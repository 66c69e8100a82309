"""Small ONNX models and checks shared by the GPU tests (which need no GPU to import)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastinfer.archive import pack
from fastinfer.worker.cuda import cuda_available

ARCH = "sm_90"  # the H200's; compile-only builds name it, GPU builds detect theirs

needs_gpu = pytest.mark.skipif(not cuda_available(0), reason="no CUDA device: TVM's tvm.cuda(0).exist is False")


def tvm_compiles() -> bool:
    """Whether TVM's compiler is loaded (not with ``TVM_USE_RUNTIME_LIB=1`` or a runtime-only install)."""
    import tvm

    return not getattr(tvm.base, "_RUNTIME_ONLY", False)


def cuda_compiler() -> str | None:
    """How TVM would compile CUDA here (nvcc on the PATH, or NVRTC from cuda-python), or None."""
    return pack.cuda_compiler() if tvm_compiles() else None


needs_cuda_compiler = pytest.mark.skipif(
    cuda_compiler() is None,
    reason="no CUDA compiler: TVM runs without its compiler, or neither nvcc nor NVRTC (cuda-python) is installed",
)


def prebuilt(name: str) -> Path | None:
    """``NAME.fia`` in the folder ``FASTINFER_GPU_ARCHIVES`` names, if there: CUDA archives built
    elsewhere (scripts/device-check.sh builds them) for a GPU machine whose TVM cannot compile."""
    folder = os.environ.get("FASTINFER_GPU_ARCHIVES")
    path = Path(folder) / f"{name}.fia" if folder else None
    return path if path is not None and path.exists() else None


def tiny_conv(path: Path) -> Path:
    """Conv 3->4 (3x3, same padding) + ReLU + global average pool, batch axis symbolic."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def tiny_reference(x: np.ndarray, path: Path) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
