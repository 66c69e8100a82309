"""Archives whose manifest names a path that is not one of their own, hashed files: refused at load.

Without the check, ``labels_file: /etc/passwd`` served that file's lines as class names, and a
library path outside the archive loaded and ran native code that no hash covered.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_archive import edit_manifest, load_fails, tiny_model

from fastinfer.archive.load import read_manifest
from fastinfer.archive.manifest import ArchiveError
from fastinfer.archive.pack import BuildOptions, build_archive

OUTSIDE = ["/etc/passwd", "../../../../etc/passwd", "lib/../../x", "lib", "manifest.json"]


@pytest.fixture
def archive(tmp_path) -> Path:
    """A small, sound archive (batch size 1, no labels, untuned), for a test to spoil."""
    output = tmp_path / "tiny.fia"
    build_archive(tiny_model(tmp_path / "m.onnx"), output, BuildOptions(name="tiny", cache_dir=str(tmp_path / "c")))
    return output


@pytest.mark.parametrize("labels_file", OUTSIDE)
def test_labels_file_outside_the_archive_is_refused(archive, tmp_path, labels_file):
    edit_manifest(archive, labels_file=labels_file, top_k=1)
    load_fails(archive, tmp_path, rf"labels_file is '{labels_file}', not a file listed \(and hashed\)")


@pytest.mark.parametrize("size", ["1", "any"])
def test_library_outside_the_archive_is_refused(archive, tmp_path, size):
    edit_manifest(archive, libraries={size: "/elsewhere/model.so"})
    load_fails(archive, tmp_path, rf"library '{size}' is '/elsewhere/model.so', not a file listed")


def test_library_of_a_further_target_outside_the_archive_is_refused(archive, tmp_path):
    extra = {"target": {"kind": "cuda", "arch": "sm_90"}, "libraries": {"any": "../cuda.so"}, "verified": {}}
    edit_manifest(archive, more_targets={"cuda": extra})
    load_fails(archive, tmp_path, r"cuda library 'any' is '\.\./cuda\.so', not a file listed")


@pytest.mark.parametrize("field", ["workloads_file", "records_file"])
def test_tuning_records_outside_the_archive_are_refused(archive, tmp_path, field):
    tuning = {
        "trials_per_task": 0,
        "tasks": 1,
        "tasks_tuned_now": 0,
        "workloads_file": "lib/model-b1.so",
        "records_file": "lib/model-b1.so",
        "records_source": "cache",
    }
    edit_manifest(archive, tuning={**tuning, field: "/var/lib/records.json"})
    load_fails(archive, tmp_path, rf"tuning {field} is '/var/lib/records\.json', not a file listed")


def test_a_path_that_is_not_a_string_is_refused(archive, tmp_path):
    edit_manifest(archive, labels_file=["labels.txt"])
    load_fails(archive, tmp_path, r"labels_file is \['labels\.txt'\], not a file listed")


def test_inspect_refuses_it_too(archive):
    edit_manifest(archive, labels_file="/etc/passwd")
    with pytest.raises(ArchiveError, match=rf"{archive}: the manifest's labels_file is '/etc/passwd'"):
        read_manifest(archive)
