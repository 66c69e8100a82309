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


def store_models(folder: str | Path) -> dict[str, str]:
    """Model name -> archive path for every ``.fia`` in ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise FastInferError(f"the model store {folder} is not a directory", code="config_error")
    models: dict[str, str] = {}
    latest: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(root.glob("*.fia")):
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
