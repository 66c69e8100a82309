"""Registrations that name files outside the model store, or paths no file can have: one 400 for all.

With a store, an absent file and a file that may not be served get the same answer, so that the
management port tells nothing about the files outside the store (``/etc/shadow``).
"""

from __future__ import annotations

import logging
import os

import aiohttp
import pytest
from conftest import running_server

from fastinfer.errors import BadRequest
from fastinfer.server.fronts.management import resolve_model_path


@pytest.fixture
def store(tmp_path):
    """A model store holding two models (one behind a symlink that stays inside), and beside it a
    file outside the store, reachable through ``..``, its absolute path, and a symlink."""
    store = tmp_path / "store"
    (store / "sub").mkdir(parents=True)
    (store / "inside.onnx").write_bytes(b"model")
    (store / "sub" / "inner.onnx").write_bytes(b"model")
    os.symlink(store / "inside.onnx", store / "alias.onnx")
    (tmp_path / "secret.onnx").write_bytes(b"not yours")
    os.symlink(tmp_path / "secret.onnx", store / "escape.onnx")
    return store


def refused(path: str) -> str:
    """The one message for every refusal of ``path`` with a store."""
    return f'"path": no model file {path!r} in the model store'


@pytest.mark.parametrize("name", ["inside.onnx", "sub/inner.onnx", "./sub/inner.onnx", "alias.onnx"])
def test_a_store_serves_files_inside_it(store, name):
    assert resolve_model_path(name, str(store)) == str((store / name).resolve())


@pytest.mark.parametrize(
    "path",
    ["SECRET", "../secret.onnx", "sub/../../secret.onnx", "escape.onnx", "absent.onnx", "/nonexistent/x.onnx", "sub"],
)
def test_a_store_refuses_all_else_with_one_answer(store, path):
    path = path.replace("SECRET", str(store.parent / "secret.onnx"))
    with pytest.raises(BadRequest) as refusal:
        resolve_model_path(path, str(store))
    assert (refusal.value.status, refusal.value.code, refusal.value.message) == (400, "bad_request", refused(path))


def test_without_a_store_any_path_may_be_registered(store):
    secret = store.parent / "secret.onnx"
    assert resolve_model_path(str(secret), "") == str(secret)
    with pytest.raises(BadRequest, match="no model file"):
        resolve_model_path(str(store.parent / "absent.onnx"), "")


@pytest.mark.parametrize("with_store", [True, False], ids=["store", "no-store"])
@pytest.mark.parametrize("path", ["model\x00.onnx", "a" * 5000, "d/" * 2500], ids=["nul", "long", "deep"])
def test_paths_no_file_can_have_are_bad_requests(store, with_store, path):
    with pytest.raises(BadRequest, match='"path" must be a file name of at most 4096 characters, without NUL'):
        resolve_model_path(path, str(store) if with_store else "")


def test_unreadable_folders_say_no_file(store, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pathlib.Path.stat", denied)
    with pytest.raises(BadRequest, match="no model file"):
        resolve_model_path("/root/secret/model.onnx", "")


@pytest.mark.parametrize("with_store", [True, False], ids=["store", "no-store"])
async def test_registrations_outside_or_impossible_answer_json_400(tmp_path, store, with_store, caplog):
    caplog.set_level(logging.DEBUG)
    settings = {"models": ("echo=echo:float32:16",), "shm_slot_bytes": 1 << 16, "shm_slots_per_worker": 2}
    if with_store:
        settings["model_store"] = str(store)
    impossible = ["nul\x00.onnx", "x" * 5000]
    outside = [str(tmp_path / "secret.onnx"), str(tmp_path / "absent.onnx"), "../secret.onnx", "escape.onnx"]
    async with (
        running_server(tmp_path / "cache", **settings) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as manage,
    ):
        pids = [w.pid for w in server.supervisor.workers]
        answers = {}
        for path in impossible + (outside if with_store else []):
            async with manage.post("/models", json={"name": "m", "path": path}) as response:
                assert response.content_type == "application/json", path[:20]
                answers[path] = (response.status, await response.json())
        assert [w.pid for w in server.supervisor.workers] == pids, "no registration started a worker"
        async with manage.get("/models") as response:
            assert await response.json() == {"models": [{"modelName": "echo"}]}
    for path in impossible:
        status, body = answers[path]
        assert status == 400 and body["code"] == "bad_request" and "without NUL" in body["message"]
    if with_store:
        for path in outside:
            assert answers[path] == (400, {"code": "bad_request", "message": refused(path)})
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
