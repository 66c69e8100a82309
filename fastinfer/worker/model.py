"""A model loaded in a worker: its runtime, pre- and postprocessing, and how a batch runs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from fastinfer.errors import FastInferError, ModelLoadError
from fastinfer.preprocess import preprocess_into
from fastinfer.shm import ALIGNMENT
from fastinfer.signature import BatchLayout, ModelSignature, cheapest_runs
from fastinfer.worker.cuda import parse_device
from fastinfer.worker.runtime import EchoRuntime, Runtime

log = logging.getLogger(__name__)


def aligned_zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A zero-filled array whose data starts on an ALIGNMENT boundary, as TVM requires."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array`` itself if its data is aligned for TVM, else an aligned copy."""
    if array.ctypes.data % ALIGNMENT == 0:
        return array
    copy = aligned_zeros(array.shape, array.dtype.str)
    copy[...] = array
    return copy


TIMED_RUNS = 3  # per compiled size at warm-up; the fastest counts (interference only adds time)


@dataclass
class LoadedModel:
    signature: ModelSignature
    runtime: Runtime
    labels: list[str] | None = None
    run_costs: dict[int, float] = field(default_factory=dict)  # seconds per run, by compiled size

    def warm_up(self, rows: int) -> None:
        """Run each compiled size a batch of up to ``rows`` may use, so that the first request does not
        pay for first-run costs, and time it: batches are planned from these costs."""
        sizes = self.signature.batch_sizes
        if sizes is None:  # one library for any batch: nothing to plan, one run warms it
            self.runtime.run([aligned_zeros((rows, *t.shape), t.dtype) for t in self.signature.inputs])
            return
        for size in sorted(size for size in sizes if size <= self.signature.padded(rows)):
            inputs = [aligned_zeros((size, *t.shape), t.dtype) for t in self.signature.inputs]
            self.runtime.run(inputs)
            times = []
            for _ in range(TIMED_RUNS):
                started = time.perf_counter()
                self.runtime.run(inputs)
                times.append(time.perf_counter() - started)
            self.run_costs[size] = min(times)
        costs = ", ".join(f"{size}: {cost * 1000:.2f} ms" for size, cost in sorted(self.run_costs.items()))
        log.info("model %s: a run of each compiled batch size takes %s", self.signature.name, costs)

    def runs(self, rows: int) -> list[tuple[int, int]]:
        """The runs of the compiled code for ``rows`` requests: the cheapest by the measured costs."""
        return cheapest_runs(self.signature, rows, self.run_costs)

    def run_batch(self, layout: BatchLayout, slot: memoryview, rows: int, images: list[memoryview | None]) -> dict:
        """Run ``rows`` requests laid out in ``slot``; write their outputs there; return the reply.

        For image models ``images[i]`` is request i's encoded bytes (None for a padding row), decoded
        here straight into the slot's input rows. A request whose image is bad fails alone.
        """
        padded = self.signature.padded(rows)
        inputs = [layout.input_array(slot, i, padded) for i in range(len(self.signature.inputs))]
        outputs = [layout.output_array(slot, i, padded) for i in range(len(self.signature.outputs))]
        errors: list[dict | None] = [None] * rows
        if self.signature.preprocess is not None:
            for row, image in enumerate(images):
                if image is None:
                    continue
                try:
                    preprocess_into(image, self.signature.preprocess, inputs[0][row])
                except FastInferError as error:
                    errors[row] = {"code": error.code, "status": error.status, "message": error.message}
                    inputs[0][row] = 0
        for start, size in self.runs(rows):
            self._run([x[start : start + size] for x in inputs], [y[start : start + size] for y in outputs])
        reply: dict = {"errors": errors}
        if self.signature.top_k:
            reply["classes"] = [None if errors[row] else self._top_k(outputs[0][row]) for row in range(rows)]
        return reply

    def _run(self, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        """One run of the compiled code, from input rows of the slot into its output rows."""
        inputs = [_aligned(x) for x in inputs]  # a run that starts mid-slot may start off alignment
        if getattr(self.runtime, "writes_outputs", False):  # a GPU copies its outputs straight into the slot
            targets = [_aligned(y) for y in outputs]
            self.runtime.run_into(inputs, targets)  # type: ignore[attr-defined]
            for output, target in zip(outputs, targets, strict=True):
                if target is not output:
                    output[:] = target
        else:
            for output, result in zip(outputs, self.runtime.run(inputs), strict=True):
                output[:] = result

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


def load_model(
    name: str, path: str, *, cache_dir: str, num_cores: int, max_image_pixels: int, device: str = "cpu"
) -> LoadedModel:
    """Build (or find cached) and load the model at ``path`` on ``device``; "" is the default model.

    A GPU worker (``device`` ``cuda:N``) serves model archives with a CUDA library, and echo models.
    """
    from fastinfer.archive.cached import archive_for_onnx
    from fastinfer.models import default

    kind, _ = parse_device(device)
    if kind == "cuda" and not path.startswith("echo:") and not path.endswith(".fia"):
        what = "the default model" if path == "" else path
        raise ModelLoadError(
            f"model {name!r} ({what}) is not a model archive: a GPU worker serves archives built with "
            "`fastinfer archive --target cuda` (or cpu,cuda)"
        )
    if path.startswith("echo:"):
        runtime = EchoRuntime.from_path(path)
        signature = ModelSignature(name, runtime.inputs, runtime.outputs, None, 0, runtime.batch_sizes)
        log.info("model %s loaded", name)
        return LoadedModel(signature, runtime, None)
    if path == "":
        path = str(default.archive_path(cache_dir, num_cores))
    elif not path.endswith(".fia"):  # a plain ONNX file: served from the archive built of it
        path = str(archive_for_onnx(name, path, cache_dir, num_cores))
    return _load_archive(
        name, path, cache_dir=cache_dir, num_cores=num_cores, max_image_pixels=max_image_pixels, device=device
    )


def _load_archive(
    name: str, path: str, *, cache_dir: str, num_cores: int, max_image_pixels: int, device: str = "cpu"
) -> LoadedModel:
    """A model archive, extracted into the cache."""
    from fastinfer.archive.load import load
    from fastinfer.worker.runtime import TvmArchiveRuntime

    kind, index = parse_device(device)
    target_kind = "cuda" if kind == "cuda" else "llvm"
    archive = load(path, cache_dir, target_kind)
    manifest = archive.manifest
    runtime = TvmArchiveRuntime(
        archive.library_paths(target_kind), manifest.inputs, manifest.outputs, manifest.batch_sizes, target_kind, index
    )
    runtime.load()
    preprocess = manifest.image_preprocess(max_image_pixels)
    signature = ModelSignature(
        name, manifest.inputs, manifest.outputs, preprocess, manifest.top_k, manifest.batch_sizes
    )
    log.info("model %s loaded from archive %s (version %s)", name, path, manifest.version)
    return LoadedModel(signature, runtime, archive.labels())
