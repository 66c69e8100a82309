"""Compilation targets: which one ``--target cpu`` means on this host, and whether a host can run one.

``cpu`` is the most capable *portable* x86-64 level the host supports (x86-64-v4 with AVX-512,
x86-64-v3 with AVX2 and FMA, x86-64-v2), detected from the host CPU's features, not guessed from its
name. An archive built for a level runs on every CPU of that level, and its tuning records apply
there; the host's own CPU name (``znver5``, ``emeraldrapids``) is used only off x86-64.
"""

from __future__ import annotations

import json
import os

from fastinfer.archive.manifest import ArchiveError

# x86-64 micro-architecture levels (psABI), most capable first, with the ISA features each requires.
X86_64_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    ("x86-64-v3", ("avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe")),
    ("x86-64-v2", ("sse4.2", "ssse3", "popcnt", "cx16")),
)

# LLVM feature names that tune code generation but are not instructions a CPU may lack.
_TUNING_PREFIXES = (
    "fast-",
    "slow-",
    "false-deps-",
    "prefer-",
    "tuning-",
    "no-bypass-",
    "macrofusion",
    "branchfusion",
    "idiv",
    "lea-",
    "pad-short",
    "use-",
    "allow-",
    "sbb-dep",
    "avoid-",
    "vzeroupper",
    "insert-vzeroupper",
)


def host_cpu() -> str:
    import tvm

    return tvm.target.codegen.llvm_get_system_cpu()


def portable_cpu() -> str:
    """The most capable x86-64 level this host supports, or the host CPU's own name off x86-64."""
    import tvm
    from tvm.target import codegen

    cpu = host_cpu()
    host = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    if "x86_64" in codegen.llvm_get_system_triple():
        for level, features in X86_64_LEVELS:
            if codegen.llvm_cpu_has_features(list(features), host):
                return level
    return cpu


def resolve(spec: str, num_cores: int | None = None) -> dict:
    """``cpu``, ``cuda`` or a target JSON dict -> the JSON dict TVM accepts."""
    num_cores = num_cores or os.cpu_count() or 1
    if spec == "cpu":
        return {"kind": "llvm", "mcpu": portable_cpu(), "num-cores": num_cores}
    if spec == "cuda":
        return {"kind": "cuda", "arch": _cuda_arch()}
    if spec.startswith("cuda:"):  # cuda:sm_90 names the architecture: builds without a GPU
        arch = spec.removeprefix("cuda:")
        if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise ArchiveError(f"--target cuda:ARCH expects an architecture such as sm_90, got {spec!r}")
        return {"kind": "cuda", "arch": arch}
    try:
        target = json.loads(spec)
    except ValueError:
        raise ArchiveError(
            f'--target expects cpu, cuda or a JSON dict such as {{"kind": "llvm"}}, got {spec!r}'
        ) from None
    if not isinstance(target, dict) or "kind" not in target:
        raise ArchiveError(f"--target JSON must be a dict with a 'kind', got {spec!r}")
    import tvm

    try:
        tvm.target.Target(target)
    except Exception as error:
        raise ArchiveError(f"TVM rejects the target {spec}: {error}") from error
    return target


def resolve_all(spec: str, num_cores: int | None = None) -> list[dict]:
    """A comma-separated list of targets (``cpu,cuda``; one per kind) -> their JSON dicts, first first."""
    parts = [spec] if spec.lstrip().startswith("{") else [part.strip() for part in spec.split(",") if part.strip()]
    resolved = [resolve(part, num_cores) for part in parts or [spec]]
    kinds = [t["kind"] for t in resolved]
    if len(set(kinds)) != len(kinds):
        raise ArchiveError(f"--target names one target per kind, got {spec!r}")
    return resolved


def can_run_here(target: dict) -> bool:
    """Whether this host has the device to run code built for ``target`` (for verification)."""
    if target.get("kind") == "cuda":
        from fastinfer.worker.cuda import tvm_cuda

        try:
            return bool(tvm_cuda(0).exist)
        except Exception:  # no driver library: no GPU
            return False
    return mismatch(target) is None


