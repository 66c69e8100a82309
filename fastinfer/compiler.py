"""ONNX -> Relax -> a compiled library for the host CPU, cached on disk.

A compiled model is a directory holding ``model.so`` (the Relax VM executable) and
``signature.json``; its name is a hash of the ONNX bytes, the input shapes, the target and the
TVM version, so a second start finds it and a changed model or upgrade never reuses a stale one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastinfer.errors import ModelLoadError
from fastinfer.signature import TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledModel:
    library_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def host_target(num_cores: int) -> dict:
    """The TVM target for this host's CPU, as the JSON dict form TVM 0.2x accepts."""
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": num_cores}


def _onnx_inputs(model, batch_size: int) -> tuple[TensorSpec, ...]:
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif axis == 0:
                shape.append(batch_size)
            else:
                raise ModelLoadError(
                    f"input {value.name!r} has a dynamic dimension at axis {axis}; only the batch axis may be dynamic"
                )
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(value.name, dtype, tuple(shape)))
    return tuple(specs)


def _output_specs(model, relax_main) -> tuple[TensorSpec, ...]:
    from tvm import relax

    info = relax_main.ret_ty
    infos = list(info.fields) if isinstance(info, relax.TupleType) else [info]
    names = [value.name for value in model.graph.output]
    specs = []
    for name, tensor in zip(names, infos, strict=True):
        shape = tuple(int(d) for d in tensor.shape.values)
        specs.append(TensorSpec(name, str(tensor.dtype), shape))
    return tuple(specs)


def compile_onnx(onnx_path: str | Path, cache_dir: str | Path, num_cores: int, batch_size: int = 1) -> CompiledModel:
    """Compile the ONNX model for this host, or return the cached build of it."""
    import tvm

    try:
        onnx_bytes = Path(onnx_path).read_bytes()
    except OSError as error:
        raise ModelLoadError(f"cannot read model {onnx_path}: {error.strerror}") from error
    target = host_target(num_cores)
    key = hashlib.sha256()
    key.update(onnx_bytes)
    key.update(json.dumps([target, tvm.__version__, batch_size], sort_keys=True).encode())
    entry = Path(cache_dir) / "compiled" / key.hexdigest()[:32]
    entry.parent.mkdir(parents=True, exist_ok=True)

    with open(f"{entry}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may start at once: one compiles
        if not (entry / "signature.json").exists():
            _build(onnx_bytes, Path(onnx_path).name, target, batch_size, entry)
    signature = json.loads((entry / "signature.json").read_text())
    return CompiledModel(
        library_path=entry / "model.so",
        inputs=tuple(TensorSpec.from_dict(t) for t in signature["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in signature["outputs"]),
    )


def _build(onnx_bytes: bytes, label: str, target: dict, batch_size: int, entry: Path) -> None:
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    started = time.monotonic()
    log.info("compiling %s for %s (batch %d); cached for later starts", label, target["mcpu"], batch_size)
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as error:  # protobuf raises its own DecodeError
        raise ModelLoadError(f"{label} is not an ONNX model: {error}") from error
    inputs = _onnx_inputs(model, batch_size)
    try:
        mod = from_onnx(model, shape_dict={t.name: list(t.shape) for t in inputs}, keep_params_in_input=False)
        outputs = _output_specs(model, mod["main"])
        executable = relax.build(mod, target=tvm.target.Target(target))
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"TVM could not compile {label}: {error}") from error

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=entry.parent))
    try:
        executable.export_library(str(staging / "model.so"))
        signature = {"inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]}
        (staging / "signature.json").write_text(json.dumps(signature, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("compiled %s in %.1f s", label, time.monotonic() - started)
