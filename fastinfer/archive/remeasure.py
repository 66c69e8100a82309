"""Which of the records competing for a workload is fastest, timed again side by side.

A search measures each candidate once (the mean of ten runs, :func:`tuning.evaluator_config`), at
whatever moment its turn comes. On a loaded machine that figure carries the load of its moment, and
the lowest of hundreds of noisy figures is as often a quiet moment as a faster schedule: on this
project's shared two-core machines, 150 more trials of EfficientNet-Lite0 made it 1.25x slower,
because 15 of the 21 records they replaced had been faster when timed again. So when a search ends,
the few best candidates of each workload it searched and the record they would replace are built
and timed in turns (A, B, C, A, B, C, ...), so that whatever load comes falls on all of them alike.
The lowest median wins, and the records keep its new timings, comparable with its rivals'.

Each run starts with every argument but the first (the weights, the output, a residual input) out
of the CPU caches, as the search measures them too (:data:`COLD_RUNS`).

Only CPU (llvm) records are timed here, in this process; others keep the search's choice.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable, Iterable
from typing import Any, TextIO

CANDIDATES = 3  # the search's best few per workload, beside the record they would replace
ROUNDS = 5  # turns of timing each; the median of a candidate's rounds decides
COLD_RUNS = 40  # runs per round, each after its arguments but the first left the caches
# TVM's preprocessing between timed runs: flushes every argument but the first from the CPU caches.
# Inside a model a kernel's input was just written by the kernel before it, while its weights were
# last touched a whole model ago; timed warm, over and over, a kernel finds everything in the caches
# and a search picks schedules that lean on that (EfficientNet-Lite0's kernels summed 7.7 ms warm,
# 9.3 cold, and about 8.9 in the model, on one core).
FLUSH = "cache_flush_cpu_non_first_arg"
FAILED_S = 1e9  # MetaSchedule's run time for a candidate that failed


def workload_key(record: Any) -> str:
    """The workload's structural hash, as the JSON database keys it."""
    return str(record.workload.as_json()[0])


def mean_s(record: Any) -> float:
    times = [float(t) for t in record.run_secs or ()]
    return sum(times) / len(times) if times else float("inf")


def contenders(kept: Iterable[Any], searched: Iterable[Any], limit: int = CANDIDATES) -> dict[str, list]:
    """Per workload the search touched, the records to time again: its ``limit`` best distinct
    schedules by the search's figures, and the kept record (the one they would replace) when it
    is not among them. Workloads with a single contender are left out: nothing to settle."""
    best_kept: dict[str, Any] = {}
    for record in kept:
        key = workload_key(record)
        if mean_s(record) < FAILED_S and (key not in best_kept or mean_s(record) < mean_s(best_kept[key])):
            best_kept[key] = record
    found: dict[str, dict[str, Any]] = {}
    for record in sorted(searched, key=mean_s):
        if mean_s(record) >= FAILED_S:
            continue
        schedules = found.setdefault(workload_key(record), {})
        if len(schedules) < limit:
            schedules.setdefault(str(record.trace.as_json()), record)
    result = {}
    for key, schedules in found.items():
        if key in best_kept:
            schedules.setdefault(str(best_kept[key].trace.as_json()), best_kept[key])
        if len(schedules) > 1:
            result[key] = list(schedules.values())
    return result


def settle(
    contending: dict[str, list],
    builder: Any,
    stream: TextIO,
    stopped: Callable[[], bool] = lambda: False,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    """Per workload, the winner of its contenders timed again in turns, as a new record that holds
    those timings. A workload whose contenders cannot all be timed (not a CPU target, a build that
    fails, ``stopped()`` before its turn) is left out: the caller chooses by the figures."""
    from tvm.s_tir import meta_schedule as ms

    winners: dict[str, Any] = {}
    if not contending:
        return winners
    print(
        f"timing the best schedules of {len(contending)} tasks again, side by side "
        f"({sum(len(c) for c in contending.values())} builds)",
        file=stream,
        flush=True,
    )
    for key, records in contending.items():
        if stopped():
            break
        if any(record.target is None or record.target.kind.name != "llvm" for record in records):
            continue
        timings = _time_in_turns(records, builder, rounds)
        if timings is None:
            continue
        medians = [statistics.median(times) for times in timings]
        best = medians.index(min(medians))
        record = records[best]
        winners[key] = ms.database.TuningRecord(
            record.trace, record.workload, timings[best], record.target, record.args_info
        )
    return winners


def _time_in_turns(records: list, builder: Any, rounds: int) -> list[list[float]] | None:
    """Each record's schedule built, then timed ``rounds`` times in turns; None if any fails."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    candidates = [record.as_measure_candidate() for record in records]
    built = builder.build([ms.builder.BuilderInput(c.sch.mod, records[0].target) for c in candidates])
    paths = [result.artifact_path for result in built]
    try:
        if any(path is None for path in paths):
            return None
        device = tvm.cpu()
        evaluators, arguments = [], []
        for candidate, path in zip(candidates, paths, strict=True):
            module = tvm.runtime.load_module(path)
            evaluators.append(
                module.time_evaluator(module.entry_name, device, number=1, repeat=COLD_RUNS, f_preproc=FLUSH)
            )
            arguments.append([_random_tensor(info, device) for info in candidate.args_info])
        timings: list[list[float]] = [[] for _ in records]
        for _ in range(rounds):
            for evaluate, args, times in zip(evaluators, arguments, timings, strict=True):
                times.append(float(evaluate(*args).mean))
        return timings
    except Exception:  # a candidate that ran in the search but not here: keep the search's choice
        return None
    finally:
        for path in paths:
            if path:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _random_tensor(info: Any, device: Any) -> Any:
    import numpy as np
    import tvm

    shape = [int(size) for size in info.shape]
    dtype = str(info.dtype)
    rng = np.random.default_rng(0)
    # indices and the like get small values, which stay in range
    values = rng.random(shape) if dtype.startswith("float") else rng.integers(0, 2, shape)
    return tvm.runtime.tensor(values.astype(dtype), device)
