"""Read PyTorch's legacy (pre-zip) ``.pth`` checkpoints without PyTorch.

The legacy format is a run of pickles: a magic number, a protocol version, system info, the
state dict itself, then the list of storage keys, then each storage as an int64 element count
followed by its raw little-endian elements. Tensors in the state dict point at storages by
persistent id and are rebuilt by ``torch._utils._rebuild_tensor_v2`` with explicit strides.

A checkpoint is untrusted input: the unpickler resolves only the handful of globals this needs
and refuses every other one, so a crafted file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from fastinfer.errors import ModelLoadError, UnsafePickle

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass
class _TensorRef:
    storage_key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage_key: str, offset: int, size: tuple, stride: tuple, *_: Any) -> _TensorRef:
    return _TensorRef(storage_key, offset, tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a legacy state dict needs."""

    def __init__(self, file: IO[bytes], storages: dict[str, np.dtype]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise UnsafePickle(f"checkpoint refers to {module}.{name}, which a weights file has no need of")

    def persistent_load(self, pid: Any) -> str:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickle(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid[:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise UnsafePickle(f"unexpected storage reference {pid!r}")
        self._storages[key] = storage_type.dtype
        return key


def load_legacy_state_dict(path: str) -> dict[str, np.ndarray]:
    """Return the checkpoint's state dict as numpy arrays (contiguous copies, shapes kept)."""
    with open(path, "rb") as file:
        storage_dtypes: dict[str, np.dtype] = {}

        def load() -> Any:
            return _RestrictedUnpickler(file, storage_dtypes).load()

        try:
            if load() != MAGIC_NUMBER:
                raise ModelLoadError(f"{path} is not a legacy PyTorch checkpoint (bad magic number)")
            if load() != PROTOCOL_VERSION:
                raise ModelLoadError(f"{path}: unsupported checkpoint protocol version")
            system_info = load()
            if not system_info.get("little_endian", False):
                raise ModelLoadError(f"{path}: big-endian checkpoints are not supported")
            state = load()
            keys = load()
            storages: dict[str, np.ndarray] = {}
            for key in keys:
                dtype = storage_dtypes[key]
                (count,) = struct.unpack("<q", file.read(8))
                data = file.read(count * dtype.itemsize)
                if len(data) != count * dtype.itemsize:
                    raise ModelLoadError(f"{path} is truncated (storage {key})")
                storages[key] = np.frombuffer(data, dtype=dtype)
        except (pickle.UnpicklingError, EOFError, KeyError, struct.error, AttributeError) as error:
            raise ModelLoadError(f"{path} is not a readable legacy PyTorch checkpoint: {error}") from error

    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return {name: _materialize(ref, storages) for name, ref in state.items()}


def _materialize(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    storage = storages[ref.storage_key]
    end = ref.offset + 1 + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if ref.offset < 0 or any(s < 0 for s in ref.stride) or (all(ref.size) and end > storage.size):
        raise ModelLoadError(f"tensor view runs past its storage {ref.storage_key}")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=tuple(s * item for s in ref.stride),
        writeable=False,
    )
    return np.ascontiguousarray(view)
