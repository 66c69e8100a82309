"""A model store: a folder of archives, served side by side.

``NAME-VERSION.fia`` (VERSION: digits and dots, e.g. ``resnet-2.fia``) is served as ``NAME-VERSION``,
and the highest version of each NAME also as plain ``NAME``; an archive without a version in its
file name is served under its file name alone. This reads file names only, so the front process
stays free of TVM and zip reading; the workers check each archive when they load it.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastinfer.errors import FastInferError

_VERSIONED = re.compile(r"^(?P<name>.+)-(?P<version>\d+(?:\.\d+)*)$")


MODEL_SUFFIXES = (".fia", ".onnx")


def store_models(folder: str | Path) -> dict[str, str]:
    """Model name -> archive path for every ``.fia`` in ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise FastInferError(f"the model store {folder} is not a directory", code="config_error")
    return _by_name(sorted(root.glob("*.fia")))


def folder_models(name: str, folder: str | Path) -> dict[str, str]:
    """The models of a folder that ``--models NAME=FOLDER`` names: KServe's storage initializer leaves
    the model file(s) of an InferenceService in ``/mnt/models``, and the runtime passes its name.

    One ``.fia`` or ``.onnx`` file is served as ``name``. Several are served side by side under their
    file names, as a model store's (so ``NAME-1.fia`` and ``NAME-2.fia`` serve NAME as version 2).
    """
    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file())
    if not files:
        raise FastInferError(f"model {name!r}: no .fia or .onnx file in the folder {folder}", code="config_error")
    if len(files) == 1:
        return {name: str(files[0])}
    stems = [p.stem for p in files]
    twins = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twins:
        raise FastInferError(
            f"model {name!r}: the folder {folder} holds both a .fia and an .onnx file named {twins[0]!r}",
            code="config_error",
        )
    return _by_name(files)


def _by_name(files: list[Path]) -> dict[str, str]:
    """Each file by its name, and the highest version of each ``NAME-VERSION`` also as ``NAME``."""
    models: dict[str, str] = {}
    latest: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        models[path.stem] = str(path)
        match = _VERSIONED.match(path.stem)
        if match:
            version = tuple(int(part) for part in match["version"].split("."))
            name = match["name"]
            if name not in latest or version > latest[name][0]:
                latest[name] = (version, str(path))
    for name, (_, newest) in latest.items():
        models.setdefault(name, newest)
    return models
