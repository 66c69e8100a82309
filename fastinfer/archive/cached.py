"""The archive a plain ONNX file is served from, built once into the cache.

``fastinfer serve --models NAME=model.onnx`` compiles through the same path as ``fastinfer
archive`` (one compile path: the graph made fit for TVM, the build verified against ONNX Runtime,
a manifest) and serves the result like any archive. The build is untuned, one library for any batch
size, as a plain file names no batch sizes to tune for; ``fastinfer archive --tune-trials`` or
``--stored-records-only`` makes a tuned one to serve instead. The archive's name holds a hash of
the file's bytes, the target and TVM's version, so a changed model or an upgrade is built anew, and
a cache holding it may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TextIO, cast

from fastinfer import cache
from fastinfer.archive.manifest import ArchiveError
from fastinfer.logs import LogLines

log = logging.getLogger(__name__)

FOLDER = "onnx-archives"  # under the cache dir


def archive_for_onnx(name: str, onnx_path: str | Path, cache_dir: str | Path, num_cores: int) -> Path:
    """The cached archive of ``onnx_path`` for this host's CPU and ``num_cores``, built if missing."""
    import tvm

    from fastinfer.archive import pack
    from fastinfer.archive import target as targets

    try:
        source = Path(onnx_path).read_bytes()
    except OSError as error:
        raise ArchiveError(f"cannot read model {onnx_path}: {error.strerror}") from error
    target = targets.resolve("cpu", num_cores)
    key = hashlib.sha256(source)
    key.update(json.dumps([target, tvm.__version__]).encode())
    path = Path(cache_dir) / FOLDER / f"{Path(onnx_path).stem}-{key.hexdigest()[:16]}.fia"
    if path.exists():
        return path  # built: nothing to write, so a read-only, pre-built cache serves it
    with cache.building(path):  # the build stages hidden files beside ``path``
        if not path.exists():
            log.info("model %s: compiling %s for %s (first start; cached after)", name, onnx_path, target["mcpu"])
            options = pack.BuildOptions(
                name=name,
                target=json.dumps(target),
                cache_dir=str(cache_dir),
                stream=cast(TextIO, LogLines(log, f"model {name}: ")),
            )
            pack.build_archive(onnx_path, path, options)
    return path
