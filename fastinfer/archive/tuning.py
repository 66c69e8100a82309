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

Records survive interruptions. A run searches into a scratch database (``.tuning-*`` inside the
records folder, which MetaSchedule appends to as each batch is measured) and merges it, pruned to
the best record per workload, into the records folder when it ends, however it ends: done, out of
time, Ctrl-C, or an exception. Before that merge (unless Ctrl-C stopped the run), the search's best
few candidates of each task and the record they would replace are timed again side by side, and the
fastest is kept (:mod:`fastinfer.archive.remeasure`: a search's single noisy figure per candidate
picks the luckiest moment as often as the fastest schedule). Only kill -9 (or a power cut) skips
that merge; the scratch then stays behind, and the next run (or build) over the same folder merges
it before it starts. A live run holds an flock on its scratch folder, so a concurrent run never
takes another's scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
SCRATCH_PREFIX = ".tuning-"
RECORDS_LOCK = ".records.lock"


def _init_build_worker() -> None:
    _ignore_interrupts()
    import tvm.s_tir.tensor_intrin  # noqa: F401  (registers every target's tensor intrinsics: slow)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group; the tuner, not its helpers, decides what it means."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _make_builder_class() -> Any:
    """KeptAliveBuilder, defined lazily so that importing this module does not import TVM."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class KeptAliveBuilder(PyBuilder):
        """LocalBuilder's work, with worker processes that live for the whole tuning run."""

        def __init__(self, *, max_workers: int, timeout_sec: float) -> None:
            super().__init__()
            self.timeout_sec = timeout_sec
            self._pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, initializer=_init_build_worker)

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
            return results

        def close(self) -> None:
            self._pool.shutdown()

    return KeptAliveBuilder


def make_builder(workers: int | None = None, build_timeout_s: float = 60.0) -> Any:
    """A MetaSchedule builder with ``workers`` processes (default: one per core) kept alive until
    its ``close()``."""
    return _make_builder_class()(max_workers=workers or os.cpu_count() or 1, timeout_sec=build_timeout_s)


def _make_stoppable_search(inner: Any, stop: Stop) -> Any:
    """``inner`` (a search strategy) that stops proposing candidates once ``stop`` says so.

    This is how a time budget and Ctrl-C end a run: MetaSchedule's ``tune_tasks`` has no time
    budget, and an exception raised inside it would lose the batches already measured but not yet
    collected (the task scheduler collects a batch's results, and only then stores them, when it
    comes back to that task). A task whose strategy returns no candidates is finished; once every
    task is, the scheduler collects what is still running, stores it, and returns normally. So a
    stop costs at most the batches in flight, and loses none of them.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

    @derived_object
    class StoppableSearch(PySearchStrategy):
        def __init__(self, inner: Any, stop: Stop) -> None:
            super().__init__()
            self.inner = inner
            self.stop = stop

        def _initialize_with_tune_context(self, context: Any) -> None:
            self.inner._initialize_with_tune_context(context)

        def pre_tuning(
            self, max_trials: int, num_trials_per_iter: int, design_spaces: list, database: Any, cost_model: Any
        ) -> None:
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self) -> list | None:
            return None if self.stop.requested() else self.inner.generate_measure_candidates()

        def notify_runner_results(self, measure_candidates: list, results: list) -> None:
            self.inner.notify_runner_results(measure_candidates, results)

        def clone(self) -> Any:  # each task gets its own copy; all share the stop
            return StoppableSearch(self.inner.clone(), self.stop)

    return StoppableSearch(inner, stop)


def _make_progress_callback(progress: Progress) -> Any:
    """A measure callback that hands each measured batch to ``progress``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def __init__(self, progress: Progress) -> None:
            super().__init__()
            self.progress = progress

        def apply(
            self,
            task_scheduler: Any,
            task_id: int,
            measure_candidates: list,
            builder_results: list,
            runner_results: list,
        ) -> None:
            best = None
            failed = 0
            for built, ran in zip(builder_results, runner_results, strict=True):
                if built.error_msg is not None or ran.error_msg is not None or not ran.run_secs:
                    failed += 1
                    continue
                mean = sum(float(s) for s in ran.run_secs) / len(ran.run_secs)
                best = mean if best is None else min(best, mean)
            self.progress.measured(task_id, len(runner_results), failed, best)

    return ProgressCallback(progress)


