"""How a GPU worker runs a batch: which device it owns, and the copies in and out of shared memory.

A batch's inputs already sit in a shared-memory slot, as numpy views. A GPU worker copies each input
once into device tensors that it allocated for that (padded) batch size on first use and reuses for
every later batch of the size: no allocation per request. The VM runs on the device (its outputs
come from the VM's pooled allocator, which reuses freed device memory), and each output is copied
straight into the slot's output rows (``Tensor.copyto`` a CPU tensor that wraps the slot view: no
host-side staging copy). The copies are synchronous, so the slot is complete when ``run_into``
returns.

Pinned memory: TVM's Python API has no host-registration call. ``pin_host_memory`` registers the
slot segment with the CUDA driver (``cuMemHostRegister``, through ctypes) so that copies from and
into it are direct DMA rather than staged through the driver's own pinned buffer. It is best
effort: where the driver refuses (no context yet, a sandbox, a limit on locked memory) the copies
stay correct, only slower, and the worker logs why.

Everything but :class:`TvmCuda` and :func:`pin_host_memory` is plain Python over a small backend
interface, so the plan is tested with fakes on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from fastinfer.errors import ModelLoadError
from fastinfer.signature import TensorSpec

log = logging.getLogger(__name__)

CU_MEMHOSTREGISTER_PORTABLE = 0x01


def parse_device(device: str) -> tuple[str, int]:
    """``cpu`` -> ("cpu", 0); ``cuda:1`` -> ("cuda", 1)."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda" and index.isdigit():
        return "cuda", int(index)
    raise ValueError(f"unknown device {device!r}: expected cpu or cuda:N")


_cuda_runtime_loaded: bool | None = None  # runtime-only TVM: whether its CUDA sidecar library loaded


def tvm_cuda(index: int = 0) -> Any:
    """TVM's CUDA device ``index`` (``tvm.cuda``), its CUDA runtime loaded first where TVM runs
    without its compiler (``TVM_USE_RUNTIME_LIB=1``, a runtime-only install): ``import tvm`` then
    loads no backend, and ``libtvm_runtime_cuda`` (CUDA's device API and module loader) is loaded
    here, as TVM's CUDA backend would. Where it does not load, the device does not exist."""
    import tvm

    global _cuda_runtime_loaded
    if _cuda_runtime_loaded is None:
        _cuda_runtime_loaded = True
        libraries = getattr(tvm.base, "_LOADED_LIBS", {})
        if getattr(tvm.base, "_RUNTIME_ONLY", False) and "tvm_runtime_cuda" not in libraries:
            from pathlib import Path

            from tvm_ffi.libinfo import load_lib_ctypes

            try:
                libraries["tvm_runtime_cuda"] = load_lib_ctypes(
                    package="tvm",
                    target_name="tvm_runtime_cuda",
                    extra_lib_paths=[Path(libraries["tvm_runtime"]._name).resolve().parent],
                    mode="RTLD_LOCAL",
                )
            except (OSError, RuntimeError, KeyError) as error:  # no libcudart or libcuda: no GPU
                _cuda_runtime_loaded = False
                log.info("TVM's CUDA runtime did not load: %s", error)
            else:
                import tvm_ffi

                tvm_ffi.register_global_func("tvm_callback_cuda_compile", _nvrtc_compile(index), override=True)
    return tvm.cuda(index)


