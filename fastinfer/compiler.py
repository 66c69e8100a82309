"""ONNX -> Relax -> a compiled library for the host CPU, cached on disk.

A compiled model is a directory holding ``model.so`` (the Relax VM executable) and
``signature.json``; its name is a hash of the ONNX bytes, the target and the TVM version, so a
second start finds it and a changed model or an upgrade never reuses a stale one. It is built
through :func:`fastinfer.cache.ensure_entry`: once, and a cache holding it may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastinfer import cache
from fastinfer.errors import ModelLoadError
from fastinfer.signature import TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledModel:
    library_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_sizes: tuple[int, ...] | None  # None: the batch axis is symbolic, any size runs


def host_target(num_cores: int) -> dict:
    """The TVM target for this host's CPU, as the JSON dict form TVM 0.2x accepts."""
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": num_cores}


def _onnx_inputs(model) -> tuple[tuple[TensorSpec, ...], int | None]:
    """Per-sample input specs, and the fixed batch size (None when the batch axis is symbolic)."""
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    specs, batch_sizes = [], set()
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = list(tensor_type.shape.dim)
        if not dims:
            raise ModelLoadError(f"input {value.name!r} is a scalar; fastinfer batches along a leading axis")
        for axis, dim in enumerate(dims[1:], start=1):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                raise ModelLoadError(
                    f"input {value.name!r} has a dynamic dimension at axis {axis}; only the batch axis may be dynamic"
                )
        first = dims[0]
        batch_sizes.add(first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else None)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(value.name, dtype, tuple(d.dim_value for d in dims[1:])))
    if len(batch_sizes) != 1:
        raise ModelLoadError("the inputs disagree on their batch axis")
    return tuple(specs), batch_sizes.pop()


def _output_specs(model, relax_main) -> tuple[TensorSpec, ...]:
    from tvm import relax

    info = relax_main.ret_ty
    infos = list(info.fields) if isinstance(info, relax.TupleType) else [info]
    names = [value.name for value in model.graph.output]
    specs = []
    for name, tensor in zip(names, infos, strict=True):
        try:
            shape = tuple(int(d) for d in tensor.shape.values[1:])
        except TypeError:
            raise ModelLoadError(f"output {name!r} has a dynamic shape beyond the batch axis") from None
        specs.append(TensorSpec(name, str(tensor.dtype), shape))
    return tuple(specs)


def compile_onnx(onnx_path: str | Path, cache_dir: str | Path, num_cores: int) -> CompiledModel:
    """Compile the ONNX model for this host, or return the cached build of it."""
    import tvm

    try:
        onnx_bytes = Path(onnx_path).read_bytes()
    except OSError as error:
        raise ModelLoadError(f"cannot read model {onnx_path}: {error.strerror}") from error
    target = host_target(num_cores)
    key = hashlib.sha256()
    key.update(onnx_bytes)
    key.update(json.dumps([target, tvm.__version__], sort_keys=True).encode())
    entry = Path(cache_dir) / "compiled" / key.hexdigest()[:32]
    label = Path(onnx_path).name
    cache.ensure_entry(entry, "signature.json", lambda staging: _build(onnx_bytes, label, target, staging))
    signature = json.loads((entry / "signature.json").read_text())
    return CompiledModel(
        library_path=entry / "model.so",
        inputs=tuple(TensorSpec.from_dict(t) for t in signature["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in signature["outputs"]),
        batch_sizes=tuple(signature["batch_sizes"]) if signature["batch_sizes"] else None,
    )


def _build(onnx_bytes: bytes, label: str, target: dict, staging: Path) -> None:
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    started = time.monotonic()
    log.info("compiling %s for %s; cached for later starts", label, target["mcpu"])
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as error:  # protobuf raises its own DecodeError
        raise ModelLoadError(f"{label} is not an ONNX model: {error}") from error
    inputs, batch_size = _onnx_inputs(model)
    try:
        mod = from_onnx(model, keep_params_in_input=False)  # a symbolic batch axis stays symbolic
        outputs = _output_specs(model, mod["main"])
        executable = relax.build(mod, target=tvm.target.Target(target))
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"TVM could not compile {label}: {error}") from error

    executable.export_library(str(staging / "model.so"))
    signature = {
        "inputs": [t.to_dict() for t in inputs],
        "outputs": [t.to_dict() for t in outputs],
        "batch_sizes": [batch_size] if batch_size else None,
    }
    (staging / "signature.json").write_text(json.dumps(signature, indent=1))  # written last: complete
    log.info("compiled %s in %.1f s", label, time.monotonic() - started)
