"""Model archives (``.fia``): build (``pack``; ``pytorch`` for PyTorch programs), check and extract
(``load``), describe (``commands``).

Importing this package does not import TVM or PyTorch; the modules import them where they use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastinfer.archive.manifest import Manifest


def from_torch(module: Any, example_inputs: Any, path: str | Path, *, name: str, **options: Any) -> Manifest:
    """Export a PyTorch ``nn.Module`` with a dynamic batch axis, compile it, check it against PyTorch,
    and write the archive to ``path``; see :func:`fastinfer.archive.pytorch.from_torch`."""
    from fastinfer.archive.pytorch import from_torch as build

    return build(module, example_inputs, path, name=name, **options)
