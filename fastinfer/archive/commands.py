"""``fastinfer archive``, ``inspect``, ``tune`` and ``records``: their flags and what they do."""

from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile
from pathlib import Path

from fastinfer.archive.manifest import ArchiveError, Manifest
from fastinfer.errors import FastInferError


def add_archive_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the ONNX file, or a program saved with torch.export.save (.pt2)")
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
    parser.add_argument(
        "--stored-records-only",
        action="store_true",
        help="a tuned build from the records that ship, the cache's or --records alone: never tunes "
        "(tasks without records keep default schedules)",
    )
    _add_target_flags(parser)
    parser.add_argument("-o", "--output", required=True, help="the archive to write, e.g. NAME.fia")


def _add_target_flags(parser: argparse.ArgumentParser, with_target: bool = False) -> None:
    if with_target:
        parser.add_argument(
            "--target",
            default="cpu",
            help='cpu (this host\'s portable x86-64 level) or a TVM target as JSON {"kind": "llvm", ...}',
        )
    parser.add_argument("--num-cores", type=int, help="cores the code is tuned for (default: all of this host's)")
    parser.add_argument(
        "--layout",
        choices=("auto", "nchw", "nhwc", "winograd"),
        default="auto",
        help="how convolutions compute in tuned CPU code: nhwc (channels innermost: tuned, it runs in about two "
        "thirds of nchw's time), winograd (nhwc, and 3x3 convolutions by Winograd's algorithm, a quarter of the "
        "multiplications), nchw (the model's own layout), or auto: per batch size the one the stored records cover "
        "best with --stored-records-only, else winograd",
    )
    parser.add_argument("--cache-dir", help="where tuning records are kept (default: the server's cache)")
    parser.add_argument(
        "--records", metavar="DIR", help="the records folder to read and write (default: the cache's for the target)"
    )


def add_tune_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the ONNX file")
    _add_target_flags(parser, with_target=True)
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes, e.g. 1,8 (default: as fastinfer archive)")
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=D0,D1,...", help="fix an input's shape, as archive"
    )
    parser.add_argument("--tune-time", metavar="TIME", help="stop searching after this long: 90s, 30m, 2h, 1h30m")
    parser.add_argument("--trials", type=int, help="trials in all (default: --trials-per-task for every task)")
    parser.add_argument("--trials-per-task", type=int, default=64, help="at most this many trials per task (64)")
    parser.add_argument("--retune", action="store_true", help="search tasks that have records too")


