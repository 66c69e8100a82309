"""MetaSchedule tuning through Relax's static-shape pipeline, with CPU weight prepacking.

The pipeline is ``relax.pipeline.static_shape_tuning_pipeline`` taken apart, so that tuning can use
a builder of our own: MetaSchedule's ``LocalBuilder`` opens a fresh process pool for every batch of
candidates, and each new process imports ``tvm.s_tir.tensor_intrin`` (tens of seconds), so that
start-up, not search, dominated tuning time. ``KeptAliveBuilder`` keeps one pool for the whole run
(the import is paid once per worker, in an initializer outside the build timeout) and keeps the
per-build timeout, so one pathological candidate costs ``build_timeout_s``, not the run.

Weights are constants in the module (``from_onnx(keep_params_in_input=False)``), so the layout
rewrite that prepacking inserts is folded at compile time: the compiled ``main`` still takes only the
model's inputs.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"


def _import_intrinsics() -> None:
    import tvm.s_tir.tensor_intrin  # noqa: F401  (registers every target's tensor intrinsics: slow)


def _make_builder_class() -> Any:
    """KeptAliveBuilder, defined lazily so that importing this module does not import TVM."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class KeptAliveBuilder(PyBuilder):
        """LocalBuilder's work, with worker processes that live for the whole tuning run."""

        def __init__(self, *, max_workers: int, timeout_sec: float, progress: Progress) -> None:
            super().__init__()
            self.timeout_sec = timeout_sec
            self.progress = progress
            self._pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, initializer=_import_intrinsics)

        def build(self, build_inputs: list) -> list:
            results = []
            args = [(None, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            for result in self._pool.map_with_error_catching(lambda x: _worker_func(*x), args):
                if result.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(result.value, None))
                elif result.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {result.value}"))
            self.progress.update(len(results), sum(1 for r in results if r.error_msg is not None))
            return results

        def close(self) -> None:
            self._pool.shutdown()

    return KeptAliveBuilder


class Progress:
    """Prints one line per batch of built candidates: trials done of the budget, time left."""

    def __init__(self, total_trials: int, label: str, stream: TextIO) -> None:
        self.total_trials = total_trials
        self.label = label
        self.stream = stream
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()

    def update(self, built: int, failed: int) -> None:
        self.done += built
        self.failed += failed
        elapsed = time.monotonic() - self.started
        fraction = min(1.0, self.done / max(1, self.total_trials))
        left = f", about {elapsed / fraction - elapsed:.0f} s left" if fraction > 0 else ""
        print(
            f"tuning {self.label}: {self.done}/{self.total_trials} trials ({fraction:.0%}), "
            f"{self.failed} failed builds, {elapsed:.0f} s{left}",
            file=self.stream,
            flush=True,
        )


def pre_tuning(mod: Any, target: Any) -> Any:
    """Legalize and mark weights as layout-free, as ``static_shape_tuning_pipeline`` does first."""
    import tvm
    from tvm.relax import transform
    from tvm.relax.pipeline import zero_pipeline

    with target:
        return tvm.transform.Sequential(
            [
                transform.DecomposeOpsForInference(),
                transform.CanonicalizeBindings(),
                zero_pipeline(),
                transform.AttachAttrLayoutFreeBuffers(),
            ]
        )(mod)


def apply_records(mod: Any, target: Any, database: Any) -> Any:
    """Apply the best schedules in ``database``, then prepack the weights (folded as constants)."""
    import tvm
    from tvm.relax import transform

    with target, database:
        return tvm.transform.Sequential(
            [
                transform.MetaScheduleApplyDatabase(),
                transform.SplitLayoutRewritePreproc(),
                transform.LiftTransformParams(),
                transform.FoldConstant(),
            ]
        )(mod)


def load_database(records_dir: Path) -> Any:
    """The JSON database in ``records_dir`` (created empty when missing)."""
    from tvm.s_tir import meta_schedule as ms

    records_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(records_dir / WORKLOADS_FILE),
        path_tuning_record=str(records_dir / RECORDS_FILE),
        allow_missing=True,
    )