def _cuda_arch() -> str:
    from fastinfer.worker.cuda import tvm_cuda

    device = tvm_cuda(0)
    if not device.exist:
        raise ArchiveError(
            "--target cuda: no CUDA device on this host to detect the architecture of; "
            'name it: --target cuda:sm_90 or \'{"kind": "cuda", "arch": "sm_90"}\''
        )
    return "sm_" + device.compute_version.replace(".", "")


def _isa_features(target: dict) -> set[str]:
    import tvm
    from tvm.target import codegen

    features = set(codegen.llvm_get_cpu_features(tvm.target.Target(target)))
    return {f for f in features if not f.startswith(_TUNING_PREFIXES)}


def mismatch(target: dict) -> str | None:
    """Why this host cannot run code built for ``target``; None when it can."""
    from tvm.target import codegen

    kind = target.get("kind")
    if kind == "llvm":
        mcpu = target.get("mcpu")
        if not mcpu:
            return None  # generic code for the host's architecture
        if runtime_only():
            return _mismatch_without_llvm(mcpu)
        triple = target.get("mtriple") or codegen.llvm_get_system_triple()
        if not codegen.llvm_is_valid_cpu(mcpu, triple):
            return f"the archive targets CPU {mcpu!r}, which is not a CPU of this host's architecture ({triple})"
        needed = _isa_features({"kind": "llvm", "mcpu": mcpu})
        have = _isa_features({"kind": "llvm", "mcpu": host_cpu()})
        missing = sorted(needed - have)
        if missing:
            return (
                f"the archive targets CPU {mcpu!r}, whose instructions this host's CPU ({host_cpu()}) lacks: "
                + ", ".join(missing)
            )
        return None
    if kind == "cuda":
        from fastinfer.worker.cuda import tvm_cuda

        if not tvm_cuda(0).exist:
            return "the archive targets CUDA and this host has no CUDA device"
        arch = target.get("arch")
        have = "sm_" + tvm_cuda(0).compute_version.replace(".", "")
        if arch and int(arch.removeprefix("sm_")) > int(have.removeprefix("sm_")):
            return f"the archive targets CUDA {arch}; this host's GPU is {have}"
        return None
    return f"the archive targets {kind!r}, which fastinfer does not run"


def runtime_only() -> bool:
    """Whether TVM runs without its compiler library (``TVM_USE_RUNTIME_LIB=1``, or a runtime-only
    install): LLVM's CPU queries are then missing."""
    import tvm

    return bool(getattr(tvm.base, "_RUNTIME_ONLY", False))


# The x86-64 level features as /proc/cpuinfo names them, where its name differs from LLVM's.
_CPUINFO_NAMES = {"bmi": "bmi1", "lzcnt": "abm", "sse4.2": "sse4_2"}


def _mismatch_without_llvm(mcpu: str) -> str | None:
    """:func:`mismatch` for an llvm target without LLVM: x86-64 levels are checked against the
    kernel's CPU flags; a named CPU cannot be checked, and is trusted."""
    names = [name for name, _ in X86_64_LEVELS]
    if mcpu not in names:
        return None
    try:
        with open("/proc/cpuinfo") as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return None
    needed = {f for _, features in X86_64_LEVELS[names.index(mcpu) :] for f in features}  # this level and below
    missing = sorted(f for f in needed if _CPUINFO_NAMES.get(f, f) not in flags)
    if missing:
        return f"the archive targets CPU {mcpu!r}, whose instructions this host's CPU lacks: " + ", ".join(missing)
    return None


def describe(target: dict) -> str:
    """A short human name: ``llvm x86-64-v4, 2 cores``."""
    parts = [str(target.get("kind"))]
    for key in ("mcpu", "arch"):
        if key in target:
            parts.append(str(target[key]))
    text = " ".join(parts)
    if "num-cores" in target:
        cores = target["num-cores"]
        text += f", {cores} core" + ("" if cores == 1 else "s")
    return text
