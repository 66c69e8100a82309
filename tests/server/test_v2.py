"""KServe v2 over a live server: the real tritonclient (sync and aio, JSON and binary), and bad inputs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from conftest import running_server
from tritonclient.utils import InferenceServerException

from fastinfer.server.batcher import WorkerState

MODELS = ("echo=echo:float32:16", "ints=echo:int32:4")


@pytest.fixture
async def server(tmp_path):
    settings = {"shm_slot_bytes": 1 << 16, "shm_slots_per_worker": 8, "max_body_bytes": 1 << 16, "batch_max_size": 4}
    async with running_server(tmp_path, models=MODELS, **settings) as server:
        yield server


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
        yield session


def infer_inputs(array: np.ndarray, binary: bool, module=triton) -> list:
    tensor = module.InferInput("input", list(array.shape), "FP32" if array.dtype == np.float32 else "INT32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return [tensor]


def sync_client_session(url: str) -> None:
    """Everything a tritonclient user does, with the blocking client (run in a thread)."""
    client = triton.InferenceServerClient(url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("echo") and client.is_model_ready("echo", "1")
        assert client.get_server_metadata()["name"] == "fastinfer"
        metadata = client.get_model_metadata("echo")
        assert metadata["versions"] == ["1"]
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
        rng = np.random.default_rng(0)
        for batch, binary_in, binary_out in [(1, False, False), (1, True, True), (3, False, True), (4, True, False)]:
            data = rng.standard_normal((batch, 16)).astype(np.float32)
            outputs = [triton.InferRequestedOutput("output", binary_data=binary_out)]
            result = client.infer("echo", infer_inputs(data, binary_in), outputs=outputs, request_id=f"r{batch}")
            np.testing.assert_array_equal(result.as_numpy("output"), data)
            response = result.get_response()
            assert response["model_name"] == "echo" and response["id"] == f"r{batch}"
            assert response["outputs"][0]["shape"] == [batch, 16]
            assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out
        # No outputs named: all of them, binary (tritonclient sets binary_data_output).
        data = np.arange(16, dtype=np.float32).reshape(1, 16)
        result = client.infer("echo", infer_inputs(data, True), model_version="1")
        np.testing.assert_array_equal(result.as_numpy("output"), data)
        with pytest.raises(InferenceServerException, match="no model named 'nope'") as caught:
            client.infer("nope", infer_inputs(data, False))
        assert caught.value.status() == "404"
        with pytest.raises(InferenceServerException, match="no version '2'"):
            client.infer("echo", infer_inputs(data, False), model_version="2")
        with pytest.raises(InferenceServerException, match='input "input" is INT32 but the model takes FP32'):
            client.infer("echo", infer_inputs(data.astype(np.int32), False))
    finally:
        client.close()


async def test_tritonclient_sync_json_and_binary(server):
    await asyncio.to_thread(sync_client_session, f"127.0.0.1:{server.http_port}")


async def test_tritonclient_aio_concurrent_json_and_binary(server):
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        assert await client.is_server_ready()
        assert (await client.get_model_metadata("ints"))["inputs"][0]["datatype"] == "INT32"

        async def one(i: int) -> None:
            batch = 1 + i % 3
            data = np.arange(batch * 4, dtype=np.int32).reshape(batch, 4) * (i + 1) - 7
            binary = bool(i % 2)
            outputs = [triton_aio.InferRequestedOutput("output", binary_data=not binary)]
            result = await client.infer("ints", infer_inputs(data, binary, triton_aio), outputs=outputs)
            np.testing.assert_array_equal(result.as_numpy("output"), data)

        await asyncio.gather(*(one(i) for i in range(12)))
        with pytest.raises(InferenceServerException, match="no model named"):
            await client.get_model_metadata("nope")
    finally:
        await client.close()
    pool = server.supervisor.pool
    assert pool.free_count == pool.slot_count


def body(inputs: list[dict], tail: bytes = b"") -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": inputs}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))} if tail else {}
    return header + tail, headers


FP32_16 = {"name": "input", "shape": [1, 16], "datatype": "FP32"}


@pytest.mark.parametrize(
    "path, data, headers, status, words",
    [
        ("/v2/models/echo/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
        ("/v2/models/echo/infer", *body([{**FP32_16, "data": [1.0] * 15}]), 400, 'input "input"'),
        ("/v2/models/echo/infer", *body([{**FP32_16, "datatype": "FP33", "data": [1.0] * 16}]), 400, "FP33"),
        ("/v2/models/echo/infer", *body([]), 400, 'missing input "input"'),
        ("/v2/models/echo/infer", *body([{**FP32_16, "shape": [1, 8], "data": [1.0] * 8}]), 400, "shape [1,8]"),
        (
            "/v2/models/echo/infer",
            *body([{**FP32_16, "parameters": {"binary_data_size": 64}}], b"\x00" * 63),
            400,
            "binary_data_size 64",
        ),
        ("/v2/models/echo/infer", b"{}", {"Inference-Header-Content-Length": "99"}, 400, "Inference-Header"),
        ("/v2/models/echo/infer", b"x" * ((1 << 16) + 1), {}, 413, "the limit is 65536"),
        ("/v2/models/nope/infer", *body([{**FP32_16, "data": [1.0] * 16}]), 404, "no model named 'nope'"),
        ("/v2/models/echo/versions/7/infer", *body([{**FP32_16, "data": [1.0] * 16}]), 404, "no version '7'"),
        ("/v2/models/echo/versions/1/nope", b"", {}, 404, "no route"),
    ],
    ids=[
        "malformed-json",
        "data-length",
        "unknown-datatype",
        "missing-input",
        "wrong-shape",
        "binary-short",
        "header-length-past-body",
        "too-large",
        "unknown-model",
        "unknown-version",
        "unknown-route",
    ],
)
async def test_bad_requests_get_kserve_errors(http, path, data, headers, status, words):
    async with http.post(path, data=data, headers=headers) as response:
        assert response.status == status
        error = await response.json()
    assert set(error) == {"error"}
    assert words in error["error"]
    good, _ = body([{**FP32_16, "data": [2.0] * 16}])
    async with http.post("/v2/models/echo/versions/1/infer", data=good) as response:
        assert response.status == 200, "the server goes on serving"
        assert (await response.json())["outputs"][0]["data"] == [2.0] * 16


async def test_model_not_ready_while_its_worker_restarts(server, http):
    worker = server.supervisor.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    seen = set()
    async with asyncio.timeout(30):
        while worker.state is not WorkerState.READY or not seen:
            async with http.get("/v2/models/echo/ready") as response:
                if response.status == 503:
                    seen.add((await response.json())["error"])
                    async with http.get("/v2/health/ready") as ready:
                        assert ready.status == 503 or worker.state is WorkerState.READY  # it may be back already
            await asyncio.sleep(0.01)
    assert any("restarting" in message for message in seen)
    async with http.get("/v2/models/echo/ready") as response:
        assert response.status == 200
    async with http.get("/v2/health/live") as response:
        assert response.status == 200


async def test_more_samples_than_a_batch_are_split_over_batches(http):
    """The metadata says the batch dimension is -1: 25 samples on a model batched by 4 are served."""
    data = np.arange(25 * 16, dtype=np.float32).reshape(25, 16)
    request = {"inputs": [{"name": "input", "shape": [25, 16], "datatype": "FP32", "data": data.ravel().tolist()}]}
    async with http.post("/v2/models/echo/infer", json=request) as response:
        assert response.status == 200, await response.text()
        (output,) = (await response.json())["outputs"]
    assert output["shape"] == [25, 16]
    np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(25, 16), data)


async def test_a_large_json_body_is_parsed_and_answered_off_the_loop(http, monkeypatch):
    from fastinfer.server.fronts.kserve import codec, rest

    threads = []

    def recorded(function):
        def run(*args):
            threads.append((function.__name__, threading.current_thread().name.split("_")[0]))
            return function(*args)

        return run

    monkeypatch.setattr(rest, "decode", recorded(rest.decode))
    monkeypatch.setattr(codec, "build_infer_response", recorded(codec.build_infer_response))
    monkeypatch.setattr(rest, "OFF_LOOP_BYTES", 60)  # the 64 bytes of output are past it too
    data = [0.5] * 16
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": data}]})
    async with http.post("/v2/models/echo/infer", data=body.encode()) as response:
        assert response.status == 200 and (await response.json())["outputs"][0]["data"] == data
    assert threads == [("decode", "fastinfer-parse"), ("build_infer_response", "fastinfer-parse")]
    async with http.post("/v2/models/echo/infer", data=body.encode()[:-1]) as response:
        assert response.status == 400, "a parse error in the thread is the same answer"