def add_records_flags(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for action, help_text in (
        ("export", "copy the records folder's records (the best per task) into DIR, merged with what DIR holds"),
        ("import", "merge the records in DIR (database_*.json, or .json.gz) into the records folder"),
    ):
        sub = actions.add_parser(action, help=help_text)
        sub.add_argument("dir", metavar="DIR")
        _add_target_flags(sub, with_target=True)
        if action == "import":
            sub.add_argument(
                "--by-figures",
                action="store_true",
                help="where both hold a record for a task, keep the one with the lower recorded time "
                "instead of timing the two again on this host (the default where this host runs the target)",
            )


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


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1h30m`` or plain seconds -> seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or match is None:
        raise ArchiveError(f"--tune-time expects a time such as 90s, 30m, 2h or 1h30m, got {text!r}")
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def _cache_dir(args: argparse.Namespace) -> str:
    from fastinfer.config import _default_cache_dir

    return args.cache_dir or os.environ.get("FASTINFER_CACHE_DIR") or _default_cache_dir()


def run_archive(args: argparse.Namespace) -> int:
    import logging

    from fastinfer.archive.pack import BuildOptions, build_archive

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # our progress line suffices
    try:
        if args.stored_records_only and args.tune_trials:
            raise ArchiveError("--stored-records-only never tunes: leave out --tune-trials")
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
            cache_dir=_cache_dir(args),
            num_cores=args.num_cores,
            use_stored_records=args.stored_records_only,
            records_dir=args.records or "",
            layout=args.layout,
        )
        if Path(args.model).suffix == ".pt2":  # a torch.export program: needs PyTorch, says so if missing
            from fastinfer.archive import pytorch

            manifest = pytorch.build_archive(args.model, args.output, options)
        else:
            manifest = build_archive(args.model, args.output, options)
    except FastInferError as error:
        print(f"fastinfer archive: error: {error.message}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    print(describe(manifest, Path(args.output)))
    return 0


def run_tune(args: argparse.Namespace) -> int:
    import logging

    from fastinfer.archive.pack import TuneOptions, tune_onnx

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # our progress line suffices
    try:
        options = TuneOptions(
            target=args.target,
            num_cores=args.num_cores,
            batch_sizes=_sizes(args.batch_sizes),
            input_shapes=_shapes(args.input_shape),
            trials_per_task=args.trials_per_task,
            total_trials=args.trials,
            time_budget_s=parse_duration(args.tune_time) if args.tune_time else None,
            retune=args.retune,
            cache_dir=_cache_dir(args),
            records_dir=args.records or "",
            layout=args.layout,
        )
        if options.trials_per_task < 1 or (options.total_trials is not None and options.total_trials < 1):
            raise ArchiveError("--trials and --trials-per-task must be positive")
        records, tuned = tune_onnx(args.model, options)
    except FastInferError as error:
        print(f"fastinfer tune: error: {error.message}", file=sys.stderr)
        return 1
    if not tuned:
        print(f"every task of {args.model} has a record in {records}: nothing to tune (--retune searches again)")
    return 0


def run_records(args: argparse.Namespace) -> int:
    """``fastinfer records export DIR`` / ``import DIR``: records from one machine to a fleet."""
    import tempfile

    from fastinfer.archive import pack, tuning
    from fastinfer.archive import target as targets

    try:
        target = targets.resolve(args.target, args.num_cores)
        records = pack.records_folder(_cache_dir(args), target, args.records or "")
        if args.action == "export":
            if not (records / tuning.RECORDS_FILE).exists():
                raise ArchiveError(f"no records in {records} for {targets.describe(target)}")
            tuning.recover(records)
            tuning.merge(records, Path(args.dir))
            print(f"exported {_count(records)} to {args.dir}")
            return 0
        source = Path(args.dir)
        with tempfile.TemporaryDirectory() as unpacked:
            source = _plain_database(source, Path(unpacked))
            _check_records_target(source, target)
            timed_here = not args.by_figures and targets.can_run_here(target)
            tuning.merge(source, records, time_rivals_on=sys.stdout if timed_here else None)
        print(f"imported {_count(source)} into {records}")
    except FastInferError as error:
        print(f"fastinfer records: error: {error.message}", file=sys.stderr)
        return 1
    except Exception as error:  # TVM's own, on a database it cannot read
        print(f"fastinfer records: error: {error}", file=sys.stderr)
        return 1
    return 0


def _count(records: Path) -> str:
    from fastinfer.archive import tuning

    summary = tuning.database_summary(records)
    return f"{summary['records']} records of {summary['workloads']} workloads"


def _plain_database(source: Path, scratch: Path) -> Path:
    """``source`` if it holds a plain JSON database; its gzipped one (as shipped) unpacked into
    ``scratch``; ArchiveError if neither."""
    import gzip

    from fastinfer.archive import tuning

    names = (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE)
    if all((source / name).is_file() for name in names):
        if not tuning.records_json_valid(source):
            raise ArchiveError(f"{source} holds database files that are not JSON lines")
        return source
    if all((source / f"{name}.gz").is_file() for name in names):
        for name in names:
            (scratch / name).write_bytes(gzip.decompress((source / f"{name}.gz").read_bytes()))
        return _plain_database(scratch, scratch)
    raise ArchiveError(f"{source} holds no MetaSchedule records ({' and '.join(names)}, or .gz)")


def _check_records_target(source: Path, target: dict) -> None:
    """Refuse records tuned for another CPU: their schedules would not fit this target."""
    import json

    from fastinfer.archive import tuning

    cpus = set()
    for line in (source / tuning.RECORDS_FILE).read_text().splitlines():
        if line.strip():
            cpus.add(json.loads(line)[1][2].get("mcpu"))
    wrong = sorted(str(cpu) for cpu in cpus if cpu != target.get("mcpu"))
    if wrong:
        raise ArchiveError(
            f"the records in {source} were tuned for {', '.join(wrong)}, not {target.get('mcpu')}: "
            "import them with the --target they were tuned for"
        )


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


def _tuning_lines(manifest: Manifest, path: Path | None) -> list[str]:
    """Per batch size: tasks, tasks with records, trials if known, and the estimated latency (the
    sum over tasks of the best record's mean run time), from the records the archive carries."""
    from fastinfer.archive import tuning

    batches = manifest.build.get("tuning", {}).get("batches")
    if manifest.tuning is None or not batches or path is None or not path.exists():
        return []  # archives from before per-batch tuning details, or a manifest without its archive
    try:
        with zipfile.ZipFile(path) as archive:
            workloads_json = archive.read(manifest.tuning.workloads_file).decode()
            records_json = archive.read(manifest.tuning.records_file).decode()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        return [f"           tuning records unreadable: {error}"]
    trials = f", up to {manifest.tuning.trials_per_task} trials each" if manifest.tuning.trials_per_task else ""
    lines = []
    by_image = manifest.build.get("tuning", {}).get("image_by_image", {})
    for size, workloads in batches.items():
        covered, latency_s = tuning.estimated_latency(workloads, workloads_json, records_json)
        lines.append(
            f"           batch {size}: {len(workloads)} tasks, {covered} with records{trials}, "
            f"estimated {latency_s * 1000:.3g} ms"
            + ("" if covered == len(workloads) else " (tasks without records not counted)")
        )
        if size in by_image:
            kept = by_image[size]
            lines.append(
                f"             computed image by image up to {kept['up_to']!r}: {kept['ms']:.3g} ms, "
                f"as one batch {kept['one_batch_ms']:.3g} ms (timed when built)"
            )
    return lines


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
        shown = str(manifest.build.get("layout", "")).replace("nhwc", "NHWC").replace("nchw", "NCHW")
        shown = shown.replace("winograd", "NHWC with Winograd 3x3")
        layout = f", convolutions in {shown}" if shown else ""
        lines.append(
            f"tuned      yes, MetaSchedule with weight prepacking{layout}; {how}; records: {tuning.records_source}"
        )
        lines.extend(_tuning_lines(manifest, path))
    build = manifest.build
    origin = f" ({manifest.source_format}, PyTorch {manifest.torch_version})" if manifest.torch_version else ""
    verified = build.get("verified", {})
    checks = ", ".join(f"batch {c['batch']}: {c['relative_error']:.1e}" for c in verified.get("checks", []))
    lines.append(
        f"built      from {build.get('source')}{origin} (sha256 {str(build.get('source_sha256'))[:12]}...) on "
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