class Stop:
    """Whether a run should stop early, and why: its time budget is spent, or Ctrl-C was pressed."""

    def __init__(self, deadline: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline = deadline
        self.clock = clock
        self.reason = ""

    def requested(self) -> bool:
        if not self.reason and self.deadline is not None and self.clock() >= self.deadline:
            self.reason = "time budget spent"
        return bool(self.reason)


@contextlib.contextmanager
def _interrupt_stops(stop: Stop, stream: TextIO) -> Iterator[None]:
    """The first Ctrl-C stops the search gracefully (records kept); a second one interrupts at once.

    Only where Ctrl-C would raise KeyboardInterrupt anyway (the main thread, Python's own handler):
    a process that ignores SIGINT (a server's worker) keeps ignoring it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        if stop.reason == "interrupted":
            raise KeyboardInterrupt
        stop.reason = "interrupted"
        print("\nstopping after the batches in flight (Ctrl-C again to stop at once)", file=stream, flush=True)

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _duration(seconds: float) -> str:
    """``45 s``, ``12m05s``, ``2h03m``: short enough for a progress line."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Tuning progress: tasks, trials done of the budget, best estimated latency, elapsed, time left.

    On a terminal it is one line, rewritten after every measured batch; elsewhere (a log file, a
    server's log) one line every ``interval_s`` and one at the end, so that hours of tuning do not
    bury the rest of the log. The estimated latency is the sum, over the tasks searched, of the
    best mean run time measured for each times how often the model runs it.
    """

    def __init__(
        self,
        total_trials: int,
        label: str,
        stream: TextIO,
        *,
        weights: list[float] | None = None,
        time_budget_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
        interval_s: float = 60.0,
        started: float | None = None,
    ) -> None:
        self.total_trials = total_trials
        self.label = label
        self.stream = stream
        self.weights = weights or []
        self.time_budget_s = time_budget_s
        self.clock = clock
        self.terminal = _is_terminal(stream) if terminal is None else terminal
        self.interval_s = interval_s
        self.done = 0
        self.failed = 0
        self.best_s: dict[int, float] = {}  # task id -> best mean run time measured
        self.started = clock() if started is None else started
        self.last_shown = self.started

    def measured(self, task_id: int, trials: int, failed: int, best_s: float | None) -> None:
        """One batch of ``trials`` candidates of task ``task_id`` measured; show it if it is time."""
        self.done += trials
        self.failed += failed
        if best_s is not None and best_s < self.best_s.get(task_id, float("inf")):
            self.best_s[task_id] = best_s
        now = self.clock()
        if self.terminal:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
        elif now - self.last_shown >= self.interval_s:
            print(self.line(), file=self.stream, flush=True)
            self.last_shown = now

    def estimated_s(self) -> float:
        """The sum over measured tasks of their best mean run time, weighted by their use."""
        weights = self.weights
        return sum(best * (weights[task] if task < len(weights) else 1.0) for task, best in self.best_s.items())

    def line(self, ending: str = "") -> str:
        elapsed = self.clock() - self.started
        fraction = min(1.0, self.done / max(1, self.total_trials))
        tasks = len(self.weights)
        text = f"tuning {self.label}: {tasks} tasks, {self.done}/{self.total_trials} trials ({fraction:.0%})"
        if self.best_s:
            text += f", est. {self.estimated_s() * 1000:.3g} ms ({len(self.best_s)}/{tasks} tasks measured)"
        if self.failed:
            text += f", {self.failed} failed"
        text += f", {_duration(elapsed)}"
        if ending:
            return f"{text}; {ending}"
        left = [elapsed / fraction - elapsed] if fraction > 0 else []
        if self.time_budget_s is not None:
            left.append(self.time_budget_s - elapsed)
        if left:
            text += f", about {_duration(min(left))} left"
        return text

    def finish(self, ending: str) -> None:
        """The last line, always shown (ending the updating line on a terminal)."""
        if self.terminal:
            self.stream.write("\r" + self.line(ending) + "\x1b[K\n")
            self.stream.flush()
        else:
            print(self.line(ending), file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# How convolutions compute: the activation layout ("nchw": the model's own), and "winograd": NHWC,
# with the 3x3 convolutions of stride 1 that have enough channels by Winograd's algorithm.
LAYOUTS = ("nchw", "nhwc", "winograd")


def pre_tuning(mod: Any, target: Any, layout: str = "nchw") -> Any:
    """Legalize and mark weights as layout-free, as ``static_shape_tuning_pipeline`` does first.

    ``layout`` "nhwc" converts every 2-D convolution to NHWC activations and OHWI weights first
    (see :func:`convert_layout`); "winograd" then computes those of 3x3 that it pays for with
    Winograd's algorithm (:mod:`.winograd`). It changes the tuning workloads: records tuned for one
    layout do not cover another (those of "nhwc" cover "winograd"'s other kernels).
    """
    import tvm
    from tvm.relax import transform
    from tvm.relax.pipeline import zero_pipeline

    from fastinfer.archive import concat, winograd

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: one of {', '.join(LAYOUTS)}")
    legalizations = {"relax.concat": concat.legalize}  # zero_pipeline's legalizes the rest
    if layout in ("nhwc", "winograd"):
        mod = convert_layout(mod)
    if layout == "winograd":
        mod = transform.FoldConstant()(mod)  # the weights' transposes: constants Winograd transforms
        legalizations["relax.nn.conv2d"] = winograd.legalize
    with target:
        return tvm.transform.Sequential(
            [
                transform.DecomposeOpsForInference(),
                transform.CanonicalizeBindings(),
                transform.LegalizeOps(legalizations),
                zero_pipeline(),
                transform.AttachAttrLayoutFreeBuffers(),
            ]
        )(mod)


def pre_tuning_auto(mod: Any, target: Any, stream: TextIO) -> tuple[Any, str]:
    """``mod`` prepared as a search tunes it: NHWC with Winograd's 3x3 convolutions (the layout
    that tunes fastest; "nhwc" where no convolution is one Winograd computes), or NCHW where TVM's
    layout conversion fails on the graph (an operator it cannot carry a layout through): said on
    ``stream``, the build goes on. Returns the module and its layout."""
    from fastinfer.archive import winograd

    try:
        prepared = pre_tuning(mod, target, "winograd")
        return prepared, "winograd" if winograd.used(prepared) else "nhwc"  # else the two are one module
    except Exception as error:  # TVM's InternalError or ValueError, from inside ConvertLayout
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        print(f"convolutions stay NCHW: TVM could not convert this graph to NHWC ({reason})", file=stream)
        return pre_tuning(mod, target, "nchw"), "nchw"


def pre_tuning_covered(mod: Any, target: Any, database: Any, stream: TextIO) -> tuple[Any, str]:
    """``mod`` prepared in the layout whose tasks ``database`` covers best: a task without a record
    keeps a default schedule, tens of times slower than a tuned one. Winograd, then NHWC first, so
    that a tie (both covered) goes to the faster: tuned at an equal budget, NHWC ran in two thirds
    of NCHW's time, and Winograd's 3x3 convolutions in half of NHWC's. Not the records' own
    estimates: those are timed on whatever machine, under whatever load, tuned them (the shipped
    NCHW ones say 10 ms for EfficientNet-Lite0, the NHWC ones 30 ms, where side by side NHWC runs
    in 16 ms and NCHW in 22)."""
    converted, layout = pre_tuning_auto(mod, target, stream)
    if layout == "nchw":  # the graph does not convert to NHWC
        return converted, layout
    best = (len(untuned_tasks(converted, target, database)), converted, layout)
    for other in ("nhwc", "nchw") if layout == "winograd" else ("nchw",):
        if best[0] == 0:  # covered: a later layout can only tie, and a tie goes to the earlier
            break
        prepared = pre_tuning(mod, target, other)
        missing = len(untuned_tasks(prepared, target, database))
        if missing < best[0]:
            best = (missing, prepared, other)
    return best[1], best[2]


def convert_layout(mod: Any) -> Any:
    """``mod`` with its 2-D convolutions on NHWC activations and OHWI weights.

    With channels innermost a 1x1 convolution is a GEMM over contiguous channels, and a depthwise
    one reads a vector of channels per pixel. Relax's ConvertLayout carries the layout through the
    operators between convolutions and transposes only where it cannot (the model's input, and the
    flatten before the classifier); the weights' transposes fold into constants.

    The ONNX frontend lowers Clip (ReLU6) to TIR calls of ``maximum``/``minimum`` with scalar
    bounds, which ConvertLayout cannot see through: it would transpose to NCHW and back around
    every ReLU6, and those transposes would keep the clip out of the convolution's fused kernel.
    So such calls become Relax's own ``maximum``/``minimum`` first (the same computation). And
    ConvertLayout fails on dropout's (output, mask) tuple (SqueezeNet has one), which inference
    drops anyway (LegalizeOps makes it the identity): it becomes its input.
    """
    from tvm import relax
    from tvm.relax import transform

    mod = transform.FoldConstant()(mod)  # the clip bounds (NaN-checked by the frontend) -> scalars
    functions = [(var, func) for var, func in mod.functions_items() if isinstance(func, relax.Function)]
    for var, func in functions:  # main, or those of a batch computed image by image
        mod[var] = _make_rewriter()(mod).visit_expr(func)
    mod = transform.CanonicalizeBindings()(mod)
    mod = transform.DeadCodeElimination()(mod)
    return transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)


def _make_rewriter() -> Any:
    """An expression mutator for :func:`convert_layout`: ``call_tir(maximum|minimum, (x, scalar
    constant))``, as the ONNX frontend emits for Clip, becomes ``R.maximum``/``R.minimum``, and
    ``R.nn.dropout(x)`` becomes ``(x, x)``; defined lazily (TVM import)."""
    import re

    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    dropout = tvm.ir.Op.get("relax.nn.dropout")
    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op == dropout:
                return relax.Tuple([call.args[0], call.args[0]])
            if call.op != call_tir:
                return call
            # emit_te names the PrimFunc after the TOPI function: maximum, maximum1, ...
            name = re.fullmatch(r"(maximum|minimum)\d*", call.args[0].name_hint)
            args = list(call.args[1].fields)
            if name and len(args) == 2 and isinstance(args[1], tvm.ir.expr.Constant) and len(args[1].ty.shape) == 0:
                return ops[name.group(1)](args[0], args[1])
            return call

    return Rewriter


def apply_records(mod: Any, target: Any, database: Any, concats_in_place: bool = True) -> Any:
    """Apply the best schedules in ``database``, then prepack the weights (folded as constants) and
    let concatenations' inputs be written in place (:mod:`.concat_in_place`: after the schedules,
    which it keeps; ``concats_in_place`` False leaves the copies, to compare)."""
    import tvm
    from tvm.relax import transform

    from fastinfer.archive import concat_in_place

    with target, database:
        mod = tvm.transform.Sequential(
            [
                transform.MetaScheduleApplyDatabase(),
                transform.SplitLayoutRewritePreproc(),
                transform.LiftTransformParams(),
                transform.FoldConstant(),
            ]
        )(mod)
    return concat_in_place.write_in_place(mod) if concats_in_place else mod


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
    return [task for task in all_tasks(mod, target) if best_record(database, task.dispatched[0]) is None]


def record_coverage(mod: Any, target: Any, database: Any) -> tuple[int, int]:
    """How many tuning tasks ``mod`` has, and how many of them ``database`` holds no record for (the
    tasks extracted once)."""
    tasks = all_tasks(mod, target)
    return len(tasks), sum(1 for task in tasks if best_record(database, task.dispatched[0]) is None)


def best_record(database: Any, mod: Any | None) -> Any | None:
    """``database``'s best record of the workload ``mod`` (a tuning task's IRModule), or None (also
    for ``mod`` None). Asks before committing the workload, which would add it to a JSON database."""
    if mod is None or not database.has_workload(mod):
        return None
    top = database.get_top_k(database.commit_workload(mod), 1)
    return top[0] if top else None


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
    time_budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    terminal: bool | None = None,
    only: Callable[[Any], bool] | None = None,
    batch_sizes: list[int] | None = None,
) -> int:
    """Tune the tasks of ``mods`` missing from the database in ``records_dir``; keep the best of each.

    Each module must have gone through :func:`pre_tuning`; all are tuned in one run (one builder
    pool, one progress display), e.g. the same model at each batch size. Returns the number of tasks tuned (0: the
    database already covered the model, nothing ran). Only the best record per workload is written
    back, which keeps the database small enough to ship. ``total_trials`` below ``trials_per_task``
    times the task count lets the scheduler spend trials where latency gains most; ``retune`` searches
    tasks that already have records too (a better record replaces the old one). ``time_budget_s``
    stops the search once that much time (by ``clock``) has passed since the call; Ctrl-C stops it
    too. Either way, and on any exception, what was measured is merged into ``records_dir``.
    ``terminal`` forces the progress display's mode (default: whether ``stream`` is a terminal).
    ``only`` keeps the tasks whose workload (an IRModule) it holds true for, to spend a budget on
    some kinds of kernel (:func:`depthwise`, :func:`pointwise`; ``scripts/tune_records.py --depthwise-only``).
    ``batch_sizes``, the batch size of each of ``mods``: where one is 1, a search that ran to its end
    tries the batch-1 schedules at the larger batches too (:mod:`.lift`), for the search seldom
    finds a schedule that computes one image after another.
    """
    from tvm.s_tir import meta_schedule as ms

    stream = stream or sys.stderr
    started = clock()
    stop = Stop(None if time_budget_s is None else started + time_budget_s, clock)
    recover(records_dir, stream)
    database = load_database(records_dir)
    pick = all_tasks if retune else (lambda mod, target: untuned_tasks(mod, target, database))
    missing = _unique([task for mod in mods for task in pick(mod, target) if only is None or only(task.dispatched[0])])
    if not missing:
        return 0
    workers = workers or os.cpu_count() or 1
    total = min(total_trials or trials_per_task * len(missing), trials_per_task * len(missing))
    budget = f", for at most {_duration(time_budget_s)}" if time_budget_s is not None else ""
    print(
        f"tuning {label}: {len(missing)} tasks, up to {trials_per_task} trials each, {total} in all{budget}",
        file=stream,
        flush=True,
    )
    per_round = _trials_per_round(trials_per_task, total, len(missing))
    work = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=records_dir))
    builder = None
    progress = None
    settled: dict = {}
    with _held(work), _interrupt_stops(stop, stream):
        try:
            _reset_meta_schedule_handlers()
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                extracted_tasks=missing,
                work_dir=str(work),
                seed=0,
                strategy=_make_stoppable_search(_search_strategy(per_round), stop),
            )
            _quiet_task_loggers()  # MetaSchedule logs each task at INFO; the progress line says enough
            progress = Progress(
                total,
                label,
                stream,
                weights=list(weights),
                time_budget_s=time_budget_s,
                clock=clock,
                terminal=terminal,
                started=started,
            )
            builder = make_builder(workers, build_timeout_s)
            runner = ms.runner.LocalRunner(
                timeout_sec=30.0, evaluator_config=evaluator_config(target), initializer=_ignore_interrupts
            )
            for name in (WORKLOADS_FILE, RECORDS_FILE):  # the search starts from the best schedules known
                shutil.copyfile(records_dir / name, work / name)
            scratch = ms.database.JSONDatabase(work_dir=str(work))
            callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _make_progress_callback(progress)]
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
                measure_callbacks=callbacks,
            )
            settled = _time_rivals_again(work, records_dir, builder, stream, stop)
        except BaseException:
            stop.reason = stop.reason or "failed"
            raise
        finally:
            if builder is not None:
                builder.close()
            _merge_scratch(work, records_dir, stream, settled)  # done, stopped or failed: keep what was measured
            if progress is not None:
                ending = f"stopped: {stop.reason}" if stop.reason else "done"
                progress.finish(f"{ending}; records in {records_dir}")
    if batch_sizes and 1 in batch_sizes and not stop.requested():
        _lift_batch_one(mods, batch_sizes, target, records_dir, stream)
    return len(missing)


def evaluator_config(target: Any) -> Any:
    """How the search times a candidate: on a CPU, ten runs, each after every argument but the first
    left the caches, as :mod:`.remeasure` times them again (see :data:`.remeasure.FLUSH` for why);
    elsewhere MetaSchedule's default. EfficientNet-Lite0 searched so (600 trials, one core) ran in
    0.97x the time of its records searched warm."""
    from tvm.s_tir import meta_schedule as ms

    if target.kind.name != "llvm":
        return ms.runner.EvaluatorConfig()
    return ms.runner.EvaluatorConfig(number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True)


def _lift_batch_one(mods: list, batch_sizes: list[int], target: Any, records_dir: Path, stream: TextIO) -> None:
    from fastinfer.archive import lift

    one = mods[batch_sizes.index(1)]
    builder = make_builder()
    try:
        for mod, batch in zip(mods, batch_sizes, strict=True):
            if batch > 1:
                lift.lift(one, mod, batch, target, records_dir, stream, builder)
    finally:
        builder.close()


@contextlib.contextmanager
def _held(folder: Path) -> Iterator[None]:
    """Hold an flock on ``folder`` while a run uses it (see :func:`recover`)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _records_locked(records_dir: Path) -> Iterator[None]:
    """Serialize read-merge-write cycles on one records folder across processes."""
    records_dir.mkdir(parents=True, exist_ok=True)
    with open(records_dir / RECORDS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _time_rivals_again(work: Path, records_dir: Path, builder: Any, stream: TextIO, stop: Stop) -> dict:
    """The records that win when the search's best candidates and the records they would replace
    are timed again side by side (see :mod:`fastinfer.archive.remeasure`); skipped after Ctrl-C."""
    from fastinfer.archive import remeasure

    if stop.reason == "interrupted":
        return {}
    contending = remeasure.contenders(
        load_database(records_dir).get_all_tuning_records(), load_database(work).get_all_tuning_records()
    )
    return remeasure.settle(contending, builder, stream, stopped=lambda: stop.reason == "interrupted")


def _merge_scratch(work: Path, records_dir: Path, stream: TextIO, settled: dict | None = None) -> None:
    """Merge a run's scratch database into ``records_dir`` and remove it; on failure leave it for
    :func:`recover` to try again. ``settled``: records by workload that replace whatever else the
    two hold for it (the winners of :func:`_time_rivals_again`)."""
    try:
        _drop_torn_lines(work)
        with _records_locked(records_dir):
            _merge_into(records_dir, [records_dir, work], settled)
    except Exception as error:
        print(f"could not merge the tuning records in {work}: {error}; the next run tries again", file=stream)
        return
    shutil.rmtree(work, ignore_errors=True)


def recover(records_dir: Path, stream: TextIO | None = None) -> int:
    """Merge the scratch databases that killed runs left in ``records_dir``; returns how many.

    A live run holds an flock on its scratch folder, so only dead runs' scratch is taken.
    """
    found = 0
    if not records_dir.is_dir():
        return 0
    for work in sorted(records_dir.glob(f"{SCRATCH_PREFIX}*")):
        try:
            fd = os.open(work, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's
            print(f"merging the records of an interrupted tuning run ({work.name})", file=stream or sys.stderr)
            _merge_scratch(work, records_dir, stream or sys.stderr)
            found += 1
        finally:
            os.close(fd)
    return found


def _drop_torn_lines(folder: Path) -> None:
    """Remove what a kill mid-write leaves in a JSON database: a last line cut short, and records
    whose workload line was lost with it, so that TVM can load the rest."""
    workloads_path, records_path = folder / WORKLOADS_FILE, folder / RECORDS_FILE
    workloads = [line for line in _json_lines(workloads_path) if isinstance(line, list) and len(line) == 2]
    records = [
        line
        for line in _json_lines(records_path)
        if isinstance(line, list) and len(line) == 2 and isinstance(line[0], int) and 0 <= line[0] < len(workloads)
    ]
    workloads_path.write_text("".join(json.dumps(line) + "\n" for line in workloads))
    records_path.write_text("".join(json.dumps(line) + "\n" for line in records))


def _json_lines(path: Path) -> list:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def _trials_per_round(trials_per_task: int, total: int, tasks: int) -> int:
    """Candidates per search round of a task.

    With the full budget every task gets its trials in one round (the fastest way to spend them).
    With less, the first round-robin pass must leave trials for the scheduler to give to the tasks
    whose latency matters most, so it takes about half the budget.
    """
    if total >= trials_per_task * tasks:
        return min(64, trials_per_task)
    return max(4, min(64, trials_per_task, total // (2 * tasks)))


def _reset_meta_schedule_handlers() -> None:
    """Take the handlers off MetaSchedule's own logger before a run configures it again.

    MetaSchedule's logging set-up names every handler that logger already has in a logging config
    it then applies (``handler.get_name().format(...)``): a handler without a name, or one its new
    config does not define, fails the whole run ("'NoneType' object has no attribute 'format'"),
    as a second run in one process met once. It adds its own console and file handlers again."""
    import logging

    logging.getLogger("tvm.s_tir.meta_schedule").handlers.clear()


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
    """``mod``'s tuning tasks: its kernels, less those that come scheduled (:mod:`.concat`)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [task for task in tasks if not _scheduled(task.mod)]


def conv_reductions(workload: Any) -> list[dict[str, int]]:
    """The reduction extents of each convolution block of a tuning task's kernel, by TOPI's names
    (``rc`` input channels of a group, ``ry`` and ``rx`` the kernel's rows and columns)."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(workload)
    blocks = (sch.get(rv) for rv in sch.get_child_blocks(sch.get_sblock("root")))
    reduce = tirx.IterVar.CommReduce
    return [
        {iv.var.name.removeprefix("v_"): int(iv.dom.extent) for iv in block.iter_vars if iv.iter_type == reduce}
        for block in blocks
        if "conv2d" in block.name_hint
    ]


def depthwise(workload: Any) -> bool:
    """Whether a tuning task's kernel is a depthwise convolution: its reduction over input channels
    covers one channel, as a grouped convolution of one channel per group does."""
    return any(r.get("rc") == 1 for r in conv_reductions(workload))


def pointwise(workload: Any) -> bool:
    """Whether a tuning task's kernel is a pointwise (1x1) convolution over several channels: the
    matrix products that take most of a mobile network's time."""
    return any(r.get("ry") == r.get("rx") == 1 and r.get("rc", 1) > 1 for r in conv_reductions(workload))


def _scheduled(mod: Any) -> bool:
    return any(func.attrs and func.attrs.get("tirx.is_scheduled", False) for func in mod.functions.values())


def merge(source_dir: Path, records_dir: Path, time_rivals_on: TextIO | None = None) -> None:
    """Add the records in ``source_dir`` to the database in ``records_dir``, keeping the best of each:
    by their figures, or with ``time_rivals_on`` (a stream for progress), where both hold a record for
    a workload, by timing the two again here side by side (figures measured on another machine, or
    under another load, do not compare)."""
    from fastinfer.archive import remeasure

    with _records_locked(records_dir):
        settled = {}
        if time_rivals_on is not None:
            contending = remeasure.contenders(
                load_database(records_dir).get_all_tuning_records(),
                load_database(source_dir).get_all_tuning_records(),
                limit=1,
            )
            builder = make_builder() if contending else None
            try:
                settled = remeasure.settle(contending, builder, time_rivals_on)
            finally:
                if builder is not None:
                    builder.close()
        _merge_into(records_dir, [records_dir, source_dir], settled)


def best_records(records_dir: Path) -> dict:
    """The best record of each workload in the database in ``records_dir``, by workload key."""
    from tvm.s_tir import meta_schedule as ms

    from fastinfer.archive.remeasure import workload_key

    pruned = ms.database.MemoryDatabase()
    load_database(records_dir).dump_pruned(pruned)
    return {workload_key(record): record for record in pruned.get_all_tuning_records()}


def fill_gaps(source_dir: Path, records_dir: Path) -> None:
    """Add to the database in ``records_dir`` the records in ``source_dir`` of workloads it has no
    record of; where both hold one, ``records_dir``'s stays, whatever the figures say."""
    with _records_locked(records_dir):
        _merge_into(records_dir, [records_dir, source_dir], best_records(records_dir))


def overlay_found(records_dir: Path, seed_dir: Path, searched: list[Path], mcpu: str, one_core: bool) -> int:
    """Put into ``records_dir`` what searches seeded with ``seed_dir``'s records found: the best record
    of each workload in ``searched`` whose schedule differs from ``seed_dir``'s best (or that it
    lacks). Other records of ``records_dir`` stay as they are. Where two searches found one for the
    same workload, the faster by its figures is put. Returns how many records were put; raises
    ``ValueError`` (and puts none) when a record found was tuned for another ``mcpu`` or core count
    (workloads are the same on every level, so nothing else would tell such a folder apart).

    Schedules, not figures, are compared with the seed: the seed's figures were measured on another
    day, or core count, and the searches kept a seed's record unless theirs timed faster beside it.
    """
    from fastinfer.archive.remeasure import mean_s

    seeded = best_records(seed_dir)
    found: dict = {}
    for folder in searched:
        for key, record in best_records(folder).items():
            if key in seeded and str(record.trace) == str(seeded[key].trace):
                continue
            if key not in found or mean_s(record) < mean_s(found[key]):
                found[key] = record
    for record in found.values():
        tuned_for = record.target.attrs
        if tuned_for.get("mcpu") != mcpu or (tuned_for.get("num-cores") == 1) != one_core:
            cores = "one core" if one_core else "several cores"
            raise ValueError(f"a record was tuned for {record.target}, not {mcpu} on {cores}")
    replace_records(records_dir, found)
    return len(found)


def replace_records(records_dir: Path, chosen: dict) -> None:
    """Put ``chosen`` (records by workload key) into ``records_dir`` in place of what it holds for
    those workloads; its other records stay as they are."""
    if chosen:
        with _records_locked(records_dir):
            _merge_into(records_dir, [records_dir], chosen)


def _merge_into(records_dir: Path, sources: list[Path], settled: dict | None = None) -> None:
    from tvm.s_tir import meta_schedule as ms

    from fastinfer.archive.remeasure import workload_key

    merged = ms.database.MemoryDatabase()
    for source in sources:
        load_database(source).dump_pruned(merged)
    if settled:
        chosen = ms.database.MemoryDatabase()
        records = [r for r in merged.get_all_tuning_records() if workload_key(r) not in settled]
        for record in [*records, *settled.values()]:
            workload = chosen.commit_workload(record.workload.mod)
            chosen.commit_tuning_record(
                ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
            )
        merged = chosen
    _write_pruned(merged, records_dir)


def export_subset(mods: list, target: Any, database: Any, dest: Path) -> int:
    """Write the best record of each task of ``mods`` found in ``database`` to a database in ``dest``."""
    from tvm.s_tir import meta_schedule as ms

    subset = ms.database.JSONDatabase(work_dir=str(dest))
    count = 0
    for mod in mods:
        for task in all_tasks(mod, target):
            workload_mod = task.dispatched[0]
            record = best_record(database, workload_mod)
            if record is None:
                continue
            workload = subset.commit_workload(workload_mod)
            subset.commit_tuning_record(
                ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)
            )
            count += 1
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        (dest / name).touch()
    return count


def task_workloads(mod: Any, target: Any) -> dict[str, int]:
    """The workloads of ``mod``'s tuning tasks, as the JSON database keys them (structural hash),
    each with how many times the model runs it."""
    from tvm.s_tir import meta_schedule as ms

    keys = ms.database.MemoryDatabase()  # hashes the workloads without writing anything
    workloads: dict[str, int] = {}
    for task in all_tasks(mod, target):
        key = str(keys.commit_workload(task.dispatched[0]).as_json()[0])
        workloads[key] = workloads.get(key, 0) + int(task.weight)
    return workloads


def estimated_latency(workloads: dict[str, int], workloads_json: str, records_json: str) -> tuple[int, float]:
    """How many of ``workloads`` have a record in a JSON database's text, and the sum over those of
    the best record's mean run time (seconds) times the workload's use. Plain JSON: no TVM needed."""
    keys = [line[0] for line in _parse_lines(workloads_json)]
    best: dict[str, float] = {}
    for index, (_, run_secs, *_) in _parse_lines(records_json):
        if run_secs and 0 <= index < len(keys):
            mean = sum(run_secs) / len(run_secs)
            best[keys[index]] = min(mean, best.get(keys[index], float("inf")))
    covered = [key for key in workloads if key in best]
    return len(covered), sum(best[key] * workloads[key] for key in covered)


def _parse_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
