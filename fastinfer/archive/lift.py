"""Batch-1 schedules tried at a larger batch, each image computed as batch 1 computes it.

MetaSchedule tiles a batch-N kernel's batch axis together with its spatial axes, and a search rarely
finds the schedule that keeps the batch loop outermost, so that one image's working set stays in
the caches while it is computed. Measured on EfficientNet-Lite0 (one core, NHWC, ``x86-64-v4``):
after some 6,000 trials at batch 8, its depthwise convolutions took twice as long per image as at
batch 1, and their batch-1 schedules run over the eight images took 0.78x the time of the batch-8
ones (the first 5x5: 1.65 against 2.85 ms).

A batch-1 schedule's first tiling decision splits the batch axis, whose extent is 1, into factors
that are all 1; with the outermost factor set to N, the same schedule runs over N images, one after
the other (:func:`lifted`). :func:`lift` puts that schedule beside each task's batch-N record, times
the two again side by side (:mod:`.remeasure`) and keeps the faster, so a search at batch N that
follows starts from the better of the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from fastinfer.archive import remeasure, tuning


def lifted(trace: Any, batch: int) -> Any | None:
    """``trace``, a batch-1 schedule, with its first tiling decision (the batch axis's: every factor
    1) set to ``[batch, 1, ...]``; None where the first tiling is of an axis longer than 1."""
    for inst in trace.insts:
        if inst.kind.name == "SamplePerfectTile":
            decision = trace.decisions.get(inst)
            factors = [int(factor) for factor in decision] if decision is not None else []
            if not factors or any(factor != 1 for factor in factors):
                return None
            return trace.with_decision(inst, [batch] + [1] * (len(factors) - 1), remove_postproc=False)
    return None


def lift(
    mod_one: Any, mod_batch: Any, batch: int, target: Any, records_dir: Path, stream: TextIO, builder: Any = None
) -> int:
    """Try the records in ``records_dir`` of ``mod_one``'s tasks (a model at batch 1) on the same
    tasks of ``mod_batch`` (the model at ``batch``; both through :func:`tuning.pre_tuning`): where the
    lifted schedule runs faster here than the task's batch-``batch`` record, or the task has none, it
    becomes the record. Tasks pair by name: the same graph at two batch sizes fuses into the same
    kernels, and a pair whose lifted schedule does not apply is left out. Returns how many records
    lifted schedules replaced or added. ``builder`` builds the schedules timed (default: a
    :func:`tuning.make_builder`, closed after)."""
    from tvm.s_tir import meta_schedule as ms

    database = tuning.load_database(records_dir)
    ones = {task.task_name: task.dispatched[0] for task in tuning.all_tasks(mod_one, target)}
    workloads = ms.database.MemoryDatabase()
    contending: dict[str, list] = {}
    lifted_traces: dict[str, str] = {}
    for task in tuning.all_tasks(mod_batch, target):
        workload = task.dispatched[0]
        one = tuning.best_record(database, ones.get(task.task_name))
        trace = lifted(one.trace, batch) if one is not None else None
        scheduled = _applied(trace, workload) if trace is not None else None
        if scheduled is None:
            continue
        own = tuning.best_record(database, workload)
        if own is not None and str(own.trace) == str(trace):
            continue  # lifted before, and kept
        # the arguments of the scheduled kernel: weights in the layout the schedule rewrote them to
        args = ms.arg_info.ArgInfo.from_entry_func(scheduled, remove_preproc=True)
        candidate = ms.database.TuningRecord(trace, workloads.commit_workload(workload), None, target, args)
        key = remeasure.workload_key(candidate)
        contending[key] = [candidate] if own is None else [own, candidate]
        lifted_traces[key] = str(trace)
    if not contending:
        return 0
    print(f"trying {len(contending)} batch-1 schedules at batch {batch}", file=stream, flush=True)
    own_builder = builder is None
    builder = tuning.make_builder() if own_builder else builder
    try:
        winners = remeasure.settle(contending, builder, stream)
    finally:
        if own_builder:
            builder.close()
    tuning.replace_records(records_dir, winners)
    kept = sum(1 for key, record in winners.items() if str(record.trace) == lifted_traces[key])
    print(f"batch {batch}: {kept} of {len(contending)} batch-1 schedules ran faster, kept", file=stream, flush=True)
    return kept


def _applied(trace: Any, workload: Any) -> Any | None:
    """``workload`` scheduled by ``trace``; None where the trace does not apply to it."""
    from tvm import s_tir

    sch = s_tir.Schedule(workload)
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception:  # TVM's own errors: a factor that does not divide, a loop that is not there
        return None
    return sch.mod
