"""The manifest of a model archive: what the model takes and gives, how it was built, every file's hash.

``manifest.json`` is the one file of an archive that is not listed in itself; every other entry is
listed under ``files`` with its sha256 and size, and a loader refuses any entry that is not. Every
path the manifest names (libraries, labels, tuning records) must be one of those listed files: a
manifest that names anything else (``/etc/passwd``, ``../x.so``) is refused as it is read, so no
consumer of a manifest can be led outside the archive's own, hashed bytes.
``schema`` changes only when a reader of an older schema could misread a newer manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

from fastinfer.errors import ModelLoadError
from fastinfer.preprocess import ImagePreprocess
from fastinfer.signature import TensorSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ArchiveError(ModelLoadError):
    """A model archive cannot be built, read, or used on this host."""

    code = "archive_error"


def safe_member(name: str) -> bool:
    """Whether a zip entry name stays inside the folder it is extracted to."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and ":" not in name


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Tuning:
    """The MetaSchedule records an archive was compiled with (``None`` in a manifest: untuned)."""

    trials_per_task: int  # budget of the run that produced missing records (0: all were reused)
    tasks: int  # tuning tasks of the model, over all batch sizes
    tasks_tuned_now: int  # of those, tuned while building this archive (the rest came from records)
    workloads_file: str  # archive paths of the JSON database
    records_file: str
    records_source: str  # "tuned", "cache", "shipped:<name>" or a mix, comma-separated


@dataclass(frozen=True)
class Manifest:
    """Everything a server needs to serve an archive, and everything ``inspect`` shows."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_sizes: tuple[int, ...] | None  # None: one library with a symbolic batch axis
    libraries: dict[str, str]  # batch size (or "any") -> archive path of its compiled library
    target: dict
    tvm_version: str
    fastinfer_version: str
    preprocess: dict | None = None  # ImagePreprocess.to_dict(), or None for raw tensors
    top_k: int = 0
    labels_file: str | None = None
    tuning: Tuning | None = None
    build: dict = field(default_factory=dict)  # source file and hash, host, time, verification
    files: dict[str, FileEntry] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    # Libraries for further targets in the same archive (``--target cpu,cuda``): target kind ->
    # {"target": {...}, "libraries": {...}, "verified": {...}}; ``target``/``libraries`` are the first.
    more_targets: dict[str, dict] = field(default_factory=dict)
    # What the model was built from: "onnx", or "torch.export" (a PyTorch program) with the PyTorch
    # version that exported and checked it. Manifests from before these fields were ONNX builds.
    source_format: str = "onnx"
    torch_version: str | None = None

    def kinds(self) -> list[str]:
        """The target kinds this archive holds libraries for, the first one first."""
        return [self.target["kind"], *self.more_targets]

    def target_for(self, kind: str) -> tuple[dict, dict[str, str]]:
        """The target of ``kind`` and its libraries; ArchiveError if the archive has none."""
        if kind == self.target["kind"]:
            return self.target, self.libraries
        if kind in self.more_targets:
            extra = self.more_targets[kind]
            return dict(extra["target"]), {str(k): str(v) for k, v in extra["libraries"].items()}
        raise ArchiveError(
            f"the archive holds libraries for {', '.join(self.kinds())}, not {kind}: "
            f"rebuild it with `fastinfer archive --target {'cuda' if kind == 'cuda' else 'cpu'}`"
        )

    def named_paths(self) -> Iterator[tuple[str, object]]:
        """(what, path) for every file the manifest names outside ``files``, for every target."""
        for size, path in self.libraries.items():
            yield f"library {size!r}", path
        for kind, extra in self.more_targets.items():
            for size, path in dict(extra["libraries"]).items():
                yield f"{kind} library {size!r}", path
        if self.labels_file is not None:
            yield "labels_file", self.labels_file
        if self.tuning is not None:
            yield "tuning workloads_file", self.tuning.workloads_file
            yield "tuning records_file", self.tuning.records_file

    def check_paths(self) -> None:
        """ArchiveError unless every listed file stays inside the archive's folder and every path
        the manifest names is one of them (so hashed; never an absolute path, never ``..``)."""
        for name in self.files:
            if not safe_member(name):
                raise ArchiveError(f"the manifest lists {name!r}, a path outside the archive's folder; refused")
        for what, path in self.named_paths():
            if not isinstance(path, str) or path not in self.files:
                raise ArchiveError(
                    f"the manifest's {what} is {path!r}, not a file listed (and hashed) in the archive; refused"
                )

    def image_preprocess(self, max_pixels: int) -> ImagePreprocess | None:
        if not self.preprocess:
            return None
        pre = self.preprocess
        return ImagePreprocess(
            resize_shorter=int(pre["resize_shorter"]),
            crop=int(pre["crop"]),
            mean=tuple(float(v) for v in pre["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in pre["std"]),  # type: ignore[arg-type]
            layout=str(pre["layout"]),
            max_pixels=max_pixels,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["batch_sizes"] = list(self.batch_sizes) if self.batch_sizes else None
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
            schema = data.get("schema")
            if schema != SCHEMA_VERSION:
                raise ArchiveError(
                    f"the archive's manifest has schema {schema}; this fastinfer reads schema {SCHEMA_VERSION}"
                )
            tuning = data.get("tuning")
            sizes = data.get("batch_sizes")
            manifest = cls(
                name=data["name"],
                version=str(data["version"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                batch_sizes=tuple(int(s) for s in sizes) if sizes else None,
                libraries={str(k): str(v) for k, v in data["libraries"].items()},
                target=dict(data["target"]),
                tvm_version=data["tvm_version"],
                fastinfer_version=data["fastinfer_version"],
                preprocess=data.get("preprocess"),
                top_k=int(data.get("top_k", 0)),
                labels_file=data.get("labels_file"),
                tuning=Tuning(**tuning) if tuning else None,
                build=dict(data.get("build", {})),
                files={path: FileEntry(**entry) for path, entry in data["files"].items()},
                schema=schema,
                more_targets=dict(data.get("more_targets") or {}),
                source_format=str(data.get("source_format", "onnx")),
                torch_version=data.get("torch_version"),
            )
            manifest.check_paths()
            return manifest
        except ArchiveError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ArchiveError(f"the archive's manifest is malformed: {error!r}") from error
