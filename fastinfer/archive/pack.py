"""Build a model archive: ONNX -> Relax -> compiled libraries, verified, packed with their manifest.

The archive is written to a temporary file beside the destination and renamed into place only once
it is complete and its outputs agree with a reference run of the ONNX graph, so an interrupted or
failed build leaves neither a partial archive nor a staging folder behind.

Batch sizes: untuned, one library takes any batch (the batch axis stays symbolic). Tuning needs
static shapes, so a tuned archive holds one library per batch size. TVM compiles the graph that
:func:`fastinfer.archive.graph.for_tvm` makes of the model (input names fit for generated code, a
batch-1 export opened to any batch); the reference runs the model as exported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import fastinfer
from fastinfer.archive import image_by_image, shipped, tuning
from fastinfer.archive import target as targets
from fastinfer.archive.graph import BATCH, for_tvm, graph_inputs, with_batch
from fastinfer.archive.manifest import MANIFEST_NAME, ArchiveError, FileEntry, Manifest, Tuning
from fastinfer.preprocess import ImagePreprocess
from fastinfer.signature import TensorSpec

# ImageNet mean and std of torchvision models, on 0-255 pixels.
IMAGENET = ImagePreprocess(
    resize_shorter=256, crop=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), layout="NCHW"
)
TOLERANCE = 1e-3  # largest error allowed, relative to the largest reference output


@dataclass
class BuildOptions:
    """What ``fastinfer archive`` was asked for."""

    name: str
    version: str = "1"
    labels_path: str | None = None
    top_k: int | None = None  # None: 5 with labels, else 0
    preprocess: str = "none"  # none, imagenet, or a JSON file of ImagePreprocess fields
    target: str = "cpu"
    batch_sizes: tuple[int, ...] | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tune_trials: int = 0  # trials per task; 0: untuned unless stored records cover the model
    cache_dir: str = ""
    num_cores: int | None = None
    use_stored_records: bool = False  # a tuned build from cached or shipped records alone: never searches
    records_dir: str = ""  # the records folder to use ("": the cache's for the target, seeded from shipped)
    # Convolutions' activation layout in tuned CPU builds (see tuning.pre_tuning); "auto": per batch
    # size, the layout the stored records cover best (NHWC on a tie: it measured faster), NHWC when
    # tuning searches, the model's own (NCHW) untuned.
    layout: str = "auto"
    stream: TextIO | None = None


def build_archive(onnx_path: str | Path, output: str | Path, options: BuildOptions) -> Manifest:
    """Compile ``onnx_path`` as ``options`` say and write the archive to ``output``."""
    stream = options.stream or sys.stderr
    output = Path(output)
    started = time.monotonic()
    try:
        source = Path(onnx_path).read_bytes()
    except OSError as error:
        raise ArchiveError(f"cannot read {onnx_path}: {error.strerror}") from error
    model = _load_onnx(source, str(onnx_path))
    target, *more_targets = targets.resolve_all(options.target, options.num_cores)  # cpu,cuda: one archive
    _check_operators(model)
    shapes = _apply_input_shapes(model, options.input_shapes)
    batch = _batch_axis(model)
    tuned = target["kind"] == "llvm" and (options.tune_trials > 0 or options.use_stored_records)
    if options.layout not in ("auto", "nchw") and not tuned:  # the layout is part of the tuning pipeline only
        raise ArchiveError("--layout applies to tuned CPU builds: add --tune-trials or --stored-records-only")
    sizes, served = _plan_batch_sizes(batch, options.batch_sizes, tuned)
    graph = for_tvm(model, served, target)  # what TVM compiles; refused here if it fixes batch 1 for good
    preprocess = image_preprocess(options.preprocess, _input_specs(model)[0])  # fails before minutes of compiling
    labels = read_labels(options.labels_path) if options.labels_path else None

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        batches = ", ".join(str(size or "any") for size in sizes)
        print(f"compiling for {targets.describe(target)}, batch {batches}", file=stream, flush=True)
        libraries, tuning_info, tuning_detail, layouts = _compile(
            model, graph, target, sizes, tuned, options, staging, stream
        )
        verification = _verify(model, staging, libraries, target, stream)
        more = {}
        for extra in more_targets:  # further targets: untuned, one library with a symbolic batch axis
            extra_libraries = _compile_more(model, for_tvm(model, served, extra), extra, options, staging, stream)
            more[extra["kind"]] = {
                "target": extra,
                "libraries": {("any" if s is None else str(s)): path for s, path in extra_libraries.items()},
                "verified": _verify(model, staging, extra_libraries, extra, stream),
            }
        extra = _write_postprocess(labels, options.top_k, staging)
        inputs = _input_specs(model)
        outputs = _output_specs(staging, libraries, target, inputs, model)
        manifest = Manifest(
            name=options.name,
            version=options.version,
            inputs=inputs,
            outputs=outputs,
            batch_sizes=served,
            libraries={("any" if s is None else str(s)): path for s, path in libraries.items()},
            target=target,
            tvm_version=_tvm_version(),
            fastinfer_version=fastinfer.__version__,
            preprocess=preprocess.to_dict() if preprocess else None,
            top_k=extra["top_k"],
            labels_file=extra["labels_file"],
            tuning=tuning_info,
            build={
                "source": Path(onnx_path).name,
                "source_sha256": hashlib.sha256(source).hexdigest(),
                "input_shapes": {k: list(v) for k, v in shapes.items()},
                "host_cpu": targets.host_cpu(),
                "seconds": round(time.monotonic() - started, 1),
                "verified": verification,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **({"tuning": tuning_detail} if tuning_detail else {}),
                **({"layout": _layout_summary(layouts)} if set(layouts.values()) - {"nchw"} else {}),
            },
            more_targets=more,
        )
        _write_zip(manifest, staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Manifest.from_json(_read_manifest_text(output))


@dataclass
class TuneOptions:
    """What ``fastinfer tune`` was asked for."""

    target: str = "cpu"
    num_cores: int | None = None
    batch_sizes: tuple[int, ...] | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    trials_per_task: int = 64
    total_trials: int | None = None  # None: trials_per_task for every task
    time_budget_s: float | None = None
    retune: bool = False
    cache_dir: str = ""
    records_dir: str = ""  # "": the cache's records folder for the target, as ``fastinfer archive`` uses
    layout: str = "auto"  # as BuildOptions.layout ("auto": NHWC, which tuned faster): records are per layout
    stream: TextIO | None = None


def tune_onnx(onnx_path: str | Path, options: TuneOptions) -> tuple[Path, int]:
    """Tune ``onnx_path`` at each batch size into its records folder, as ``fastinfer archive`` would
    compile it; returns the folder and the number of tasks searched (0: its records covered it)."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    stream = options.stream or sys.stderr
    try:
        source = Path(onnx_path).read_bytes()
    except OSError as error:
        raise ArchiveError(f"cannot read {onnx_path}: {error.strerror}") from error
    model = _load_onnx(source, str(onnx_path))
    target = targets.resolve(options.target, options.num_cores)
    if target["kind"] != "llvm":
        raise ArchiveError("fastinfer tune tunes CPU (llvm) targets; CUDA archives use default GPU schedules")
    _check_operators(model)
    _apply_input_shapes(model, options.input_shapes)
    sizes, served = _plan_batch_sizes(_batch_axis(model), options.batch_sizes, tuned=True)
    graph = for_tvm(model, served, target)
    records = records_folder(options.cache_dir, target, options.records_dir)
    tuning.recover(records, stream)
    if not options.records_dir:
        shipped.seed_cache(records, target)  # what ships is not searched again
    tvm_target = tvm.target.Target(target)
    mods = []
    for size in sizes:
        try:
            mod = from_onnx(with_batch(graph, size or BATCH), keep_params_in_input=False)
        except Exception as error:
            raise ArchiveError(f"TVM could not convert the model at batch {size}: {error}") from error
        if options.layout == "auto":
            mods.append(tuning.pre_tuning_auto(mod, tvm_target, stream)[0])
        else:
            mods.append(tuning.pre_tuning(mod, tvm_target, options.layout))
    label = f"{Path(onnx_path).stem} (batch {', '.join(str(s) for s in sizes)})"
    try:
        tuned = tuning.tune(
            mods,
            tvm_target,
            records,
            options.trials_per_task,
            label=label,
            stream=stream,
            total_trials=options.total_trials,
            retune=options.retune,
            time_budget_s=options.time_budget_s,
            batch_sizes=[size for size in sizes if size is not None],  # tuned: every size is a number
        )
    except Exception as error:  # what was measured is in the records already
        raise ArchiveError(f"tuning failed: {error}; the records measured so far are kept in {records}") from error
    return records, tuned


