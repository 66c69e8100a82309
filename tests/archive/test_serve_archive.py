"""Archives served by a real in-process server: by --models NAME=PATH.fia and from a model store."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import aiohttp
import numpy as np
import onnx
import pytest
from conftest import fastinfer_segments, running_server
from onnx import TensorProto, helper
from test_archive import LIGHT, expected_output, light_input

from fastinfer.archive.pack import BuildOptions, build_archive
from fastinfer.archive.store import store_models
from fastinfer.client import AsyncClient
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
        grpc_port=0,
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


def difference(path: Path) -> Path:
    """``out/d = in/a - in.b`` over 3 floats a sample, batch axis symbolic: names that are no C identifiers."""
    graph = helper.make_graph(
        [helper.make_node("Sub", ["in/a", "in.b"], ["out/d"])],
        "difference",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3]) for name in ("in/a", "in.b")],
        [helper.make_tensor_value_info("out/d", TensorProto.FLOAT, ["N", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_inputs_are_served_under_their_onnx_names(tmp_path):
    """TVM compiles the inputs under other names; clients send the ONNX ones, in any order."""
    archive = tmp_path / "difference.fia"
    build_archive(difference(tmp_path / "d.onnx"), archive, BuildOptions(name="d", cache_dir=str(tmp_path / "c")))
    a, b = (np.random.default_rng(seed).random((2, 3), dtype=np.float32) for seed in (1, 2))
    request = {
        "inputs": [
            {"name": name, "shape": [2, 3], "datatype": "FP32", "data": x.ravel().tolist()}
            for name, x in (("in.b", b), ("in/a", a))
        ]
    }
    async with (
        running_server(tmp_path, models=(f"d={archive}",), shm_slot_bytes=1 << 16) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
        http.post("/v2/models/d/infer", json=request) as response,
    ):
        assert response.status == 200, await response.text()
        (output,) = (await response.json())["outputs"]
    assert output["name"] == "out/d" and output["shape"] == [2, 3]
    np.testing.assert_allclose(np.asarray(output["data"], np.float32).reshape(2, 3), a - b, rtol=1e-6)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_rows_beyond_the_compiled_batch_size_share_batches_run_one_row_at_a_time(tmp_path):
    """Compiled for batch 1 only: a request of 12 samples takes 12 rows, which share batches of up
    to 4 (``batch_max_runs``), each run one row at a time (12-byte rows: all but the first of a
    batch start off TVM's alignment); every sample gets its own outputs."""
    archive = tmp_path / "difference.fia"
    options = BuildOptions(name="d", batch_sizes=(1,), cache_dir=str(tmp_path / "c"))
    assert build_archive(difference(tmp_path / "d.onnx"), archive, options).batch_sizes == (1,)
    rng = np.random.default_rng(5)
    a, b = rng.random((12, 3), dtype=np.float32), rng.random((12, 3), dtype=np.float32)
    async with running_server(tmp_path, models=(f"d={archive}",), devices="cpu:1", shm_slot_bytes=1 << 16) as server:
        async with AsyncClient(f"tcp://127.0.0.1:{server.binary.port}", timeout_s=60) as client:
            outputs = await client.infer("d", {"in/a": a, "in.b": b})
        metrics_url = f"http://127.0.0.1:{server.management_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(metrics_url) as response:
            metrics = await response.text()
    np.testing.assert_allclose(outputs["out/d"], a - b, rtol=1e-6)
    sizes = {
        bound: float(count)
        for bound, count in re.findall(r'fastinfer_batch_size_bucket{le="([^"]+)",model="d"} (\S+)', metrics)
    }
    # the first row goes alone to the idle worker; the next ones fill batches of 4 (the last: 3)
    assert (sizes["1.0"], sizes["2.0"], sizes["4.0"], sizes["+Inf"]) == (1, 1, 4, 4)
