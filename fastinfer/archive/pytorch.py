"""Build a model archive from PyTorch: a ``torch.export`` program -> Relax -> compiled libraries, verified.

Two ways in: ``fastinfer archive MODEL.pt2`` takes a program saved with ``torch.export.save``, and
:func:`from_torch` exports an ``nn.Module`` itself (with a dynamic batch axis). Both go through the
saved bytes, so what Python archives is what the same program saved to a file would give.

The program is decomposed to core ATen operators once; every operator TVM's converter
(``tvm.relax.frontend.torch.from_exported_program``) lacks is named, with the nodes and source lines
it comes from, before conversion fails on the first. Weights become constants of the module.

Batch. The batch axis is symbolic when every input's leading dimension is the same torch symbol
(``dynamic_shapes={"x": {0: Dim("batch")}}``): untuned, one library serves any batch; tuned (which
needs static shapes), the symbol is bound to each batch size in Relax. A program exported with a
fixed leading dimension serves that batch only: unlike an ONNX graph, it has no Reshape to open, and
its code may depend on the size anywhere. ``--input-shape`` binds other symbolic dimensions.

Verification, as for ONNX: each library runs on sample inputs at every batch size it serves and is
compared with the exported program run by PyTorch; a disagreement refuses the archive, naming the
largest error, its output and element. PyTorch is needed to build, never to serve.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import fastinfer
from fastinfer.archive import pack, shipped, tuning
from fastinfer.archive import target as targets
from fastinfer.archive.manifest import ArchiveError, Manifest, Tuning
from fastinfer.archive.pack import BuildOptions
from fastinfer.signature import TensorSpec

SOURCE_FORMAT = "torch.export"
EXTRA = "pip install 'fastinfer[torch]'"


@dataclass(frozen=True)
class _Input:
    """One input of the program: its name, numpy dtype and shape; a dimension is an int or a torch
    symbol's name (``s0``)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


def build_archive(pt2_path: str | Path, output: str | Path, options: BuildOptions) -> Manifest:
    """Compile the ``torch.export`` program saved in ``pt2_path`` and write the archive to ``output``."""
    torch = _torch()
    try:
        data = Path(pt2_path).read_bytes()
    except OSError as error:
        raise ArchiveError(f"cannot read {pt2_path}: {error.strerror}") from error
    program = _load_program(torch, data, str(pt2_path))
    return _build(torch, program, data, Path(pt2_path).name, Path(output), options)


def from_torch(module: Any, example_inputs: Any, path: str | Path, *, name: str, **options: Any) -> Manifest:
    """Export ``module`` with a dynamic batch axis, compile it, check it against PyTorch, and write
    the archive to ``path``; ``options`` are :class:`BuildOptions` fields (``batch_sizes``,
    ``target``, ``preprocess``, ``labels_path``, ``tune_trials``, ...).

    ``example_inputs`` is a tensor or a tuple of tensors, batch axis first; one sample is enough.
    """
    torch = _torch()
    if "cache_dir" not in options:  # where `fastinfer archive` keeps tuning records
        from fastinfer.config import _default_cache_dir

        options["cache_dir"] = os.environ.get("FASTINFER_CACHE_DIR") or _default_cache_dir()
    build_options = BuildOptions(name=name, **options)
    program = export(module, example_inputs)
    saved = io.BytesIO()
    with _quiet():
        torch.export.save(program, saved)
    data = saved.getvalue()
    program = _load_program(torch, data, f"the export of {type(module).__name__}")
    return _build(torch, program, data, f"{type(module).__name__}.pt2", Path(path), build_options)


