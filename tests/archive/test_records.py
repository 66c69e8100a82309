"""Tuning records without a search: a killed run's scratch merged, records merged when a run fails,
export and import, builds from stored records alone, one-core records, budgets as typed."""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import shutil

import pytest
from test_tuning import dense_model

from fastinfer import cli
from fastinfer.archive import pack, shipped, tuning
from fastinfer.archive.commands import parse_duration
from fastinfer.archive.manifest import ArchiveError

SHIPPED = shipped.SHIPPED_RECORDS / "x86-64-v4"
V4 = json.dumps({"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": 2})


def shipped_copy(folder, source=SHIPPED):
    """Real records (the shipped x86-64-v4 ones), as a plain JSON database in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE):
        (folder / name).write_bytes(gzip.decompress((source / f"{name}.gz").read_bytes()))
    return tuning.database_summary(folder)


def test_a_killed_runs_scratch_is_merged_by_the_next_run(tmp_path):
    records = tmp_path / "records"
    scratch = records / ".tuning-killed"
    summary = shipped_copy(scratch)
    with open(scratch / tuning.RECORDS_FILE, "a") as file:
        file.write("[0, [[[], []], [0.0")  # kill -9 mid-write: a last line cut short
    live = records / ".tuning-live"
    shipped_copy(live)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a run still going holds its scratch: not taken
        assert tuning.recover(records, stream=io.StringIO()) == 1
    finally:
        os.close(fd)
    assert not scratch.exists() and live.exists()
    assert tuning.database_summary(records) == summary  # every record, the torn line dropped


def test_a_failed_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """An exception (or a second Ctrl-C) inside the search still merges the scratch database."""
    from tvm.s_tir import meta_schedule as ms

    dense_model(tmp_path / "dense.onnx")
    records = tmp_path / "records"
    found = tmp_path / "found"
    shipped_copy(found)

    def tune_tasks_then_fail(*, database, **kwargs):
        ms.database.JSONDatabase(work_dir=str(found)).dump_pruned(database)  # as if these were measured
        raise RuntimeError("the search broke")

    monkeypatch.setattr(ms.tune, "tune_tasks", tune_tasks_then_fail)
    code = cli.main(["tune", str(tmp_path / "dense.onnx"), "--records", str(records), "--trials-per-task", "4"])
    assert code == 1 and "tuning failed: the search broke" in capsys.readouterr().err
    assert tuning.database_summary(records) == tuning.database_summary(found)
    assert not list(records.glob(".tuning-*"))


def test_records_export_and_import(tmp_path, capsys):
    source = tmp_path / "tuned"
    summary = shipped_copy(source)
    flags = ["--target", V4, "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(["records", "import", str(source), *flags]) == 0
    folder = pack.records_folder(str(tmp_path / "cache"), json.loads(V4))
    assert tuning.database_summary(folder) == summary
    assert cli.main(["records", "export", str(tmp_path / "out"), *flags]) == 0
    assert tuning.database_summary(tmp_path / "out") == summary
    assert f"{summary['records']} records" in capsys.readouterr().out
    # Again: every task now has the same record on both sides, so nothing is timed (nor by figures).
    assert cli.main(["records", "import", str(source), *flags]) == 0
    assert cli.main(["records", "import", str(source), "--by-figures", *flags]) == 0
    assert tuning.database_summary(folder) == summary
    assert "timing" not in capsys.readouterr().out

    gzipped = tmp_path / "gz"  # the shipped layout imports as well
    gzipped.mkdir()
    for name in (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE):
        shutil.copy(SHIPPED / f"{name}.gz", gzipped)
    assert cli.main(["records", "import", str(gzipped), "--records", str(tmp_path / "r2"), "--target", V4]) == 0
    assert tuning.database_summary(tmp_path / "r2") == summary

    v3 = json.dumps({"kind": "llvm", "mcpu": "x86-64-v3"})
    assert cli.main(["records", "import", str(source), "--target", v3, "--records", str(tmp_path / "r3")]) == 1
    assert "tuned for x86-64-v4, not x86-64-v3" in capsys.readouterr().err
    assert cli.main(["records", "import", str(tmp_path / "nothing"), *flags]) == 1
    assert "holds no MetaSchedule records" in capsys.readouterr().err


def test_stored_records_only_never_tunes(tmp_path, monkeypatch, capsys):
    dense_model(tmp_path / "dense.onnx")

    def no_tuning(*args, **kwargs):
        raise AssertionError("--stored-records-only tuned")

    monkeypatch.setattr(tuning, "tune", no_tuning)
    build = ["archive", str(tmp_path / "dense.onnx"), "--name", "dense", "--records", str(tmp_path / "empty")]
    assert cli.main([*build, "--stored-records-only", "-o", str(tmp_path / "a.fia")]) == 0
    captured = capsys.readouterr()
    assert "stored records cover 0 of 1 tasks" in captured.err
    assert "1 tasks have no tuning record; they run with default schedules" in captured.err
    assert "batch 1: 1 tasks, 0 with records" in captured.out
    assert cli.main([*build, "--stored-records-only", "--tune-trials", "2", "-o", str(tmp_path / "b.fia")]) == 1
    assert "never tunes" in capsys.readouterr().err


def test_targets_take_their_core_counts_records_first_then_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "SHIPPED_RECORDS", tmp_path)
    level = tmp_path / "x86-64-v4"
    one, two, four = ({"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": n} for n in (1, 2, 4))
    assert shipped.best_folder(one) is None and shipped.folders_for(two) == [] and shipped.digest(two) == ""
    for folder in (level, level / "1-core"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE):
            (folder / f"{name}.gz").write_bytes(gzip.compress(f"{folder.name}\n".encode()))
    assert shipped.folders_for(one) == [level / "1-core", level]
    assert shipped.folders_for(two) == shipped.folders_for(four) == [level, level / "1-core"]
    assert shipped.best_folder(one) == level / "1-core" and shipped.best_folder(two) == level
    assert shipped.digest(one) != shipped.digest(two)
    before = shipped.digest(two)
    (level / "1-core" / f"{tuning.RECORDS_FILE}.gz").write_bytes(gzip.compress(b"retuned\n"))
    assert shipped.digest(two) != before  # new one-core records reach several-core builds too
    shutil.rmtree(level / "1-core")
    assert shipped.folders_for(one) == [level]  # no one-core records shipped: the level's

    # the cache keeps one-core records apart; other core counts share theirs
    assert pack._records_dir("c", one) != pack._records_dir("c", two) == pack._records_dir("c", four)


def test_records_of_another_core_count_fill_only_the_gaps(tmp_path):
    from fastinfer.archive import remeasure

    def best(folder):
        return {
            remeasure.workload_key(r): remeasure.mean_s(r)
            for r in tuning.load_database(folder).get_all_tuning_records()
        }

    several, one = tmp_path / "several", tmp_path / "one"
    shipped_copy(several)
    shipped_copy(one, SHIPPED / "1-core")
    own, other = best(several), best(one)
    shared = own.keys() & other.keys()
    assert shared and other.keys() - own.keys()  # the shipped folders overlap, and differ
    tuning.fill_gaps(one, several)
    merged = best(several)
    assert merged.keys() == own.keys() | other.keys()
    assert all(merged[key] == own[key] for key in own)  # a workload held keeps its record, faster rival or not
    assert all(merged[key] == other[key] for key in other.keys() - own.keys())


def test_the_tasks_a_build_takes_from_the_other_core_counts_records_are_told_apart(tmp_path, monkeypatch):
    """``scripts/tune_records.py --fallbacks-only`` searches what the folder for a core count lacks: a
    workload of the level's several-core records is recorded there, one only the one-core folder holds
    is not, and with no folder for the core count nothing is."""
    several, one = tmp_path / "several", tmp_path / "one"
    shipped_copy(several)
    shipped_copy(one, SHIPPED / "1-core")
    own = {r.workload.mod for r in tuning.load_database(several).get_all_tuning_records()}
    other = tuning.load_database(one).get_all_tuning_records()
    recorded = shipped.recorded_by_own_folder({"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": 2})
    assert all(recorded(workload) for workload in own)
    fallbacks = [r.workload.mod for r in other if not recorded(r.workload.mod)]
    assert 0 < len(fallbacks) < len(other)  # the one-core folder holds both kinds

    monkeypatch.setattr(shipped, "SHIPPED_RECORDS", tmp_path)  # no folder for x86-64-v4 at all
    nowhere = shipped.recorded_by_own_folder({"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": 2})
    assert not any(nowhere(workload) for workload in own)


def retargeted(record, target):
    """``record``'s schedule, as a search for ``target`` would have found it."""
    from tvm.s_tir import meta_schedule as ms

    return ms.database.TuningRecord(record.trace, record.workload, record.run_secs, target, record.args_info)


