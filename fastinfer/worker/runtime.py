"""Runtimes a worker runs models with: the TVM Relax VM, and a numpy echo for server tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fastinfer.signature import TensorSpec
from fastinfer.worker.cuda import CudaBatches, TvmCuda


class Runtime(Protocol):
    """Specs are per sample; ``run`` takes and returns whole batches along axis 0."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_sizes: tuple[int, ...] | None

    def load(self) -> None: ...

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


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


class TvmArchiveRuntime:
    """The libraries of a model archive: one per compiled batch size, or one (key None) for any size.

    The batch that ``run`` gets is already padded to a compiled size, so its leading axis picks the
    library. CPU inputs are wrapped without a copy (64-byte aligned); on a GPU they are copied once.
    """

    def __init__(
        self,
        libraries: dict[int | None, Path],
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        batch_sizes: tuple[int, ...] | None,
        device_kind: str = "llvm",
        device_index: int = 0,
    ):
        self.libraries = libraries
        self.inputs = inputs
        self.outputs = outputs
        self.batch_sizes = batch_sizes
        self.device_kind = device_kind
        self.device_index = device_index
        self._mains: dict[int | None, object] = {}
        self._device = None
        self._gpu: CudaBatches | None = None

    def load(self) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # relax.VirtualMachine, without the compiler

        backend = TvmCuda(self.device_index) if self.device_kind == "cuda" else None
        self._device = backend.device if backend is not None else tvm.cpu()
        for size, path in self.libraries.items():
            vm = VirtualMachine(tvm.runtime.load_module(str(path)), self._device)
            self._mains[size] = vm["main"]
        if backend is not None:
            self._gpu = CudaBatches(self._mains, self.inputs, backend, unpack=_results)  # type: ignore[arg-type]

    def run_into(self, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        """GPU only: run a padded batch, copying each output into ``outputs`` (slot views, padded rows)."""
        assert self._gpu is not None, "run_into is for GPU runtimes; load() first"
        self._gpu.run_into(inputs, outputs)

    @property
    def writes_outputs(self) -> bool:
        """Whether :meth:`run_into` is the way to run (outputs go straight into the slot)."""
        return self._gpu is not None

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self._gpu is not None:
            return [r.numpy() for r in self._gpu.run_on_device(inputs)]
        rows = inputs[0].shape[0]
        main = self._mains.get(rows) or self._mains.get(None)
        if main is None:
            raise ValueError(f"no library for batch size {rows}; compiled: {sorted(self._mains, key=str)}")
        return _call(main, inputs)


def _call(main: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run a VM function on CPU arrays (wrapped, not copied); its outputs as views of TVM's."""
    import tvm

    result = main(*(tvm.runtime.from_dlpack(x) for x in inputs))
    return [np.from_dlpack(r) for r in _results(result)]  # .numpy() would copy


def _results(result: object) -> list:
    """The VM's result as a list of tensors (one output comes alone, several as an array)."""
    import tvm

    return [result] if isinstance(result, tvm.runtime.Tensor) else list(result)  # type: ignore[call-overload]