def export(module: Any, example_inputs: Any) -> Any:
    """``module`` exported by ``torch.export`` in eval mode, every input's leading axis one dynamic batch.

    Examples of batch 1 are repeated to batch 2: torch.export takes a size of 1 for a constant.
    """
    torch = _torch()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        raise ArchiveError("example inputs must be tensors with a batch axis first")
    inputs = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in inputs)
    batch = torch.export.Dim("batch")
    training = module.training
    module.eval()  # batch norm on running statistics, no dropout: the model as served
    try:
        return torch.export.export(module, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
    except Exception as error:
        raise ArchiveError(
            f"torch.export could not export {type(module).__name__} with a dynamic batch axis: {_first_lines(error)}"
        ) from error
    finally:
        module.train(training)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ArchiveError(f"building from a PyTorch program needs PyTorch: {EXTRA}") from None
    return torch


def _quiet() -> warnings.catch_warnings:
    """PyTorch 2.13 warns of its own deprecated internals (``LeafSpec``) as it saves, loads and
    decomposes a program: nothing the user can act on."""
    return warnings.catch_warnings(action="ignore", category=FutureWarning)


def _first_lines(error: BaseException, count: int = 3) -> str:
    """The start of an error's message: torch's run to pages of context."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:count]) + (" ..." if len(lines) > count else "")


def _load_program(torch: Any, data: bytes, label: str) -> Any:
    """The ExportedProgram saved in ``data``; a clear ArchiveError for anything else.

    The zip is looked at first: ``torch.export.load`` answers a state dict or a TorchScript file with
    a generic deserialization error (and a logged traceback).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            formats = [archive.read(n).strip() for n in names if n.rpartition("/")[2] == "archive_format"]
    except zipfile.BadZipFile:
        raise ArchiveError(
            f"{label} is not a torch.export program: it is not even a zip (torch.export.save writes one)"
        ) from None
    if formats != [b"pt2"]:
        leaves = {n.rpartition("/")[2] for n in names}
        what = (
            "a TorchScript file (torch.jit.save)"
            if "constants.pkl" in leaves
            else "a torch.save file (weights or a pickled module)"
            if "data.pkl" in leaves
            else "a zip of something else"
        )
        raise ArchiveError(
            f"{label} is not a torch.export program but {what}: export the model with torch.export.export "
            "(a dynamic batch axis: dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) and save that "
            "with torch.export.save"
        )
    try:
        with _quiet():
            return torch.export.load(io.BytesIO(data))
    except Exception as error:
        raise ArchiveError(f"PyTorch {torch.__version__} cannot load {label}: {_first_lines(error)}") from error


def _inputs(torch: Any, program: Any) -> list[_Input]:
    """The program's user inputs, in order."""
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise ArchiveError(f"input {name!r} is a {type(value).__name__}, not a tensor; fastinfer feeds tensors")
        if value.dim() == 0:
            raise ArchiveError(f"input {name!r} is a scalar; fastinfer batches along a leading axis")
        dtype = str(value.dtype).removeprefix("torch.")
        try:
            np.dtype(dtype)
        except TypeError:
            raise ArchiveError(f"input {name!r} is {dtype}, which numpy (and so fastinfer) has no type for") from None
        dims = tuple(d if isinstance(d, int) else str(d) for d in value.shape)
        inputs.append(_Input(name, dtype, dims))
    if not inputs:
        raise ArchiveError("the program takes no inputs")
    return inputs


def _bind_shapes(inputs: list[_Input], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Sizes for the symbolic dimensions that ``--input-shape`` fixes."""
    by_name = {i.name: i for i in inputs}
    bound: dict[str, int] = {}
    for name, sizes in shapes.items():
        if name not in by_name:
            raise ArchiveError(f"--input-shape names {name!r}; the program's inputs are {', '.join(by_name)}")
        dims = by_name[name].dims
        if len(sizes) != len(dims):
            raise ArchiveError(f"--input-shape gives {name!r} {len(sizes)} dimensions; it has {len(dims)}")
        for axis, (dim, size) in enumerate(zip(dims, sizes, strict=True)):
            if isinstance(dim, int):
                if dim != size:
                    raise ArchiveError(f"input {name!r} was exported with {dim} at axis {axis}, not {size}")
            elif not dim.isidentifier():
                raise ArchiveError(f"input {name!r} axis {axis} is {dim}, derived from other dimensions: fix those")
            elif bound.setdefault(dim, size) != size:
                raise ArchiveError(f"--input-shape gives {dim} (in {name!r} axis {axis}) two sizes")
    return bound


def _batch(inputs: list[_Input]) -> tuple[int | str, list[TensorSpec]]:
    """The batch axis (a fixed size or a symbol shared by every input) and each input's per-sample spec."""
    leading = {i.dims[0] for i in inputs}
    if len(leading) != 1:
        raise ArchiveError(
            f"the inputs' leading dimensions differ ({', '.join(f'{i.name}: {i.dims[0]}' for i in inputs)}); "
            "fastinfer batches every input along one axis: export them with one Dim('batch')"
        )
    specs = []
    for item in inputs:
        for axis, dim in enumerate(item.dims[1:], start=1):
            if not isinstance(dim, int):
                example = ",".join(str(d) if isinstance(d, int) else "?" for d in item.dims)
                raise ArchiveError(
                    f"input {item.name!r} has a dynamic dimension at axis {axis}; only the batch axis "
                    f"may be dynamic: fix it with --input-shape {item.name}={example}"
                )
        specs.append(TensorSpec(item.name, item.dtype, tuple(int(d) for d in item.dims[1:])))
    return leading.pop(), specs


def _check_batch_range(program: Any, symbol: str, sizes: Sequence[int], asked: bool) -> None:
    """Refuse batch sizes outside the range the program was exported for (``Dim("batch", max=16)``).

    A bounded batch needs explicit ``--batch-sizes``: a library with a symbolic axis would take any
    batch the server sends, and TVM plans memory for the bound.
    """
    for expr, bounds in program.range_constraints.items():
        if str(expr) != symbol:
            continue
        lower = int(bounds.lower)
        upper = None if str(bounds.upper).endswith("oo") else int(bounds.upper)  # torch's int_oo: no bound
        span = f"{lower}..{'' if upper is None else upper}"
        if (upper is not None or lower > 1) and not asked:
            raise ArchiveError(f"the program takes batches {span} only: choose sizes in it with --batch-sizes")
        outside = [s for s in sizes if s < lower or (upper is not None and s > upper)]
        if outside:
            raise ArchiveError(f"the program takes batches {span}; batch {outside[0]} is outside it")


def _unsupported(program: Any) -> None:
    """Name every operator of the (decomposed) program that TVM's converter lacks, and where each is."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = ExportedProgramImporter().convert_map
    missing: dict[str, list[str]] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) not in known:
            missing.setdefault(str(node.target), []).append(_where(node))
    if missing:
        listed = "; ".join(f"{op} at {', '.join(places[:3])}" for op, places in sorted(missing.items()))
        raise ArchiveError(f"TVM's PyTorch converter cannot convert these operators: {listed}")


def _where(node: Any) -> str:
    """A node in user terms: its name, the module it ran in, and its line of source."""
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()), ("", ""))[0] if stack else ""
    lines = [line.strip() for line in (node.meta.get("stack_trace") or "").strip().splitlines()]
    where = f"node {node.name}" + (f" in module {module!r}" if module else "")
    return where + (f" ({lines[-1]})" if lines else "")


def _convert(program: Any, bound: dict[str, int], label: str) -> Any:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(program, unwrap_unit_return_tuple=True, run_ep_decomposition=False)
    except Exception as error:
        raise ArchiveError(f"TVM could not convert {label}: {_first_lines(error)}") from error
    if bound:
        mod = relax.transform.BindSymbolicVars({k: tvm.tirx.IntImm("int64", v) for k, v in bound.items()})(mod)
    return mod


def _with_batch(mod: Any, symbol: int | str, size: int | None) -> Any:
    """``mod`` with its batch symbol bound to ``size`` (None: left symbolic)."""
    import tvm
    from tvm import relax

    if size is None or isinstance(symbol, int):
        return mod
    return relax.transform.BindSymbolicVars({symbol: tvm.tirx.IntImm("int64", size)})(mod)


def _build(torch: Any, program: Any, source: bytes, source_name: str, output: Path, options: BuildOptions) -> Manifest:
    stream = options.stream or sys.stderr
    started = time.monotonic()
    target, *more_targets = targets.resolve_all(options.target, options.num_cores)
    inputs = _inputs(torch, program)
    bound = _bind_shapes(inputs, options.input_shapes)
    inputs = [replace(i, dims=tuple(bound.get(d, d) if isinstance(d, str) else d for d in i.dims)) for i in inputs]
    batch, specs = _batch(inputs)
    tuned = target["kind"] == "llvm" and (options.tune_trials > 0 or options.use_stored_records)
    if options.layout not in ("auto", "nchw") and not tuned:  # as pack.build_archive
        raise ArchiveError("--layout applies to tuned CPU builds: add --tune-trials or --stored-records-only")
    fixed = batch if isinstance(batch, int) else None
    if fixed is not None and options.batch_sizes and set(options.batch_sizes) != {fixed}:
        raise ArchiveError(
            f"the program was exported for batch {fixed} only; re-export it with a dynamic batch axis "
            "(dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) to build other batch sizes"
        )
    sizes, served = pack._plan_batch_sizes(fixed, options.batch_sizes if fixed is None else None, tuned)
    checked = _checked_batches(sizes, served)
    if isinstance(batch, str):
        _check_batch_range(program, batch, checked, bool(options.batch_sizes))
    preprocess = pack.image_preprocess(options.preprocess, specs[0])
    labels = pack.read_labels(options.labels_path) if options.labels_path else None
    with _quiet():
        decomposed = program.run_decompositions()
    _unsupported(decomposed)
    mod = _convert(decomposed, bound, options.name)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        reference = _Reference(torch, program, specs)
        batches = ", ".join(str(size or "any") for size in sizes)
        print(f"compiling for {targets.describe(target)}, batch {batches}", file=stream, flush=True)
        libraries, tuning_info, tuning_detail, layouts = _compile(
            mod, batch, target, sizes, tuned, options, staging, stream
        )
        verification = _verify(reference, staging, libraries, target, served, stream)
        more = {}
        for extra in more_targets:  # further targets: untuned, one library with a symbolic batch axis
            path = f"lib/{extra['kind']}/model.so"
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            pack._plain_build(mod, extra, staging / path, f"{options.name} for {extra['kind']}", stream)
            more[extra["kind"]] = {
                "target": extra,
                "libraries": {"any" if fixed is None else str(fixed): path},
                "verified": _verify(reference, staging, {fixed: path}, extra, served, stream),
            }
        extra_files = pack._write_postprocess(labels, options.top_k, staging)
        manifest = Manifest(
            name=options.name,
            version=options.version,
            inputs=tuple(specs),
            outputs=reference.output_specs(checked[0]),
            batch_sizes=served,
            libraries={("any" if s is None else str(s)): path for s, path in libraries.items()},
            target=target,
            tvm_version=pack._tvm_version(),
            fastinfer_version=fastinfer.__version__,
            preprocess=preprocess.to_dict() if preprocess else None,
            top_k=extra_files["top_k"],
            labels_file=extra_files["labels_file"],
            tuning=tuning_info,
            build={
                "source": source_name,
                "source_sha256": hashlib.sha256(source).hexdigest(),
                "input_shapes": {k: list(v) for k, v in options.input_shapes.items()},
                "host_cpu": targets.host_cpu(),
                "seconds": round(time.monotonic() - started, 1),
                "verified": verification,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **({"tuning": tuning_detail} if tuning_detail else {}),
                **({"layout": pack._layout_summary(layouts)} if set(layouts.values()) - {"nchw"} else {}),
            },
            more_targets=more,
            source_format=SOURCE_FORMAT,
            torch_version=torch.__version__,
        )
        pack._write_zip(manifest, staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Manifest.from_json(pack._read_manifest_text(output))


def _checked_batches(sizes: list[int | None], served: tuple[int, ...] | None) -> list[int]:
    """The batch sizes verification runs: each one served, or 1 and 3 for a library that takes any."""
    if None not in sizes:
        return [s for s in sizes if s is not None]
    return list(served) if served else [1, 3]


def _compile(
    mod: Any,
    batch: int | str,
    target: dict,
    sizes: list[int | None],
    tuned: bool,
    options: BuildOptions,
    staging: Path,
    stream: TextIO,
) -> tuple[dict[int | None, str], Tuning | None, dict, dict[int | None, str]]:
    """One library per entry of ``sizes`` (None: the batch axis left symbolic), as ``pack`` compiles
    ONNX; returns archive paths, the tuning summary, its per-batch detail and the layouts."""
    libraries: dict[int | None, str] = {}
    (staging / "lib").mkdir()
    mods = {size: _with_batch(mod, batch, size) for size in sizes}
    if not tuned:
        for size, sized in mods.items():
            path = "lib/model.so" if size is None else f"lib/model-b{size}.so"
            pack._plain_build(sized, target, staging / path, f"{options.name} batch {size or 'N'}", stream)
            libraries[size] = path
        return libraries, None, {}, dict.fromkeys(mods, "nchw")
    records = pack.records_folder(options.cache_dir, target, options.records_dir)
    tuning.recover(records, stream)  # records a killed tuning run left behind
    seeded = "" if options.records_dir else shipped.seed_cache(records, target)
    prepared, tasks_total, tuned_now, layouts = pack._tune(mods, target, records, options, stream)
    for size, sized in prepared.items():
        path = f"lib/model-b{size}.so"
        pack._tuned_build(sized, target, records, f"{options.name} batch {size}", staging / path, stream)
        libraries[size] = path
    (staging / "tuning").mkdir()
    detail = pack._export_records(records, staging / "tuning", prepared, target)
    stored = f"shipped:{seeded}" if seeded else ("records folder" if options.records_dir else "cache")
    summary = Tuning(
        trials_per_task=options.tune_trials if tuned_now else 0,
        tasks=tasks_total,
        tasks_tuned_now=tuned_now,
        workloads_file=f"tuning/{tuning.WORKLOADS_FILE}",
        records_file=f"tuning/{tuning.RECORDS_FILE}",
        records_source=",".join(filter(None, ["tuned" if tuned_now else "", stored])),
    )
    return libraries, summary, detail, layouts


class _Reference:
    """The exported program run by PyTorch, once per batch size: what every library must compute."""

    def __init__(self, torch: Any, program: Any, specs: list[TensorSpec]) -> None:
        self.torch = torch
        self.program = program
        self.specs = specs
        self.name = f"PyTorch {torch.__version__}"
        self._module: Any = None
        self._runs: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def run(self, batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Sample inputs of ``batch`` rows and the program's outputs for them, flattened in order."""
        if batch not in self._runs:
            from torch.utils._pytree import tree_leaves

            torch = self.torch
            sample = pack._sample(tuple(self.specs), batch)
            if self._module is None:
                self._module = self.program.module()
            try:
                with torch.no_grad():
                    result = self._module(*(torch.from_numpy(x) for x in sample))
            except Exception as error:
                raise ArchiveError(
                    f"PyTorch could not run the program at batch {batch}: {_first_lines(error)}"
                ) from error
            leaves = tree_leaves(result)
            self._runs[batch] = sample, [leaf.detach().numpy() for leaf in leaves]
        return self._runs[batch]

    def output_names(self, count: int) -> list[str]:
        """A dict's keys when the program returns a flat dict; else ``output``, or ``output_0``, ``output_1``, ..."""
        spec = self.program.call_spec.out_spec
        if spec is not None and spec.type is dict and len(spec.context) == count:
            return [str(key) for key in spec.context]
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]

    def output_specs(self, batch: int) -> tuple[TensorSpec, ...]:
        _, outputs = self.run(batch)
        names = self.output_names(len(outputs))
        return tuple(TensorSpec(n, o.dtype.name, tuple(o.shape[1:])) for n, o in zip(names, outputs, strict=True))


def _verify(
    reference: _Reference,
    staging: Path,
    libraries: dict[int | None, str],
    target: dict,
    served: tuple[int, ...] | None,
    stream: TextIO,
) -> dict:
    """Run each library at every batch size it serves and compare with PyTorch; refuse a disagreement."""
    if not targets.can_run_here(target):  # compile-only: recorded, and `inspect` says so
        reason = f"not verified on-device: this host has no device for {targets.describe(target)}"
        print(f"{reason}; serve it only after checking it on one", file=stream)
        return {"skipped": reason, "checks": []}
    report: dict = {"tolerance": pack.TOLERANCE, "reference": reference.name, "checks": []}
    print(f"verifying against {reference.name} ({targets.describe(target)})", file=stream, flush=True)
    for size, path in libraries.items():
        for batch in _checked_batches([size], served):
            sample, expected = reference.run(batch)
            names = reference.output_names(len(expected))
            try:
                got = pack._run_library(staging / path, target, sample)
            except Exception as error:
                raise ArchiveError(f"the compiled model failed at batch {batch}: {_first_lines(error)}") from error
            if len(got) != len(expected):
                raise ArchiveError(f"the compiled model gives {len(got)} outputs; PyTorch gives {len(expected)}")
            worst, where = 0.0, ""
            for name, a, b in zip(names, got, expected, strict=True):
                if a.shape != b.shape:
                    raise ArchiveError(f"output {name!r} at batch {batch} has shape {a.shape}; PyTorch gives {b.shape}")
                if b.ndim == 0 or b.shape[0] != batch:
                    raise ArchiveError(
                        f"output {name!r} has shape {b.shape} at batch {batch}: fastinfer needs the batch axis first"
                    )
                if not b.size:
                    continue
                errors = pack.relative_errors(a, b)
                index = np.unravel_index(int(np.argmax(errors)), errors.shape)
                if errors[index] > worst or not where:
                    worst = float(errors[index])
                    where = f"output {name!r} at {tuple(int(i) for i in index)}: {a[index]} against {b[index]}"
            if worst > pack.TOLERANCE:
                raise ArchiveError(
                    f"the compiled model disagrees with {reference.name} at batch {batch}: largest error "
                    f"{worst:.2e} of the output's scale (allowed {pack.TOLERANCE:.0e}), {where}; no archive written"
                )
            report["checks"].append({"batch": batch, "relative_error": worst})
            print(f"verified batch {batch} against {reference.name}: relative error {worst:.1e}", file=stream)
    return report