def _read_manifest_text(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(MANIFEST_NAME)


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _load_onnx(data: bytes, label: str) -> Any:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as error:  # protobuf raises its own DecodeError, or RuntimeWarning-ish errors
        raise ArchiveError(f"{label} is not an ONNX model: {error}") from error
    if not model.graph.node:
        raise ArchiveError(f"{label} is not an ONNX model: it holds no graph")
    return model


def _check_operators(model: Any) -> None:
    """Name every operator the TVM ONNX frontend cannot convert, before conversion fails on one."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    missing: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            label = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            missing[label] = missing.get(label, 0) + 1
    if missing:
        listed = ", ".join(f"{op} ({count} node{'s' if count > 1 else ''})" for op, count in sorted(missing.items()))
        raise ArchiveError(f"TVM's ONNX frontend cannot convert these operators: {listed}")


def _apply_input_shapes(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    inputs = {value.name: value for value in graph_inputs(model)}
    for name, dims in shapes.items():
        if name not in inputs:
            raise ArchiveError(f"--input-shape names {name!r}; the model's inputs are {', '.join(inputs)}")
        shape = inputs[name].type.tensor_type.shape
        del shape.dim[:]
        for size in dims:
            shape.dim.add().dim_value = size
    return shapes


def _batch_axis(model: Any) -> int | None:
    """The model's fixed batch size, or None if the batch axis is symbolic; other axes must be fixed."""
    sizes = set()
    for value in graph_inputs(model):
        dims = list(value.type.tensor_type.shape.dim)
        if not dims:
            raise ArchiveError(f"input {value.name!r} is a scalar; fastinfer batches along a leading axis")
        for axis, dim in enumerate(dims[1:], start=1):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                example = ",".join(["1"] + [str(d.dim_value) if d.dim_value > 0 else "?" for d in dims[1:]])
                raise ArchiveError(
                    f"input {value.name!r} has a dynamic dimension at axis {axis}"
                    f"{' (' + dim.dim_param + ')' if dim.dim_param else ''}; only the batch axis may be dynamic: "
                    f"fix it with --input-shape {value.name}={example}"
                )
        first = dims[0]
        sizes.add(first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else None)
    if len(sizes) != 1:
        raise ArchiveError("the model's inputs disagree on their batch axis; fix them with --input-shape")
    return sizes.pop()


def _plan_batch_sizes(
    batch: int | None, wanted: tuple[int, ...] | None, tuned: bool
) -> tuple[list[int | None], tuple[int, ...] | None]:
    """Batch sizes to compile (None: one library with a symbolic batch axis), and sizes to serve."""
    if wanted:
        if any(size < 1 for size in wanted):
            raise ArchiveError("--batch-sizes must be positive")
        wanted = tuple(sorted(set(wanted)))
        return (list(wanted) if tuned else [None]), wanted
    if batch is not None:
        return [batch], (batch,)
    if tuned:
        return [1, 8], (1, 8)
    return [None], None


def _compile(
    model: Any,
    graph: Any,
    target: dict,
    sizes: list[int | None],
    tuned: bool,
    options: BuildOptions,
    staging: Path,
    stream: TextIO,
) -> tuple[dict[int | None, str], Tuning | None, dict, dict[int | None, str]]:
    """Compile ``graph`` (``model`` made ready for TVM) once per entry of ``sizes``; returns archive
    paths, the tuning summary, which workloads each batch size runs (for ``inspect``), and the
    convolutions' layout of each."""
    from tvm.relax.frontend.onnx import from_onnx

    libraries: dict[int | None, str] = {}
    (staging / "lib").mkdir()
    records = records_folder(options.cache_dir, target, options.records_dir)
    seeded = ""
    if tuned:
        tuning.recover(records, stream)  # records a killed tuning run left behind
        seeded = "" if options.records_dir else shipped.seed_cache(records, target)
    mods = {}
    for size in sizes:
        label = f"{options.name} batch {size or 'N'}"
        try:
            mods[size] = from_onnx(with_batch(graph, BATCH if size is None else size), keep_params_in_input=False)
        except Exception as error:
            raise ArchiveError(f"TVM could not convert {label}: {error}{_batch_hint(model, size)}") from error
    tasks_total = tuned_now = 0
    layouts: dict[int | None, str] = dict.fromkeys(mods, "nchw")
    by_image: dict[int, image_by_image.Kept] = {}  # batch sizes computed image by image
    if tuned:
        mods, tasks_total, tuned_now, layouts = _tune(mods, target, records, options, stream)
    for size, mod in mods.items():
        path = "lib/model.so" if size is None else f"lib/model-b{size}.so"
        if tuned:
            _tuned_build(mod, target, records, f"{options.name} batch {size}", staging / path, stream)
            if size is not None and size > 1:
                kept = _image_by_image(model, graph, size, layouts[size], target, records, staging / path, stream)
                if kept is not None:
                    by_image[size] = kept
        else:
            _plain_build(mod, target, staging / path, f"{options.name} batch {size or 'N'}", stream)
        libraries[size] = path
    if not tuned:
        return libraries, None, {}, layouts
    (staging / "tuning").mkdir()
    images = [kept.module for kept in by_image.values()]  # their batch-1 kernels' records too
    detail = _export_records(records, staging / "tuning", mods, target, images)
    if by_image:
        detail["image_by_image"] = {str(size): kept.summary() for size, kept in by_image.items()}
    stored = f"shipped:{seeded}" if seeded else ("records folder" if options.records_dir else "cache")
    source = ",".join(filter(None, ["tuned" if tuned_now else "", stored]))
    return (
        libraries,
        Tuning(
            trials_per_task=options.tune_trials if tuned_now else 0,
            tasks=tasks_total,
            tasks_tuned_now=tuned_now,
            workloads_file=f"tuning/{tuning.WORKLOADS_FILE}",
            records_file=f"tuning/{tuning.RECORDS_FILE}",
            records_source=source,
        ),
        detail,
        layouts,
    )


def _image_by_image(
    model: Any, graph: Any, size: int, layout: str, target: dict, records: Path, path: Path, stream: TextIO
) -> image_by_image.Kept | None:
    """The library at ``path`` computed image by image through the early layers instead, where that
    runs faster (see :mod:`.image_by_image`)."""
    label = f"batch {size}, image by image"

    def build(prepared: Any, out: Path) -> None:
        _tuned_build(prepared, target, records, label, out, stream, quiet=True)

    return image_by_image.choose(graph, size, layout, target, path, build, _sample(_input_specs(model), size), stream)


def _layout_summary(layouts: dict[int | None, str]) -> str:
    """``nhwc``, or per batch size when they differ: ``batch 1 nhwc, batch 8 nchw``."""
    if len(set(layouts.values())) == 1:
        return next(iter(layouts.values()))
    return ", ".join(f"batch {size or 'N'} {layout}" for size, layout in layouts.items())


def _compile_more(
    model: Any, graph: Any, target: dict, options: BuildOptions, staging: Path, stream: TextIO
) -> dict[int | None, str]:
    """One library of ``graph`` with a symbolic batch axis for a further target, under ``lib/<kind>/``."""
    from tvm.relax.frontend.onnx import from_onnx

    label = f"{options.name} for {target['kind']}"
    try:
        mod = from_onnx(with_batch(graph, BATCH), keep_params_in_input=False)
    except Exception as error:
        raise ArchiveError(f"TVM could not convert {label}: {error}{_batch_hint(model, None)}") from error
    path = f"lib/{target['kind']}/model.so"
    (staging / path).parent.mkdir(parents=True, exist_ok=True)
    _plain_build(mod, target, staging / path, label, stream)
    return {None: path}


def _batch_hint(model: Any, size: int | None) -> str:
    batch = _batch_axis(model)
    if batch is not None and size != batch:
        where = "beyond the Reshapes that fastinfer opens" if batch == 1 else "e.g. in a Reshape"
        return (
            f" (the graph was exported for batch {batch} and may hard-code it, {where}: "
            f"build it without --batch-sizes, or re-export it with a dynamic batch axis)"
        )
    return ""


def _plain_build(mod: Any, target: dict, path: Path, label: str, stream: TextIO) -> None:
    import tvm
    from tvm import relax

    try:
        if target["kind"] == "cuda":
            from tvm.s_tir import dlight

            with tvm.target.Target(target):
                mod = tvm.ir.transform.Sequential(
                    [
                        relax.get_pipeline("zero"),
                        dlight.ApplyDefaultSchedule(
                            dlight.gpu.Matmul(),
                            dlight.gpu.GEMV(),
                            dlight.gpu.Reduction(),
                            dlight.gpu.GeneralReduction(),
                            dlight.gpu.Fallback(),
                        ),
                    ]
                )(mod)
        executable = relax.build(mod, target=tvm.target.Target(target))
        executable.export_library(str(path))
    except Exception as error:
        raise ArchiveError(f"TVM could not compile {label}: {error}") from error
    if target["kind"] == "cuda" and not targets.can_run_here(target):  # else verification compiles them
        _check_kernels(executable, target, label, stream)


def _check_kernels(executable: Any, target: dict, label: str, stream: TextIO) -> None:
    """Compile the CUDA kernels of a compile-only build to PTX, with nvcc or NVRTC where installed.

    A CUDA library holds its kernels as CUDA source, compiled (NVRTC) when a GPU worker loads it;
    source that the compiler refuses would otherwise pass the build and fail on the GPU machine.
    """
    import tvm
    from tvm.support import nvcc

    arch = str(tvm.target.Target(target).attrs["arch"])
    compiler = cuda_compiler()
    if compiler is None:
        print(f"{label}: no nvcc or NVRTC here; its CUDA kernels are first compiled on the GPU", file=stream)
        return
    try:
        with tvm.target.Target(target):  # nvcc reads the current target
            for module in _modules(executable.mod):
                if module.kind == "cuda":
                    nvcc.compile_cuda(module.inspect_source(), target_format="ptx", arch=arch, compiler=compiler)
    except Exception as error:
        raise ArchiveError(
            f"the CUDA kernels of {label} do not compile ({compiler}, {arch}): {_compiler_errors(str(error))}"
        ) from error
    print(f"{label}: CUDA kernels compile ({compiler}, {arch})", file=stream)


def _compiler_errors(text: str) -> str:
    """The first errors of a CUDA compiler's message (nvcc's starts with the whole source), each with
    the line of source it points at."""
    lines = text.splitlines()
    found: list[str] = []
    for index, line in enumerate(lines):
        if ": error" in line and len(found) < 3:
            source = lines[index + 1].strip() if index + 1 < len(lines) else ""
            found.append(re.sub(r"^.*/", "", line.strip()) + (f" in: {source[:200]}" if source else ""))
    return " | ".join(found) or text.strip()[-500:]


def cuda_compiler() -> str | None:
    """nvcc when on the PATH, else NVRTC when ``cuda-bindings`` is installed, else None."""
    if shutil.which("nvcc"):
        return "nvcc"
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        return None
    return "nvrtc"


def _modules(module: Any) -> Iterator[Any]:
    yield module
    for imported in module.imports:
        yield from _modules(imported)


def _records_key(target: dict) -> str:
    # Records replay on any core count, but the best schedule for one thread (a worker of
    # ``--devices cpu:N``) is not the best for several: one-core records are kept apart. Other
    # core counts share one folder (their key is what it was before one-core folders existed).
    key = {k: v for k, v in target.items() if k != "num-cores"}
    if shipped.one_core(target):
        key["num-cores"] = 1
    return hashlib.sha256(json.dumps([key, _tvm_version()], sort_keys=True).encode()).hexdigest()[:16]


def _records_dir(cache_dir: str, target: dict) -> Path:
    base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "fastinfer-tuning"
    cores = "-1-core" if shipped.one_core(target) else ""
    return base / "tuning" / f"{target.get('mcpu', target['kind'])}{cores}-{_records_key(target)}"


def records_folder(cache_dir: str, target: dict, records_dir: str = "") -> Path:
    """Where the records for ``target`` are read and written: ``records_dir`` when given, else the
    cache's folder for the target (the one ``fastinfer archive`` and ``fastinfer tune`` share)."""
    return Path(records_dir) if records_dir else _records_dir(cache_dir, target)


def _tune(
    mods: dict, target: dict, records: Path, options: BuildOptions, stream: TextIO
) -> tuple[dict, int, int, dict]:
    """Prepare every batch size's module for tuning, in its layout; tune what the records miss, in
    one run. Returns the prepared modules, tasks in all, tasks searched now, and the layouts."""
    import tvm

    tvm_target = tvm.target.Target(target)
    try:
        if options.layout == "auto" and options.use_stored_records:
            database = tuning.load_database(records)
            chosen = {size: tuning.pre_tuning_covered(mod, tvm_target, database, stream) for size, mod in mods.items()}
        elif options.layout == "auto":  # a search tunes NHWC where the graph converts
            chosen = {size: tuning.pre_tuning_auto(mod, tvm_target, stream) for size, mod in mods.items()}
        else:
            forced = options.layout
            chosen = {size: (tuning.pre_tuning(mod, tvm_target, forced), forced) for size, mod in mods.items()}
        prepared = {size: mod for size, (mod, _) in chosen.items()}
        layouts = {size: layout for size, (_, layout) in chosen.items()}
        tasks = sum(len(tuning.all_tasks(mod, tvm_target)) for mod in prepared.values())
        tuned = 0
        if options.use_stored_records:  # never searches: tasks without records keep default schedules
            database = tuning.load_database(records)
            missing = sum(len(tuning.untuned_tasks(mod, tvm_target, database)) for mod in prepared.values())
            print(f"{options.name}: stored records cover {tasks - missing} of {tasks} tasks", file=stream)
        elif options.tune_trials > 0:
            sizes = ", ".join(str(s) for s in prepared)
            label = f"{options.name} (batch {sizes})"
            tuned = tuning.tune(
                list(prepared.values()), tvm_target, records, options.tune_trials, label=label, stream=stream
            )
    except ArchiveError:
        raise
    except Exception as error:
        raise ArchiveError(f"tuning {options.name} failed: {error}") from error
    return prepared, tasks, tuned, layouts


def _tuned_build(
    mod: Any, target: dict, records: Path, label: str, path: Path, stream: TextIO, quiet: bool = False
) -> None:
    """Build ``mod`` (prepared for tuning) with the best schedules the records hold; ``quiet``: without
    saying how many tasks have none."""
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    try:
        database = tuning.load_database(records)
        missing = len(tuning.untuned_tasks(mod, tvm_target, database))
        if missing and not quiet:
            print(f"{label}: {missing} tasks have no tuning record; they run with default schedules", file=stream)
        mod = tuning.apply_records(mod, tvm_target, database)
        relax.build(mod, target=tvm_target).export_library(str(path))
    except Exception as error:
        raise ArchiveError(f"TVM could not compile {label}: {error}") from error


def _export_records(records: Path, dest: Path, mods: dict, target: dict, more: list | None = None) -> dict:
    """Write the best record of each task of ``mods`` (prepared for tuning, by batch size) and of
    ``more`` to ``dest``; returns, per batch size of ``mods``, its tasks' workloads and how often each
    runs, so that ``inspect`` can tell from the archive's records how tuned each library is."""
    import tvm

    tvm_target = tvm.target.Target(target)
    tuning.export_subset([*mods.values(), *(more or [])], tvm_target, tuning.load_database(records), dest)
    return {"batches": {str(size): tuning.task_workloads(mod, tvm_target) for size, mod in mods.items()}}


def _input_specs(model: Any) -> tuple[TensorSpec, ...]:
    from onnx import helper

    specs = []
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(value.name, dtype, tuple(d.dim_value for d in list(tensor_type.shape.dim)[1:])))
    return tuple(specs)


