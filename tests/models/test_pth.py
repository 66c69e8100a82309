import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fastinfer.errors import ModelLoadError, UnsafePickle
from fastinfer.models.default import weights_path
from fastinfer.models.pth import MAGIC_NUMBER, PROTOCOL_VERSION, load_legacy_state_dict


def test_reads_the_shipped_efficientnet_checkpoint():
    weights = load_legacy_state_dict(weights_path())
    assert len(weights) == 296
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert weights["_fc.weight"].dtype == np.float32
    assert all(w.flags.c_contiguous for w in weights.values())
    assert np.isfinite(weights["_blocks.5._project_conv.weight"]).all()


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a ``torch`` module for pickle to write the globals a legacy file names."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage = FloatStorage
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Storage:
    def __init__(self, key, data):
        self.key, self.data = key, data


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, {})

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", sys.modules["torch"].FloatStorage, obj.key, "cpu", obj.data.size, None)
        return None


def write_legacy(path, state, storages):
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True, "protocol_version": PROTOCOL_VERSION}):
            pickle.dump(header, f, protocol=2)
        _LegacyPickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size))
            f.write(s.data.astype("<f4").tobytes())


def test_strides_and_offsets_are_honoured(tmp_path, fake_torch):
    storage = _Storage("1", np.arange(12, dtype=np.float32))
    state = {
        "transposed": _Tensor(storage, 0, (4, 3), (1, 4)),  # the column-major view of 0..11
        "tail": _Tensor(storage, 10, (2,), (1,)),
    }
    path = tmp_path / "small.pth"
    write_legacy(path, state, [storage])
    weights = load_legacy_state_dict(str(path))
    np.testing.assert_array_equal(weights["transposed"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    np.testing.assert_array_equal(weights["tail"], [10, 11])


def test_a_view_past_its_storage_is_refused(tmp_path, fake_torch):
    storage = _Storage("1", np.arange(4, dtype=np.float32))
    path = tmp_path / "overrun.pth"
    write_legacy(path, {"w": _Tensor(storage, 2, (4,), (1,))}, [storage])
    with pytest.raises(ModelLoadError, match="past its storage"):
        load_legacy_state_dict(str(path))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_calls_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"w": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(UnsafePickle, match="system"):
        load_legacy_state_dict(str(path))
    assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path):
    data = Path(weights_path()).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_legacy_state_dict(str(truncated))
    foreign = tmp_path / "foreign.pth"
    foreign.write_bytes(b"PK\x03\x04 not a legacy checkpoint")
    with pytest.raises(ModelLoadError):
        load_legacy_state_dict(str(foreign))
