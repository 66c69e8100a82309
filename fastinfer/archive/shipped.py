"""The tuning records the package ships, per portable CPU level, and how builds and searches use them.

``fastinfer/models/tuning/<level>/`` holds records tuned for several cores, ``<level>/1-core/`` those
tuned for one thread (a worker of ``--devices cpu:N``); each is a gzipped JSON database
(``database_*.json.gz``), a tenth of its plain size. A build seeds its cache with them once
(:func:`seed_cache`); ``scripts/tune_records.py`` searches from them, and ``scripts/ship_records.py``
puts what a search found back in (:func:`put_found`).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastinfer.archive import tuning

SHIPPED_RECORDS = Path(__file__).resolve().parent.parent / "models" / "tuning"
FILES = (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE)


def one_core(target: dict) -> bool:
    return target.get("num-cores") == 1


def own_folder(target: dict) -> Path:
    """Where the records tuned for ``target``'s CPU level and core count ship (present or not)."""
    level = SHIPPED_RECORDS / target["mcpu"]
    return level / "1-core" if one_core(target) else level


def folders_for(target: dict) -> list[Path]:
    """The folders of records that ship for this target's CPU level, best suited first.

    A target takes the folder tuned for its core count first, then the other one for the tasks the
    first has no record of: a schedule runs on any core count (one-thread schedules still split their
    outer loops), and one-core NHWC records built for two cores measured 1.0-1.2x ONNX Runtime with two
    threads where the level's own records held only NCHW ones, at 1.6-2.6x (docs/benchmarks.md).
    """
    if target.get("kind") != "llvm" or not target.get("mcpu"):
        return []
    level = SHIPPED_RECORDS / target["mcpu"]
    folders = [level / "1-core", level] if one_core(target) else [level, level / "1-core"]
    return [folder for folder in folders if (folder / f"{tuning.RECORDS_FILE}.gz").exists()]


def recorded_by_own_folder(target: dict) -> Callable[[Any], bool]:
    """Whether the folder shipped for ``target``'s core count (:func:`own_folder`) holds a record of a
    workload (an IRModule); none does when that folder does not ship.

    A build takes the others from the other core count's folder: a one-core schedule whose outer
    tiles are all 1 has no loop to split, and runs on one of two cores (ResNet-50's 14x14 3x3
    convolution, a fifth of the model, took as long on two threads as on one;
    ``scripts/tune_records.py --fallbacks-only`` searches those tasks for the core count).
    """
    folder = own_folder(target)
    if not (folder / f"{tuning.RECORDS_FILE}.gz").exists():
        return lambda workload: False
    with tempfile.TemporaryDirectory(prefix="fastinfer-shipped-") as plain:
        _decompress(folder, Path(plain))
        database = tuning.load_database(Path(plain))  # read whole here; asked in memory after
    return database.has_workload


def best_folder(target: dict) -> Path | None:
    """The shipped folder best suited to ``target`` (see ``folders_for``), if any."""
    return next(iter(folders_for(target)), None)


def digest(target: dict) -> str:
    """A hash of the shipped records for ``target`` ("" when none), so builds notice new records."""
    folders = folders_for(target)
    if not folders:
        return ""
    hashed = hashlib.sha256()
    for folder in folders:
        hashed.update((folder / f"{tuning.RECORDS_FILE}.gz").read_bytes())
    return hashed.hexdigest()[:16]


def seed_cache(records: Path, target: dict) -> str:
    """Merge the shipped records for ``target`` into the cache database once (see ``unpack``).
    Returns the folders' names, or ""."""
    folders = folders_for(target)
    if not folders:
        return ""
    records.mkdir(parents=True, exist_ok=True)
    marker = records / f".seeded-{digest(target)}"
    if not marker.exists():
        unpack(folders, records)
        marker.touch()
    return "+".join(str(folder.relative_to(SHIPPED_RECORDS)) for folder in folders)


def unpack(folders: list[Path], records: Path) -> None:
    """Merge shipped folders into the database in ``records`` as a build reads them: the first folder's
    by their figures, the others' only for workloads still without a record (figures measured on
    another core count do not compare)."""
    for shipped in folders:
        unpacked = Path(tempfile.mkdtemp(prefix=".shipped-", dir=records))
        try:
            _decompress(shipped, unpacked)
            add = tuning.merge if shipped == folders[0] else tuning.fill_gaps
            add(unpacked, records)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)


def _decompress(folder: Path, plain: Path) -> None:
    """A shipped folder's gzipped database, as the plain JSON files MetaSchedule reads, in ``plain``."""
    for name in FILES:
        (plain / name).write_bytes(gzip.decompress((folder / f"{name}.gz").read_bytes()))


def put_found(target: dict, searched: list[Path]) -> int:
    """Put into the shipped folder for ``target`` (:func:`own_folder`) what searches seeded with the
    records a build for ``target`` reads found (``tuning.overlay_found``); the folder's other records
    stay as they are. Returns how many records were put."""
    folder = own_folder(target)
    work = Path(tempfile.mkdtemp(prefix="fastinfer-ship-"))
    try:
        seeded, own = work / "seed", work / "own"
        seeded.mkdir()
        unpack(folders_for(target), seeded)
        own.mkdir()
        for name in FILES:
            packed = folder / f"{name}.gz"
            (own / name).write_bytes(gzip.decompress(packed.read_bytes()) if packed.exists() else b"")
        found = tuning.overlay_found(own, seeded, searched, target["mcpu"], one_core(target))
        if found:
            folder.mkdir(parents=True, exist_ok=True)
            for name in FILES:  # no name or time in the header: the same records give the same bytes
                packed_bytes = gzip.compress((own / name).read_bytes(), compresslevel=9, mtime=0)
                (folder / f"{name}.gz").write_bytes(packed_bytes)
        return found
    finally:
        shutil.rmtree(work, ignore_errors=True)
