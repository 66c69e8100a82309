"""A model loaded in a worker: its runtime, pre- and postprocessing, and how a request runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fastinfer.errors import BadRequest, FastInferError
from fastinfer.preprocess import ImagePreprocess, preprocess_into
from fastinfer.shm import ALIGNMENT, round_up
from fastinfer.signature import ModelSignature
from fastinfer.worker.runtime import EchoRuntime, Runtime, TvmRuntime

log = logging.getLogger(__name__)


def aligned_zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A zero-filled array whose data starts on an ALIGNMENT boundary, as TVM requires."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


@dataclass
class LoadedModel:
    signature: ModelSignature
    runtime: Runtime
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        self._image_batch = None
        if self.signature.preprocess is not None:
            spec = self.signature.inputs[0]
            self._image_batch = aligned_zeros(spec.shape, spec.dtype)

    def warm_up(self) -> None:
        self.runtime.run([aligned_zeros(t.shape, t.dtype) for t in self.signature.inputs])

    def infer(self, kind: str, slot: memoryview, nbytes: int) -> dict:
        """Run one request whose payload is ``slot[:nbytes]``; write outputs into ``slot``; return the reply."""
        if kind == "image":
            if self._image_batch is None or self.signature.preprocess is None:
                raise BadRequest(f"model {self.signature.name} takes tensors, not images")
            preprocess_into(slot[:nbytes], self.signature.preprocess, self._image_batch[0])
            inputs = [self._image_batch]
        else:
            inputs = [self._tensor_input(slot, nbytes)]
        outputs = self.runtime.run(inputs)
        reply: dict = {"outputs": self._write_outputs(outputs, slot)}
        if self.signature.top_k:
            reply["classes"] = self._top_k(outputs[0][0])
        return reply

    def _tensor_input(self, slot: memoryview, nbytes: int) -> np.ndarray:
        if len(self.signature.inputs) != 1:
            raise BadRequest(
                f"model {self.signature.name} has {len(self.signature.inputs)} inputs; a raw body feeds one"
            )
        spec = self.signature.inputs[0]
        if nbytes != spec.nbytes:
            raise BadRequest(
                f"input {spec.name!r} is {spec.dtype} {list(spec.shape)}, {spec.nbytes} bytes; the body has {nbytes}"
            )
        return np.frombuffer(
            slot, dtype=np.dtype(spec.dtype).newbyteorder("<"), count=int(np.prod(spec.shape))
        ).reshape(spec.shape)

    def _write_outputs(self, outputs: list[np.ndarray], slot: memoryview) -> list[dict]:
        described = []
        offset = 0
        for spec, array in zip(self.signature.outputs, outputs, strict=True):
            array = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
            if offset + array.nbytes > len(slot):
                raise FastInferError(f"outputs of {self.signature.name} do not fit one shared-memory slot")
            target = np.frombuffer(slot, array.dtype, count=array.size, offset=offset)
            target[:] = array.reshape(-1)
            described.append(
                {
                    "name": spec.name,
                    "dtype": array.dtype.name,
                    "shape": list(array.shape),
                    "offset": offset,
                    "nbytes": array.nbytes,
                }
            )
            offset = round_up(offset + array.nbytes)
        return described

    def _top_k(self, logits: np.ndarray) -> list[dict]:
        exp = np.exp(logits - logits.max())
        probabilities = exp / exp.sum()
        top = np.argsort(-probabilities)[: self.signature.top_k]
        return [
            {
                "index": int(i),
                "class": self.labels[i] if self.labels else str(i),
                "probability": float(probabilities[i]),
            }
            for i in top
        ]


def load_model(name: str, path: str, *, cache_dir: str, num_cores: int, max_image_pixels: int) -> LoadedModel:
    """Build (or find cached), load and warm up the model at ``path``; "" is the default model."""
    from fastinfer.compiler import compile_onnx
    from fastinfer.models import default

    preprocess: ImagePreprocess | None = None
    labels = None
    top_k = 0
    runtime: Runtime
    if path.startswith("echo:"):
        runtime = EchoRuntime.from_path(path)
    else:
        if path == "":
            onnx_path = str(default.onnx_path(cache_dir))
            preprocess = default.preprocess(max_image_pixels)
            labels = default.imagenet_labels()
            top_k = default.TOP_K
        else:
            onnx_path = path
        compiled = compile_onnx(onnx_path, cache_dir, num_cores)
        runtime = TvmRuntime(compiled.library_path, compiled.inputs, compiled.outputs)
    runtime.load()
    signature = ModelSignature(name, runtime.inputs, runtime.outputs, preprocess, top_k)
    model = LoadedModel(signature, runtime, labels)
    model.warm_up()
    log.info("model %s loaded and warm", name)
    return model