def _sample(specs: tuple[TensorSpec, ...], batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = []
    for spec in specs:
        shape = (batch, *spec.shape)
        if np.dtype(spec.dtype).kind == "f":
            arrays.append(rng.random(shape, dtype=np.float32).astype(spec.dtype))
        else:
            arrays.append(np.zeros(shape, spec.dtype))
    return arrays


def _reference(model: Any, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], str]:
    """The model's outputs for the batch in ``feeds``, and what computed them.

    A model exported for batch 1 runs as exported, one sample at a time: what it computes for each
    sample is what the graph TVM compiles, opened to any batch, must compute for the batch.
    """
    rows = len(next(iter(feeds.values())))
    if _batch_axis(model) != 1:
        run, name = _reference_runner(with_batch(model, rows))
        return run(feeds), name
    run, name = _reference_runner(model)
    samples = [run({key: value[row : row + 1] for key, value in feeds.items()}) for row in range(rows)]
    return [np.concatenate(outputs) for outputs in zip(*samples, strict=True)], name


def _reference_runner(model: Any) -> tuple[Callable[[dict[str, np.ndarray]], list[np.ndarray]], str]:
    """A function running ``model`` with ONNX Runtime.

    Not ``onnx.reference`` as a fallback: it computes opset-9 Softmax over 4-D tensors wrongly
    (every class 1.0 for the onnx package's light SqueezeNet), so it would refuse correct archives.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ArchiveError(
            "archiving verifies the compiled model against ONNX Runtime, which is not installed: "
            "pip install onnxruntime (a dependency of fastinfer)"
        ) from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # its failures reach us as exceptions; its warnings are noise here
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return (lambda feeds: list(session.run(None, feeds))), f"onnxruntime {ort.__version__}"


def _run_library(path: Path, target: dict, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    device = tvm.cuda(0) if target["kind"] == "cuda" else tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), device)
    result = vm["main"](*(tvm.runtime.tensor(x, device) for x in inputs))
    results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
    return [r.numpy() for r in results]


def _verify(model: Any, staging: Path, libraries: dict[int | None, str], target: dict, stream: TextIO) -> dict:
    """Run each library on a sample batch and compare with the reference; refuse a disagreement."""
    if not targets.can_run_here(target):  # compile-only: recorded, and `inspect` says so
        reason = f"not verified on-device: this host has no device for {targets.describe(target)}"
        print(f"{reason}; serve it only after checking it on one", file=stream)
        return {"skipped": reason, "checks": []}
    inputs = _input_specs(model)
    report: dict = {"tolerance": TOLERANCE, "checks": []}
    print(f"verifying against ONNX Runtime ({targets.describe(target)})", file=stream, flush=True)
    for size, path in libraries.items():
        batches = [size] if size is not None else [1, 3]
        for batch in batches:
            sample = _sample(inputs, batch)
            try:
                expected, reference = _reference(model, {s.name: x for s, x in zip(inputs, sample, strict=True)})
            except Exception as error:
                hint = _batch_hint(model, batch)
                raise ArchiveError(
                    f"the reference could not run the model at batch {batch}: {str(error).strip()}{hint}"
                ) from error
            try:
                got = _run_library(staging / path, target, sample)
            except Exception as error:
                raise ArchiveError(f"the compiled model failed at batch {batch}: {error}") from error
            worst = 0.0
            for index, (a, b) in enumerate(zip(got, expected, strict=True)):
                if a.shape != b.shape:
                    raise ArchiveError(
                        f"output {index} at batch {batch} has shape {a.shape}; the reference gives {b.shape}"
                        + _batch_hint(model, batch)
                    )
                worst = max(worst, float(relative_errors(a, b).max(initial=0.0)))
            if worst > TOLERANCE:
                raise ArchiveError(
                    f"the compiled model disagrees with {reference} at batch {batch}: largest error "
                    f"{worst:.2e} of the output's scale (allowed {TOLERANCE:.0e}); no archive written"
                    + _batch_hint(model, batch)
                )
            report["reference"] = reference
            report["checks"].append({"batch": batch, "relative_error": worst})
            print(f"verified batch {batch} against {reference}: relative error {worst:.1e}", file=stream)
    return report


def relative_errors(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """``|got - expected|`` over the reference's largest finite magnitude, element by element; inf
    where the two differ and either is NaN or infinite. (A plain difference is NaN there, and max()
    and ``>`` pass over a NaN: a compiled model that computed NaN was verified with error 0.)"""
    a, b = got.astype(np.float64), expected.astype(np.float64)
    finite = np.abs(b[np.isfinite(b)])
    scale = max(float(finite.max()) if finite.size else 0.0, 1e-6)
    agree = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities, and NaN where the reference has NaN
    with np.errstate(invalid="ignore"):  # inf - inf
        errors = np.where(agree, 0.0, np.abs(a - b) / scale)
    return np.where(np.isnan(errors), np.inf, errors)


def _output_specs(
    staging: Path, libraries: dict[int | None, str], target: dict, inputs: tuple[TensorSpec, ...], model: Any
) -> tuple[TensorSpec, ...]:
    size, path = next(iter(libraries.items()))
    if not targets.can_run_here(target):  # compile-only: the reference gives the outputs' specs
        outputs, _ = _reference(model, {s.name: x for s, x in zip(inputs, _sample(inputs, size or 1), strict=True)})
    else:
        outputs = _run_library(staging / path, target, _sample(inputs, size or 1))
    names = [value.name for value in model.graph.output]
    return tuple(TensorSpec(n, o.dtype.name, tuple(o.shape[1:])) for n, o in zip(names, outputs, strict=True))


def image_preprocess(spec: str, first: TensorSpec) -> ImagePreprocess | None:
    """``--preprocess`` (imagenet, none, or a JSON file) checked against the model's first input."""
    if spec in ("", "none"):
        return None
    if spec == "imagenet":
        pre = IMAGENET
    else:
        try:
            data = json.loads(Path(spec).read_text())
            pre = ImagePreprocess(
                resize_shorter=int(data["resize_shorter"]),
                crop=int(data["crop"]),
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                layout=str(data.get("layout", "NCHW")),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArchiveError(f"--preprocess {spec}: expected imagenet, none or a JSON file: {error}") from error
    if first.shape != pre.sample_shape() or np.dtype(first.dtype) != np.float32:
        raise ArchiveError(
            f"--preprocess makes float32 samples of shape {pre.sample_shape()}, but input {first.name!r} "
            f"takes {first.dtype} {first.shape}"
        )
    return pre


def _write_postprocess(labels: list[str] | None, top_k: int | None, staging: Path) -> dict:
    labels_file = None
    if labels:
        (staging / "labels.txt").write_text("\n".join(labels) + "\n", "utf-8")
        labels_file = "labels.txt"
    return {"top_k": top_k if top_k is not None else (5 if labels_file else 0), "labels_file": labels_file}


def read_labels(path: str) -> list[str]:
    """Class names by index: a text file (one a line), a JSON list, or a JSON dict index -> name."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as error:
        raise ArchiveError(f"cannot read labels {path}: {error.strerror}") from error
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ArchiveError(f"labels {path} is not valid JSON: {error}") from error
        if isinstance(data, dict):
            return [str(data[str(i)]) for i in range(len(data))]
        return [str(item) for item in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_zip(manifest: Manifest, staging: Path, output: Path) -> None:
    """Hash every staged file, write the zip beside ``output``, and rename it into place."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        name = path.relative_to(staging).as_posix()
        files[name] = FileEntry(_sha256(path), path.stat().st_size)
    manifest = Manifest(**{**manifest.__dict__, "files": files})
    fd, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as archive:
            archive.writestr(MANIFEST_NAME, manifest.to_json(), zipfile.ZIP_DEFLATED)
            for name in files:
                compression = zipfile.ZIP_STORED if name.endswith(".so") else zipfile.ZIP_DEFLATED
                archive.write(staging / name, name, compression)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; an archive is not
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