def write_shipped(folder, records):
    """A shipped folder (gzipped JSON database) holding ``records``."""
    from tvm.s_tir import meta_schedule as ms

    plain = folder / "plain"
    database = tuning.load_database(plain)
    for r in records:
        workload = database.commit_workload(r.workload.mod)
        database.commit_tuning_record(ms.database.TuningRecord(r.trace, workload, r.run_secs, r.target, r.args_info))
    for name in (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE):
        (folder / f"{name}.gz").write_bytes(gzip.compress((plain / name).read_bytes()))
    shutil.rmtree(plain)


def test_shipping_a_search_puts_in_only_the_schedules_it_found(tmp_path, monkeypatch):
    """scripts/ship_records.py: a search seeded with what a one-core build reads, which found new
    schedules for two workloads, changes the one-core folder by those two and nothing else."""
    several, one = tmp_path / "several", tmp_path / "one"
    shipped_copy(several)
    shipped_copy(one, SHIPPED / "1-core")
    all_core, one_core = tuning.best_records(several), tuning.best_records(one)
    differ = [k for k in all_core.keys() & one_core.keys() if str(all_core[k].trace) != str(one_core[k].trace)]
    alone = sorted(one_core.keys() - all_core.keys())  # one-core only: several-core builds fill gaps with them
    differ, alone = sorted(differ)[:3], alone[:3]
    assert len(differ) == 3 and len(alone) == 3

    # a small package: real records of six workloads, three scheduled differently for several cores
    monkeypatch.setattr(shipped, "SHIPPED_RECORDS", tmp_path / "package")
    level = tmp_path / "package" / "x86-64-v4"
    (level / "1-core").mkdir(parents=True)
    write_shipped(level / "1-core", [one_core[k] for k in differ + alone])
    write_shipped(level, [all_core[k] for k in differ])
    target = {"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": 1}
    several_core_bytes = [(level / f"{name}.gz").read_bytes() for name in shipped.FILES]

    searched = tmp_path / "searched"  # seeded as scripts/ship_records.py --seed does, then searched:
    searched.mkdir()
    shipped.unpack(shipped.folders_for(target), searched)
    assert tuning.best_records(searched).keys() == set(differ + alone)
    found = {k: retargeted(all_core[k], one_core[k].target) for k in differ[:2]}  # new schedules for two
    tuning._merge_into(searched, [searched], found)
    for wrong in ({**target, "num-cores": 2}, {**target, "mcpu": "x86-64-v3"}):  # tuned for another target
        with pytest.raises(ValueError, match="a record was tuned for"):
            shipped.put_found(wrong, [searched])
    assert not (tmp_path / "package" / "x86-64-v3").exists()

    assert shipped.put_found(target, [searched]) == 2
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    shipped.unpack([level / "1-core"], unpacked)
    now = tuning.best_records(unpacked)
    assert now.keys() == set(differ + alone)
    for key in now:
        expected = found[key] if key in found else one_core[key]
        assert str(now[key].trace) == str(expected.trace)
    assert [(level / f"{name}.gz").read_bytes() for name in shipped.FILES] == several_core_bytes

    # shipped again: nothing found that is not in (the seed now holds the two); no file rewritten
    one_core_bytes = [(level / "1-core" / f"{name}.gz").read_bytes() for name in shipped.FILES]
    assert shipped.put_found(target, [searched]) == 0
    assert [(level / "1-core" / f"{name}.gz").read_bytes() for name in shipped.FILES] == one_core_bytes


def test_tune_time_as_typed():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    for bad in ("", "soon", "1d", "m"):
        with pytest.raises(ArchiveError):
            parse_duration(bad)
