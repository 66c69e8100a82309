"""Runtimes a worker runs models with: the TVM Relax VM, and a numpy echo for server tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np

from fastinfer.signature import TensorSpec


class Runtime(Protocol):
    """Specs are per sample; ``run`` takes and returns whole batches along axis 0."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_sizes: tuple[int, ...] | None

    def load(self) -> None: ...

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


class TvmRuntime:
    """A compiled Relax VM executable on the CPU. Inputs must be 64-byte aligned (zero-copy)."""

    def __init__(
        self,
        library_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        batch_sizes: tuple[int, ...] | None,
    ):
        self.library_path = library_path
        self.inputs = inputs
        self.outputs = outputs
        self.batch_sizes = batch_sizes
        self._main = None

    def load(self) -> None:
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(tvm.runtime.load_module(str(self.library_path)), tvm.cpu())
        self._main = vm["main"]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        assert self._main is not None, "load() first"
        result = self._main(*(tvm.runtime.from_dlpack(x) for x in inputs))
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [r.numpy() for r in results]


class EchoRuntime:
    """Returns its input as its output, after an optional delay: a stand-in for TVM in server tests.

    Named by a model path ``echo:DTYPE:COUNT[:DELAY_S]``, e.g. ``echo:float32:16``.
    """

    def __init__(self, dtype: str, count: int, delay_s: float = 0.0):
        self.inputs: tuple[TensorSpec, ...] = (TensorSpec("input", dtype, (count,)),)
        self.outputs: tuple[TensorSpec, ...] = (TensorSpec("output", dtype, (count,)),)
        self.batch_sizes: tuple[int, ...] | None = None
        self.delay_s = delay_s

    @classmethod
    def from_path(cls, path: str) -> EchoRuntime:
        parts = path.split(":")
        delay = float(parts[3]) if len(parts) > 3 else 0.0
        return cls(np.dtype(parts[1]).name, int(parts[2]), delay)

    def load(self) -> None:
        pass

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return [inputs[0].copy()]
