"""Rival records timed again side by side: a lucky figure does not keep a slower schedule.

A 128x128 matmul's naive loop nest (a float reduction chain per element) against the same with its
reduction loop moved outward (the inner loop runs along rows, which LLVM vectorizes): several times
faster, whatever the load. The naive one carries a figure from a "quiet moment" far below the
other's; timed again in turns, the faster schedule wins, with its new timings. Every run is timed
with the kernel's arguments but the first out of the caches, as inside a model.
"""

from __future__ import annotations

import io

import pytest

tvm = pytest.importorskip("tvm")

from tvm import s_tir, te  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from fastinfer.archive import remeasure, tuning  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 1})


def matmul_schedules():
    a = te.placeholder((128, 128), name="A")
    b = te.placeholder((128, 128), name="B")
    k = te.reduce_axis((0, 128), name="k")
    c = te.compute((128, 128), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    naive = s_tir.Schedule(mod)
    naive.get_loops(naive.get_sblock("C"))  # as it stands (a record's trace is never empty)
    rows = s_tir.Schedule(mod)
    i, j, reduction = rows.get_loops(rows.get_sblock("C"))
    rows.reorder(i, reduction, j)
    return mod, naive.trace, rows.trace


def record(database, mod, trace, seconds):
    workload = database.commit_workload(mod)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    return ms.database.TuningRecord(trace, workload, [seconds], TARGET, args)


def test_the_faster_schedule_wins_over_a_lucky_figure(in_process_builder):
    mod, naive, rows = matmul_schedules()
    database = ms.database.MemoryDatabase()
    kept = record(database, mod, naive, 1e-6)  # its figure: a quiet moment, or a wrong one
    found = record(database, mod, rows, 1e-3)
    failed = record(database, mod, rows, 1e10)  # how MetaSchedule records a failed run

    contending = remeasure.contenders([kept], [found, failed, kept])
    assert list(contending) == [remeasure.workload_key(kept)]
    assert len(contending[remeasure.workload_key(kept)]) == 2  # the failed one and the duplicate are out

    stream = io.StringIO()
    winners = remeasure.settle(contending, in_process_builder, stream)
    winner = winners[remeasure.workload_key(kept)]
    assert str(winner.trace.as_json()) == str(rows.as_json())
    assert len(winner.run_secs) == remeasure.ROUNDS and 0 < remeasure.mean_s(winner) < 1
    assert "timing the best schedules of 1 tasks again" in stream.getvalue()


def test_every_timed_run_starts_with_the_caches_flushed(in_process_builder, monkeypatch):
    """Each run of each round is preceded by the preprocessing that flushes a kernel's arguments but
    its first from the caches (counted here through a function of our own in its place)."""
    mod, naive, rows = matmul_schedules()
    database = ms.database.MemoryDatabase()
    contending = remeasure.contenders([record(database, mod, naive, 1e-6)], [record(database, mod, rows, 1e-3)])
    flushed = []
    tvm.register_global_func("test_remeasure.count_flush", lambda *args: flushed.append(len(args)), override=True)
    monkeypatch.setattr(remeasure, "FLUSH", "test_remeasure.count_flush")
    assert remeasure.settle(contending, in_process_builder, io.StringIO())
    assert flushed == [3] * (2 * remeasure.ROUNDS * remeasure.COLD_RUNS)  # A, B and C of each run


def test_the_search_times_cpu_candidates_as_settle_does():
    cold = tuning.evaluator_config(TARGET)
    assert (cold.number, cold.min_repeat_ms, cold.enable_cpu_cache_flush) == (1, 0, True)
    assert not tuning.evaluator_config(tvm.target.Target("cuda")).enable_cpu_cache_flush


def test_nothing_to_settle_where_the_search_found_nothing_new(in_process_builder):
    mod, naive, rows = matmul_schedules()
    database = ms.database.MemoryDatabase()
    kept = record(database, mod, naive, 1e-3)
    assert remeasure.contenders([kept], [kept]) == {}  # the scratch's copy of the kept record
    assert remeasure.contenders([], [record(database, mod, rows, 1e-3)]) == {}  # a task's first record
    assert remeasure.settle({}, in_process_builder, io.StringIO()) == {}


def test_a_stop_leaves_the_rest_to_the_search(in_process_builder):
    mod, naive, rows = matmul_schedules()
    database = ms.database.MemoryDatabase()
    contending = remeasure.contenders([record(database, mod, naive, 1e-6)], [record(database, mod, rows, 1e-3)])
    assert remeasure.settle(contending, in_process_builder, io.StringIO(), stopped=lambda: True) == {}


def test_the_merge_keeps_the_settled_record_over_a_lower_figure(tmp_path):
    mod, naive, rows = matmul_schedules()
    folder, scratch = tmp_path / "records", tmp_path / "records" / ".tuning-x"
    for where, trace, seconds in ((folder, naive, 1e-6), (scratch, rows, 1e-3)):
        database = tuning.load_database(where)
        database.commit_tuning_record(record(database, mod, trace, seconds))
    settled_database = ms.database.MemoryDatabase()
    settled = record(settled_database, mod, rows, 2e-4)
    tuning._merge_into(folder, [folder, scratch], {remeasure.workload_key(settled): settled})
    (kept,) = tuning.load_database(folder).get_all_tuning_records()
    assert str(kept.trace.as_json()) == str(rows.as_json()) and remeasure.mean_s(kept) == pytest.approx(2e-4)


def test_an_import_times_rival_records_again_unless_told_to_trust_figures(tmp_path):
    mod, naive, rows = matmul_schedules()
    for name, time_rivals in (("timed", True), ("figures", False)):
        folder, source = tmp_path / name / "records", tmp_path / name / "imported"
        for where, trace, seconds in ((folder, naive, 1e-6), (source, rows, 1e-3)):
            database = tuning.load_database(where)
            database.commit_tuning_record(record(database, mod, trace, seconds))
        stream = io.StringIO()
        tuning.merge(source, folder, time_rivals_on=stream if time_rivals else None)
        (kept,) = tuning.load_database(folder).get_all_tuning_records()
        assert str(kept.trace.as_json()) == str((rows if time_rivals else naive).as_json()), name
        assert ("timing the best schedules of 1 tasks again" in stream.getvalue()) == time_rivals
