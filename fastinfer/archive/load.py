"""Open a model archive: check it whole, then extract it once into the cache.

Every check runs before anything is extracted: the zip is whole, no entry path escapes the
extraction folder, every file matches the sha256 in the manifest (and nothing unlisted is there),
the archive was built with this TVM version, and this host can run its target. A failed check
raises ArchiveError naming what differs. Extraction goes into ``<cache>/archives/<archive sha256>``
through a staging folder renamed into place (:func:`fastinfer.cache.ensure_entry`), so a second
load, or a second worker, reuses it without writing anything: a pre-built cache may be read-only.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastinfer import cache
from fastinfer.archive import target as targets
from fastinfer.archive.manifest import MANIFEST_NAME, ArchiveError, Manifest, safe_member


@dataclass(frozen=True)
class LoadedArchive:
    """A checked archive and the folder its files were extracted to."""

    manifest: Manifest
    folder: Path

    def library_paths(self, kind: str | None = None) -> dict[int | None, Path]:
        """Batch size (None: any) -> compiled library on disk, for target ``kind`` (None: the first)."""
        _, libraries = self.manifest.target_for(kind or self.manifest.target["kind"])
        return {None if k == "any" else int(k): self.folder / v for k, v in libraries.items()}

    def labels(self) -> list[str] | None:
        if not self.manifest.labels_file:
            return None
        text = (self.folder / self.manifest.labels_file).read_text("utf-8")
        return [line for line in text.splitlines() if line]


def read_manifest(path: str | Path) -> Manifest:
    """The manifest alone, without checking the files (for ``inspect``)."""
    with _open(path) as archive:
        return _manifest(archive, path)


def _open(path: str | Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ArchiveError(f"no archive at {path}") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise ArchiveError(f"{path} is not a model archive, or it is truncated: {error}") from error


def _manifest(archive: zipfile.ZipFile, path: str | Path) -> Manifest:
    try:
        text = archive.read(MANIFEST_NAME)
    except KeyError:
        raise ArchiveError(f"{path} has no {MANIFEST_NAME}: it is not a fastinfer archive") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ArchiveError(f"{path} is damaged: cannot read {MANIFEST_NAME}: {error}") from error
    try:
        return Manifest.from_json(text)  # refuses a manifest naming a path that is not its own, listed file
    except ArchiveError as error:
        raise ArchiveError(f"{path}: {error.message}") from None


def check(archive: zipfile.ZipFile, manifest: Manifest, path: str | Path, kind: str | None = None) -> None:
    """Entry paths, hashes, TVM version and target (of ``kind``; None: the first); raise ArchiveError
    at the first that fails."""
    import tvm

    names = archive.namelist()
    for name in names:
        if not safe_member(name):
            raise ArchiveError(f"{path}: entry {name!r} would be extracted outside the archive's folder; refused")
    listed = set(manifest.files)
    extra = sorted(set(names) - listed - {MANIFEST_NAME})
    if extra:
        raise ArchiveError(f"{path}: entries not listed in the manifest: {', '.join(extra)}")
    for name, entry in sorted(manifest.files.items()):  # their paths were checked with the manifest
        if name not in names:
            raise ArchiveError(f"{path}: {name} is listed in the manifest but missing from the archive")
        digest = hashlib.sha256()
        try:
            with archive.open(name) as member:
                for chunk in iter(lambda m=member: m.read(1 << 20), b""):  # type: ignore[misc]
                    digest.update(chunk)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ArchiveError(f"{path}: {name} is damaged or truncated: {error}") from error
        if digest.hexdigest() != entry.sha256:
            raise ArchiveError(
                f"{path}: {name} does not match its sha256 in the manifest "
                f"(expected {entry.sha256[:16]}..., found {digest.hexdigest()[:16]}...): the archive was modified"
            )
    if manifest.tvm_version != tvm.__version__:
        raise ArchiveError(
            f"{path} was built with TVM {manifest.tvm_version}; this server runs TVM {tvm.__version__}: "
            "rebuild it with `fastinfer archive`"
        )
    target, _ = manifest.target_for(kind or manifest.target["kind"])
    reason = targets.mismatch(target)
    if reason:
        flag = "cuda" if target.get("kind") == "cuda" else "cpu"
        raise ArchiveError(f"{path}: {reason}; rebuild it for this host with `fastinfer archive --target {flag}`")


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(path: str | Path, cache_dir: str | Path, kind: str | None = None) -> LoadedArchive:
    """Check the archive at ``path`` for running its ``kind`` libraries (None: the first target's;
    ``llvm``, ``cuda``) and extract it (once) under ``cache_dir``."""
    with _open(path) as archive:
        manifest = _manifest(archive, path)
        check(archive, manifest, path, kind)
        key = _file_sha256(path)[:32]
        folder = Path(cache_dir) / "archives" / key
        cache.ensure_entry(folder, MANIFEST_NAME, lambda staging: _extract(archive, manifest, staging))
    return LoadedArchive(manifest, folder)


def _extract(archive: zipfile.ZipFile, manifest: Manifest, staging: Path) -> None:
    for name in manifest.files:
        destination = staging / name
        if not destination.resolve().is_relative_to(staging.resolve()):  # belt and braces
            raise ArchiveError(f"entry {name!r} would be extracted outside the archive's folder; refused")
        destination.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(name) as source, open(destination, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
    (staging / MANIFEST_NAME).write_text(manifest.to_json())  # written last: the extraction is complete
