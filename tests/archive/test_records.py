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
from fastinfer.archive import pack, tuning
from fastinfer.archive.commands import parse_duration
from fastinfer.archive.manifest import ArchiveError

SHIPPED = pack.SHIPPED_RECORDS / "x86-64-v4"
V4 = json.dumps({"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": 2})


def shipped_copy(folder):
    """Real records (the shipped x86-64-v4 ones), as a plain JSON database in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE):
        (folder / name).write_bytes(gzip.decompress((SHIPPED / f"{name}.gz").read_bytes()))
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
    monkeypatch.setattr(pack, "SHIPPED_RECORDS", tmp_path)
    level = tmp_path / "x86-64-v4"
    one, two, four = ({"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": n} for n in (1, 2, 4))
    assert pack.shipped_records(one) is None and pack.shipped_folders(two) == [] and pack.shipped_digest(two) == ""
    for folder in (level, level / "1-core"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE):
            (folder / f"{name}.gz").write_bytes(gzip.compress(f"{folder.name}\n".encode()))
    assert pack.shipped_folders(one) == [level / "1-core", level]
    assert pack.shipped_folders(two) == pack.shipped_folders(four) == [level, level / "1-core"]
    assert pack.shipped_records(one) == level / "1-core" and pack.shipped_records(two) == level
    assert pack.shipped_digest(one) != pack.shipped_digest(two)
    before = pack.shipped_digest(two)
    (level / "1-core" / f"{tuning.RECORDS_FILE}.gz").write_bytes(gzip.compress(b"retuned\n"))
    assert pack.shipped_digest(two) != before  # new one-core records reach several-core builds too
    shutil.rmtree(level / "1-core")
    assert pack.shipped_folders(one) == [level]  # no one-core records shipped: the level's

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
    one.mkdir()
    for name in (tuning.WORKLOADS_FILE, tuning.RECORDS_FILE):
        (one / name).write_bytes(gzip.decompress((SHIPPED / "1-core" / f"{name}.gz").read_bytes()))
    own, other = best(several), best(one)
    shared = own.keys() & other.keys()
    assert shared and other.keys() - own.keys()  # the shipped folders overlap, and differ
    tuning.fill_gaps(one, several)
    merged = best(several)
    assert merged.keys() == own.keys() | other.keys()
    assert all(merged[key] == own[key] for key in own)  # a workload held keeps its record, faster rival or not
    assert all(merged[key] == other[key] for key in other.keys() - own.keys())


def test_tune_time_as_typed():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    for bad in ("", "soon", "1d", "m"):
        with pytest.raises(ArchiveError):
            parse_duration(bad)
