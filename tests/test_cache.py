"""The cache's build folders: a pre-built cache serves read-only; staging left by a crash goes at start."""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import onnx
import pytest
from conftest import running_server
from onnx import TensorProto, helper

from fastinfer import cache
from fastinfer.archive.cached import archive_for_onnx
from fastinfer.archive.load import load
from fastinfer.archive.pack import BuildOptions, build_archive
from fastinfer.errors import ModelLoadError


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: this process can no longer write under ``folder``, as on a read-only
    mount (chmod would not stop root, which tests may run as)."""
    roots: list[str] = []

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return False
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = os.path.abspath(path)
        return any(path == root or path.startswith(root + os.sep) for root in roots)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and inside(path, dir_fd):
            refuse(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guarded(real):
        def call(path, *args, dir_fd=None, **kwargs):
            if inside(path, dir_fd):
                refuse(path)
            return real(path, *args, dir_fd=dir_fd, **kwargs)

        return call

    def guarded_move(real):
        def call(source, destination, *args, **kwargs):
            if inside(source) or inside(destination):
                refuse(destination)
            return real(source, destination, *args, **kwargs)

        return call

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("mkdir", "rmdir", "unlink", "remove"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, guarded_move(getattr(os, name)))
    return lambda folder: roots.append(os.path.abspath(folder))


def relu_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_read_only_helper_refuses_writes(tmp_path, read_only):
    read_only(tmp_path)
    with pytest.raises(OSError, match="Read-only"):
        (tmp_path / "x").write_text("x")
    with pytest.raises(OSError, match="Read-only"):
        (tmp_path / "d").mkdir()


def test_a_read_only_pre_built_cache_serves_a_plain_onnx_file(tmp_path, read_only):
    source = relu_model(tmp_path / "relu.onnx")
    built = archive_for_onnx("relu", source, tmp_path / "cache", num_cores=1)
    read_only(tmp_path / "cache")
    assert archive_for_onnx("relu", source, tmp_path / "cache", num_cores=1) == built


def test_a_read_only_cache_without_the_model_says_so(tmp_path, read_only):
    (tmp_path / "cache").mkdir()
    read_only(tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=r"cannot write the cache .*: Read-only file system; a read-only cache"):
        archive_for_onnx("relu", relu_model(tmp_path / "relu.onnx"), tmp_path / "cache", num_cores=1)


def test_a_read_only_pre_built_cache_serves_an_extracted_archive(tmp_path, read_only):
    archive = tmp_path / "relu.fia"
    build_archive(relu_model(tmp_path / "relu.onnx"), archive, BuildOptions(name="relu", cache_dir=str(tmp_path)))
    cache_dir = tmp_path / "serving-cache"
    first = load(archive, cache_dir)
    read_only(cache_dir)
    again = load(archive, cache_dir)
    assert again.folder == first.folder and again.library_paths()[None].is_file()


def test_a_read_only_pre_built_cache_serves_the_default_model(tmp_path, read_only, monkeypatch):
    from fastinfer.archive import pack
    from fastinfer.models import default

    onnx_file = tmp_path / "efficientnet_lite0-0.onnx"
    onnx_file.write_bytes(b"")
    monkeypatch.setattr(default, "onnx_path", lambda cache_dir: onnx_file)
    monkeypatch.setattr(pack, "build_archive", lambda source, output, options: Path(output).write_bytes(b"fia"))
    built = default.archive_path(tmp_path / "cache", 1)
    read_only(tmp_path / "cache")
    assert default.archive_path(tmp_path / "cache", 1) == built


def leave_staging(cache_dir: Path) -> list[Path]:
    """What builds killed midway leave: staging folders and files in each build folder."""
    left = [
        cache_dir / "onnx-archives" / ".relu-0123.fia.k1ll3d",
        cache_dir / "archives" / ".staging-m1dw4y",
        cache_dir / "default" / ".efficientnet_lite0-0123.fia.ab12cd",
    ]
    for folder in left:
        (folder / "lib").mkdir(parents=True)
        (folder / "lib" / "model.so").write_bytes(b"\x7fELF")
    (cache_dir / "default" / ".efficientnet_lite0-0123.fia.ab12cd.tmp").write_bytes(b"PK")
    return left


def built_entry(cache_dir: Path) -> Path:
    entry = cache_dir / "archives" / "0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    (cache_dir / "archives" / "0123456789abcdef.lock").touch()
    return entry


def hidden(cache_dir: Path) -> list[Path]:
    return sorted(path for path in cache_dir.rglob(".*"))


async def test_staging_left_by_a_killed_build_is_removed_at_start(tmp_path):
    cache_dir = tmp_path / "cache"
    leave_staging(cache_dir)
    entry = built_entry(cache_dir)
    async with running_server(tmp_path, cache_dir=str(cache_dir), models=("echo=echo:float32:4",)) as server:
        assert server.supervisor.ready
        assert hidden(cache_dir) == []
        assert (entry / "manifest.json").exists(), "complete entries stay"


def test_staging_of_a_live_build_is_kept_and_other_files_always(tmp_path):
    cache_dir = tmp_path / "cache"
    left = leave_staging(cache_dir)
    unrelated = cache_dir / "default" / ".not-staging"
    unrelated.touch()
    with cache.building(cache_dir / "onnx-archives" / "relu-0123.fia"):  # as another process, mid-build
        removed = cache.remove_stale_staging(cache_dir)
        assert left[0].exists(), "the folder being built in is left alone"
    assert left[0] not in removed and left[1] in removed and not left[1].exists()
    cache.remove_stale_staging(cache_dir)
    assert hidden(cache_dir) == [unrelated]


def test_a_failed_build_leaves_no_staging(tmp_path):
    def broken(staging: Path) -> None:
        (staging / "model.so").write_bytes(b"half")
        raise ModelLoadError("the compiler failed")

    with pytest.raises(ModelLoadError, match="the compiler failed"):
        cache.ensure_entry(tmp_path / "archives" / "abc", "signature.json", broken)
    assert hidden(tmp_path) == [] and not (tmp_path / "archives" / "abc").exists()


def test_an_entry_is_built_once(tmp_path):
    builds = []

    def build(staging: Path) -> None:
        builds.append(staging)
        (staging / "signature.json").write_text("{}")

    for _ in range(2):
        cache.ensure_entry(tmp_path / "archives" / "abc", "signature.json", build)
    assert len(builds) == 1 and (tmp_path / "archives" / "abc" / "signature.json").exists()