def untuned_tasks(mod: Any, target: Any, database: Any) -> list:
    """The tuning tasks of ``mod`` that ``database`` holds no record for."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [task for task in tasks if not _has_record(database, task.dispatched[0])]


def _has_record(database: Any, mod: Any) -> bool:
    if not database.has_workload(mod):
        return False
    return bool(database.get_top_k(database.commit_workload(mod), 1))


def tune(
    mods: list,
    target: Any,
    records_dir: Path,
    trials_per_task: int,
    *,
    label: str = "model",
    build_timeout_s: float = 60.0,
    workers: int | None = None,
    stream: TextIO | None = None,
    total_trials: int | None = None,
    retune: bool = False,
) -> int:
    """Tune the tasks of ``mods`` missing from the database in ``records_dir``; keep the best of each.

    Each module must have gone through :func:`pre_tuning`; all are tuned in one run (one builder
    pool, one progress display), e.g. the same model at each batch size. Returns the number of tasks tuned (0: the
    database already covered the model, nothing ran). Only the best record per workload is written
    back, which keeps the database small enough to ship. ``total_trials`` below ``trials_per_task``
    times the task count lets the scheduler spend trials where latency gains most; ``retune`` searches
    tasks that already have records too (a better record replaces the old one).
    """
    import os

    from tvm.s_tir import meta_schedule as ms

    stream = stream or sys.stderr
    database = load_database(records_dir)
    pick = all_tasks if retune else (lambda mod, target: untuned_tasks(mod, target, database))
    missing = _unique([task for mod in mods for task in pick(mod, target)])
    if not missing:
        return 0
    workers = workers or os.cpu_count() or 1
    total = min(total_trials or trials_per_task * len(missing), trials_per_task * len(missing))
    print(
        f"tuning {label}: {len(missing)} tasks, up to {trials_per_task} trials each, {total} in all",
        file=stream,
        flush=True,
    )
    per_round = _trials_per_round(trials_per_task, total, len(missing))
    progress = Progress(total, label, stream)
    work = Path(tempfile.mkdtemp(prefix=".tuning-", dir=records_dir))
    builder = None
    try:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=missing, work_dir=str(work), seed=0, strategy=_search_strategy(per_round)
        )
        _quiet_task_loggers()  # MetaSchedule logs each task at INFO; the progress line says enough
        builder = _make_builder_class()(max_workers=workers, timeout_sec=build_timeout_s, progress=progress)
        runner = ms.runner.LocalRunner(timeout_sec=30.0)
        for name in (WORKLOADS_FILE, RECORDS_FILE):  # the search starts from the best schedules known
            shutil.copyfile(records_dir / name, work / name)
        scratch = ms.database.JSONDatabase(work_dir=str(work))
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(work),
            max_trials_global=total,
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=per_round,
            builder=builder,
            runner=runner,
            database=scratch,
            cost_model=_cost_model(workers),
            measure_callbacks="default",
        )
        merged = ms.database.MemoryDatabase()
        database.dump_pruned(merged)
        scratch.dump_pruned(merged)
        _write_pruned(merged, records_dir)
    finally:
        if builder is not None:
            builder.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"tuning {label}: done in {time.monotonic() - progress.started:.0f} s", file=stream, flush=True)
    return len(missing)


def _trials_per_round(trials_per_task: int, total: int, tasks: int) -> int:
    """Candidates per search round of a task.

    With the full budget every task gets its trials in one round (the fastest way to spend them).
    With less, the first round-robin pass must leave trials for the scheduler to give to the tasks
    whose latency matters most, so it takes about half the budget.
    """
    if total >= trials_per_task * tasks:
        return min(64, trials_per_task)
    return max(4, min(64, trials_per_task, total // (2 * tasks)))


def _quiet_task_loggers() -> None:
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("tvm.s_tir.meta_schedule"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _unique(tasks: list) -> list:
    """One task per workload: the same workload may appear in several modules."""
    from tvm_ffi import structural_equal

    unique: list = []
    for task in tasks:
        if not any(structural_equal(task.dispatched[0], other.dispatched[0]) for other in unique):
            unique.append(task)
    return unique


def _search_strategy(trials_per_round: int) -> Any:
    """Evolutionary search with a population sized to the candidates a round picks.

    MetaSchedule's default population (512) costs more to evolve than small rounds spend building
    and measuring: at 4-32 trials per round the search itself dominated the run on two cores.
    """
    from tvm.s_tir import meta_schedule as ms

    population = min(512, max(64, 8 * trials_per_round))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2)
    )


def _cost_model(workers: int) -> Any:
    from tvm.s_tir import meta_schedule as ms

    try:
        import xgboost  # noqa: F401
    except ImportError:  # the search still runs, guided by random scores
        return ms.cost_model.RandomModel()
    return ms.cost_model.XGBModel(num_tuning_cores=workers, tree_method="auto")


def _write_pruned(database: Any, records_dir: Path) -> None:
    """Replace the database files in ``records_dir`` with the best record of each workload."""
    from tvm.s_tir import meta_schedule as ms

    staging = Path(tempfile.mkdtemp(prefix=".pruned-", dir=records_dir))
    try:
        pruned = ms.database.JSONDatabase(work_dir=str(staging))
        database.dump_pruned(pruned)
        for name in (WORKLOADS_FILE, RECORDS_FILE):
            (staging / name).replace(records_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def database_summary(records_dir: Path) -> dict:
    """Workload and record counts of a database folder, for manifests and ``inspect``."""
    counts = {}
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        path = records_dir / name
        counts[name] = sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0
    return {"workloads": counts[WORKLOADS_FILE], "records": counts[RECORDS_FILE]}


def records_json_valid(records_dir: Path) -> bool:
    """Whether every line of both database files is JSON (a cheap check before TVM parses them)."""
    try:
        for name in (WORKLOADS_FILE, RECORDS_FILE):
            for line in (records_dir / name).read_text().splitlines():
                if line.strip():
                    json.loads(line)
    except (OSError, ValueError):
        return False
    return True


def all_tasks(mod: Any, target: Any) -> list:
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(mod, target))


def merge(source_dir: Path, records_dir: Path) -> None:
    """Add the records in ``source_dir`` to the database in ``records_dir``, keeping the best of each."""
    from tvm.s_tir import meta_schedule as ms

    merged = ms.database.MemoryDatabase()
    load_database(records_dir).dump_pruned(merged)
    load_database(source_dir).dump_pruned(merged)
    _write_pruned(merged, records_dir)


def export_subset(mods: list, target: Any, database: Any, dest: Path) -> int:
    """Write the best record of each task of ``mods`` found in ``database`` to a database in ``dest``."""
    from tvm.s_tir import meta_schedule as ms

    subset = ms.database.JSONDatabase(work_dir=str(dest))
    count = 0
    for mod in mods:
        for task in all_tasks(mod, target):
            workload_mod = task.dispatched[0]
            if not database.has_workload(workload_mod):
                continue
            for record in database.get_top_k(database.commit_workload(workload_mod), 1):
                workload = subset.commit_workload(workload_mod)
                subset.commit_tuning_record(
                    ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
                )
                count += 1
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        (dest / name).touch()
    return count