def _nvrtc_compile(index: int) -> Callable[[str], bytes]:
    """TVM's ``tvm_callback_cuda_compile`` for TVM without its compiler library.

    A CUDA library holds its kernels as CUDA source, compiled when it is loaded (with NVRTC, from
    the ``cuda-bindings`` package). TVM's own callback asks the compiler library for the current
    target, to learn the architecture; this one names it: device ``index``'s, as TVM's would
    (``sm_90a`` on Hopper)."""

    def compile_cuda(code: str) -> bytes:
        import tvm
        from tvm.support import nvcc

        major, minor = tvm.cuda(index).compute_version.split(".")
        arch = f"sm_{major}{minor}" + ("a" if int(major) >= 9 else "")
        return bytes(nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc"))

    return compile_cuda


def cuda_available(index: int = 0) -> bool:
    """Whether TVM sees CUDA device ``index`` (False where TVM or the driver is missing)."""
    try:
        return bool(tvm_cuda(index).exist)
    except Exception:  # no driver, no libcuda: no GPU
        return False


class Backend(Protocol):
    """The device operations a GPU batch needs."""

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any: ...

    def upload(self, device_tensor: Any, host: np.ndarray) -> None: ...

    def download(self, device_tensor: Any, host: np.ndarray) -> None: ...


class TvmCuda:
    """:class:`Backend` on TVM's CUDA device ``index``."""

    def __init__(self, index: int):
        self.device = tvm_cuda(index)
        if not self.device.exist:
            raise ModelLoadError(f"this worker owns cuda:{index}, and TVM sees no such CUDA device")

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        import tvm

        return tvm.runtime.empty(shape, dtype, self.device)

    def upload(self, device_tensor: Any, host: np.ndarray) -> None:
        device_tensor.copyfrom(host)  # one synchronous host-to-device copy from the slot view

    def download(self, device_tensor: Any, host: np.ndarray) -> None:
        import tvm

        if host.ctypes.data % 64 == 0 and host.flags["C_CONTIGUOUS"]:
            device_tensor.copyto(tvm.runtime.from_dlpack(host))  # straight into the slot
        else:
            host[...] = device_tensor.numpy()  # an unaligned view cannot be wrapped; copy via numpy


class CudaBatches:
    """Runs batches of one model on one GPU through ``mains`` (batch size, None: any -> VM function)."""

    def __init__(
        self,
        mains: dict[int | None, Callable[..., Any]],
        inputs: Sequence[TensorSpec],
        backend: Backend,
        unpack: Callable[[Any], list[Any]] | None = None,
    ):
        self.mains = mains
        self.inputs = tuple(inputs)
        self.backend = backend
        self.unpack = unpack or (lambda result: list(result) if isinstance(result, list | tuple) else [result])
        self.buffers: dict[int, list[Any]] = {}  # padded batch size -> device input tensors

    def main_for(self, rows: int) -> Callable[..., Any]:
        main = self.mains.get(rows) or self.mains.get(None)
        if main is None:
            raise ValueError(f"no library for batch size {rows}; compiled: {sorted(self.mains, key=str)}")
        return main

    def device_inputs(self, rows: int) -> list[Any]:
        """The device tensors for batches of ``rows`` (padded) rows, allocated on first use."""
        tensors = self.buffers.get(rows)
        if tensors is None:
            tensors = [self.backend.empty((rows, *spec.shape), spec.dtype) for spec in self.inputs]
            self.buffers[rows] = tensors
        return tensors

    def run_on_device(self, inputs: list[np.ndarray]) -> list[Any]:
        """Copy ``inputs`` (host arrays of a padded batch) in, run; the outputs stay on the device."""
        rows = inputs[0].shape[0]
        main = self.main_for(rows)
        tensors = self.device_inputs(rows)
        for tensor, host in zip(tensors, inputs, strict=True):
            self.backend.upload(tensor, host)
        return self.unpack(main(*tensors))

    def run_into(self, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        """Run a padded batch from ``inputs`` and copy each output into ``outputs`` (same rows)."""
        results = self.run_on_device(inputs)
        if len(results) != len(outputs):
            raise ValueError(f"the model gave {len(results)} outputs; {len(outputs)} expected")
        for result, host in zip(results, outputs, strict=True):
            self.backend.download(result, host)


def pin_host_memory(address: int, nbytes: int) -> str | None:
    """Page-lock ``nbytes`` at ``address`` for the CUDA driver; None on success, else why not.

    Needs a current CUDA context on the calling thread (TVM makes its device's primary context
    current once it has allocated there): call it after the model is loaded.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return f"no CUDA driver library: {error}"
    register = getattr(driver, "cuMemHostRegister_v2", None) or getattr(driver, "cuMemHostRegister", None)
    if register is None:
        return "the CUDA driver has no cuMemHostRegister"
    register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    register.restype = ctypes.c_int
    status = register(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), CU_MEMHOSTREGISTER_PORTABLE)
    if status != 0:
        return f"cuMemHostRegister failed with CUDA error {status}"
    return None
