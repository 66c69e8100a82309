"""``fastinfer archive`` and ``fastinfer inspect``: their flags and what they do."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastinfer.archive.manifest import ArchiveError, Manifest
from fastinfer.errors import FastInferError


def add_archive_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the ONNX file")
    parser.add_argument("--name", required=True, help="the model's name when served")
    parser.add_argument("--version", default="1", help="the model's version (default 1)")
    parser.add_argument("--labels", help="class names: a text file, one a line, or a JSON list or dict")
    parser.add_argument("--top-k", type=int, help="answer the K most probable classes (default: 5 with --labels)")
    parser.add_argument(
        "--preprocess", default="none", help="imagenet, none, or a JSON file {resize_shorter, crop, mean, std, layout}"
    )
    parser.add_argument(
        "--target",
        default="cpu",
        help="cpu (this host's portable x86-64 level, detected), cuda (this host's GPU) or cuda:sm_90, a TVM "
        'target as JSON {"kind": "llvm", ...}, or several kinds: cpu,cuda:sm_90',
    )
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes, e.g. 1,4,8 (default: the model's)")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="fix an input's shape (batch axis first); repeat for several inputs",
    )
    parser.add_argument(
        "--tune-trials", type=int, default=0, help="MetaSchedule trials per task (0: untuned; records are reused)"
    )
    parser.add_argument("--num-cores", type=int, help="cores the code is tuned for (default: all of this host's)")
    parser.add_argument("--cache-dir", help="where tuning records are kept (default: the server's cache)")
    parser.add_argument("-o", "--output", required=True, help="the archive to write, e.g. NAME.fia")


def add_inspect_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", help="a .fia file")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _sizes(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ArchiveError(f"--batch-sizes expects numbers separated by commas, got {text!r}") from None


def _shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise ArchiveError(f"--input-shape expects NAME=D0,D1,... with positive sizes, got {item!r}")
        shapes[name] = shape
    return shapes


def run_archive(args: argparse.Namespace) -> int:
    import logging

    from fastinfer.archive.pack import BuildOptions, build_archive
    from fastinfer.config import _default_cache_dir

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # our progress line suffices
    try:
        options = BuildOptions(
            name=args.name,
            version=args.version,
            labels_path=args.labels,
            top_k=args.top_k,
            preprocess=args.preprocess,
            target=args.target,
            batch_sizes=_sizes(args.batch_sizes),
            input_shapes=_shapes(args.input_shape),
            tune_trials=args.tune_trials,
            cache_dir=args.cache_dir or os.environ.get("FASTINFER_CACHE_DIR") or _default_cache_dir(),
            num_cores=args.num_cores,
        )
        manifest = build_archive(args.model, args.output, options)
    except FastInferError as error:
        print(f"fastinfer archive: error: {error.message}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    print(describe(manifest, Path(args.output)))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from fastinfer.archive.load import read_manifest

    try:
        manifest = read_manifest(args.archive)
    except FastInferError as error:
        print(f"fastinfer inspect: error: {error.message}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(manifest.to_json())
    else:
        print(describe(manifest, Path(args.archive)))
    return 0


def _size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} bytes"


def describe(manifest: Manifest, path: Path | None = None) -> str:
    """The manifest in human terms."""
    from fastinfer.archive import target as targets

    lines = [f"model      {manifest.name}, version {manifest.version}"]
    if path is not None and path.exists():
        lines[0] += f"  ({path.name}, {_size(path.stat().st_size)})"
    for title, specs in (("inputs", manifest.inputs), ("outputs", manifest.outputs)):
        for index, spec in enumerate(specs):
            shape = ", ".join(["batch", *(str(d) for d in spec.shape)])
            lines.append(f"{title if index == 0 else '':<10} {spec.name}: {spec.dtype} [{shape}]")
    if manifest.batch_sizes is None:
        batches = "any (symbolic batch axis)"
    else:
        batches = ", ".join(str(s) for s in manifest.batch_sizes)
        if "any" in manifest.libraries:
            batches += " (one library, symbolic batch axis; batches pad up to these)"
        else:
            batches += " (one library each; batches pad up to the next)"
    lines.append(f"batch      {batches}")
    pre = manifest.preprocess
    if pre:
        lines.append(
            f"preprocess image: resize shorter side to {pre['resize_shorter']}, center crop {pre['crop']}, "
            f"(x - {pre['mean']}) / {pre['std']}, {pre['layout']}"
        )
    else:
        lines.append("preprocess none (raw tensors)")
    if manifest.top_k:
        labels = f"labels from {manifest.labels_file}" if manifest.labels_file else "class indices"
        lines.append(f"postprocess top {manifest.top_k} classes, {labels}")
    lines.append(f"target     {targets.describe(manifest.target)}; TVM {manifest.tvm_version}")
    for extra in manifest.more_targets.values():
        skipped = extra.get("verified", {}).get("skipped")
        lines.append(
            f"also       {targets.describe(extra['target'])}: {', '.join(sorted(extra['libraries'].values()))}"
            + (f" ({skipped})" if skipped else "")
        )
    tuning = manifest.tuning
    if tuning is None:
        lines.append("tuned      no (default TVM schedules: slow on CPUs)")
    else:
        how = f"{tuning.tasks_tuned_now} of {tuning.tasks} tasks tuned while building"
        if tuning.tasks_tuned_now:
            how += f" ({tuning.trials_per_task} trials each)"
        lines.append(f"tuned      yes, MetaSchedule with weight prepacking; {how}; records: {tuning.records_source}")
    build = manifest.build
    verified = build.get("verified", {})
    checks = ", ".join(f"batch {c['batch']}: {c['relative_error']:.1e}" for c in verified.get("checks", []))
    lines.append(
        f"built      from {build.get('source')} (sha256 {str(build.get('source_sha256'))[:12]}...) on "
        f"{build.get('host_cpu')} in {build.get('seconds')} s, {build.get('created')}, fastinfer "
        f"{manifest.fastinfer_version}"
    )
    if build.get("input_shapes"):
        lines.append(f"           input shapes fixed: {build['input_shapes']}")
    if verified.get("skipped"):
        lines.append(f"verified   no: {verified['skipped']}")
    elif verified:
        lines.append(f"verified   against {verified.get('reference')}: relative error {checks}")
    lines.append("files")
    for name, entry in sorted(manifest.files.items()):
        lines.append(f"  {name:<40} {_size(entry.size_bytes):>10}  sha256 {entry.sha256[:16]}...")
    return "\n".join(lines)
