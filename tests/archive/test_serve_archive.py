"""Archives served by a real in-process server: by --models NAME=PATH.fia and from a model store."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import numpy as np
import onnx
import pytest
from conftest import fastinfer_segments
from test_archive import LIGHT, expected_output, light_input

from fastinfer.archive.pack import BuildOptions, build_archive
from fastinfer.archive.store import store_models
from fastinfer.config import Config
from fastinfer.server.main import Server


@pytest.fixture(scope="module")
def squeezenet_archive(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("served") / "sq.fia"
    cache = tmp_path_factory.mktemp("served-cache")
    build_archive(LIGHT / "light_squeezenet.onnx", output, BuildOptions(name="squeezenet", cache_dir=str(cache)))
    return output


async def serve_and_check(config: Config, names: list[str]) -> None:
    before = fastinfer_segments()
    server = Server(config)
    await server.start()
    try:
        await server.wait_ready(120)
        sample = light_input(onnx.load(str(LIGHT / "light_squeezenet.onnx")))
        expected = expected_output("squeezenet")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
            for name in names:
                async with http.post(
                    f"/predictions/{name}",
                    data=sample.astype("<f4").tobytes(),
                    headers={"Content-Type": "application/octet-stream"},
                ) as response:
                    assert response.status == 200, await response.text()
                    body = await response.json()
                (output,) = body["outputs"]
                assert output["shape"] == list(expected.shape)
                got = np.asarray(output["data"], np.float32).reshape(expected.shape)
                np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)
    finally:
        await server.stop()
    assert fastinfer_segments() == before, "shared memory left behind"


def config(tmp_path: Path, **fields) -> Config:
    return Config(
        http_port=0,
        management_port=0,
        binary_port=0,
        cache_dir=str(tmp_path / "cache"),
        shm_slot_bytes=4 << 20,
        max_body_bytes=4 << 20,
        shm_slots_per_worker=4,
        worker_start_timeout_s=120,
        **fields,
    )


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_serve_an_archive_by_name(squeezenet_archive, tmp_path):
    await serve_and_check(config(tmp_path, models=(f"sq={squeezenet_archive}",)), ["sq"])


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_serve_a_model_store_with_versions_side_by_side(squeezenet_archive, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for version in ("1", "2"):
        shutil.copy(squeezenet_archive, store / f"squeezenet-{version}.fia")
    assert set(store_models(store)) == {"squeezenet", "squeezenet-1", "squeezenet-2"}
    assert store_models(store)["squeezenet"].endswith("squeezenet-2.fia")
    await serve_and_check(config(tmp_path, model_store=str(store)), ["squeezenet", "squeezenet-1"])


def test_store_versions_compare_as_numbers(tmp_path):
    for name in ("m-2.fia", "m-10.fia", "plain.fia", "notes.txt"):
        (tmp_path / name).touch()
    models = store_models(tmp_path)
    assert models["m"].endswith("m-10.fia")
    assert set(models) == {"m", "m-2", "m-10", "plain"}
