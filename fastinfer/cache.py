"""The on-disk cache's build folders: entries built once, under a lock, through staging folders.

An entry (an extracted archive) is built by one process at a time, under
``<entry>.lock``, into a hidden staging folder beside it that is renamed into place once complete.
An entry already in place is used without opening anything for writing, so a pre-built cache
may be read-only.

A process killed mid-build leaves its staging behind. Every builder holds its folder's
``staging.lock`` shared for as long as its staging exists, and :func:`remove_stale_staging` (run
at start) removes the staging of a folder only while it holds that lock exclusively, that is,
while no live process builds there. An flock goes with its process, so a dead builder never
blocks the sweep, and a live one (another server on the same cache, a worker still compiling) is
never swept; unlike a pid or an age, this holds across pid namespaces sharing a cache and for
builds of any length.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fastinfer.errors import ModelLoadError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
STAGING_LOCK = "staging.lock"
# The build folders under the cache dir, and how the staging their builders make is named: that of
# ensure_entry (extracted archives), and that of archive builds (pack.build_archive stages
# ``.<archive name>.*`` beside the archive it writes: the default model's, and plain ONNX files').
STAGING_NAMES = {"archives": STAGING_PREFIX, "default": ".efficientnet_lite0-", "onnx-archives": "."}


def ensure_entry(entry: Path, complete_marker: str, build: Callable[[Path], None]) -> None:
    """Make sure ``entry`` holds a complete build (one with the file ``complete_marker``): use it if
    it is there, else build it (once, whichever process gets there first) with ``build(staging)``."""
    if (entry / complete_marker).exists():
        return  # built: nothing to write
    with building(entry):
        if (entry / complete_marker).exists():
            return  # another process built it meanwhile
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=entry.parent))
        try:
            build(staging)
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextlib.contextmanager
def building(entry: Path) -> Iterator[None]:
    """Hold the right to build ``entry`` (its own lock, exclusive; its folder's staging lock, shared).

    Several workers may start at once: one builds, the others wait here and then find it built.
    ModelLoadError if the cache cannot be written: then it must hold every entry already built.
    """
    with contextlib.ExitStack() as stack:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(entry.parent / STAGING_LOCK, fcntl.LOCK_SH))
            stack.enter_context(_locked(f"{entry}.lock", fcntl.LOCK_EX))
        except OSError as error:
            raise ModelLoadError(
                f"cannot write the cache {entry.parent}: {error.strerror}; "
                "a read-only cache must hold every model already built"
            ) from error
        yield


@contextlib.contextmanager
def _locked(path: str | Path, operation: int) -> Iterator[None]:
    """Hold an flock of ``operation`` on ``path`` (created if missing); OSError if it cannot be
    opened for writing, BlockingIOError if ``LOCK_NB`` is asked and another process holds it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def remove_stale_staging(cache_dir: str | Path) -> list[Path]:
    """Remove staging left in the cache's build folders by builders that died; returns what went."""
    removed: list[Path] = []
    for name, prefix in STAGING_NAMES.items():
        folder = Path(cache_dir) / name
        try:
            with _locked(folder / STAGING_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB):
                removed += _remove_staging(folder, prefix)
        except OSError:
            # No such folder, a read-only one, or a live builder holds the lock (BlockingIOError):
            # what it leaves behind goes at a later start.
            continue
    if removed:
        log.info("removed %d staging folders left by interrupted builds", len(removed))
    return removed


def _remove_staging(folder: Path, prefix: str) -> list[Path]:
    staging = [path for path in folder.iterdir() if path.name.startswith(prefix)]
    for path in staging:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return staging
