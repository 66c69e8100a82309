"""The HTTP front over real worker processes and shared memory, with the numpy echo runtime."""

import asyncio
import os
import signal

import aiohttp
import numpy as np
import pytest
from conftest import running_server

MODELS = ("echo=echo:float32:16", "slow=echo:float32:4:1.0")


def assert_all_slots_free(server):
    pool = server.supervisor.pool
    assert pool.free_count == pool.slot_count


@pytest.fixture
async def server(tmp_path):
    settings = {"shm_slot_bytes": 1 << 20, "shm_slots_per_worker": 4, "max_body_bytes": 1 << 20}
    async with running_server(tmp_path, models=MODELS, **settings) as server:
        yield server


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
        yield session


async def test_ping_says_healthy_once_warm(http):
    async with http.get("/ping") as response:
        assert response.status == 200
        assert await response.json() == {"status": "Healthy"}


async def test_raw_tensor_round_trip(http):
    data = np.arange(16, dtype="<f4")
    async with http.post(
        "/predictions/echo", data=data.tobytes(), headers={"Content-Type": "application/octet-stream"}
    ) as response:
        assert response.status == 200
        body = await response.json()
    (output,) = body["outputs"]
    assert output["name"] == "output" and output["shape"] == [1, 16] and output["dtype"] == "float32"
    assert output["data"] == data.tolist()


@pytest.mark.parametrize(
    "method, path, body, status, code",
    [
        ("POST", "/predictions/echo", b"\x00" * 10, 400, "bad_request"),
        ("POST", "/predictions/nope", b"\x00" * 64, 404, "model_not_found"),
        ("GET", "/predictions/echo", None, 405, "method_not_allowed"),
        ("POST", "/nowhere", b"", 404, "not_found"),
        ("POST", "/predictions/echo", b"\x00" * ((1 << 20) + 1), 413, "payload_too_large"),
    ],
    ids=["wrong-size", "unknown-model", "wrong-method", "unknown-route", "too-large"],
)
async def test_bad_requests_get_json_errors(http, method, path, body, status, code):
    async with http.request(method, path, data=body) as response:
        assert response.status == status
        error = await response.json()
    assert error["code"] == code
    assert error["message"]
    async with http.post("/predictions/echo", data=np.zeros(16, "<f4").tobytes()) as response:
        assert response.status == 200, "the server goes on serving"


async def test_a_wrong_size_names_what_was_expected(http):
    async with http.post("/predictions/echo", data=b"\x00" * 12) as response:
        assert response.status == 400
        assert "64 bytes" in (await response.json())["message"]


async def test_multipart_field_data_or_input0(http):
    for field in ("data", "input0"):
        form = aiohttp.FormData()
        form.add_field(field, np.ones(16, "<f4").tobytes(), filename="x.bin")
        async with http.post("/predictions/echo", data=form) as response:
            assert response.status == 200
            assert (await response.json())["outputs"][0]["data"] == [1.0] * 16
    form = aiohttp.FormData()
    form.add_field("other", b"x", filename="x.bin")
    async with http.post("/predictions/echo", data=form) as response:
        assert response.status == 400
        assert "data or input0" in (await response.json())["message"]


async def test_concurrent_requests_all_answered(http):
    async def one(i):
        data = np.full(16, i, "<f4")
        async with http.post("/predictions/echo", data=data.tobytes()) as response:
            return response.status, (await response.json())

    results = await asyncio.gather(*(one(i) for i in range(40)))
    for i, (status, body) in enumerate(results):
        if status == 200:
            assert body["outputs"][0]["data"] == [float(i)] * 16
        else:
            assert body["code"] == "overloaded"
    assert sum(status == 200 for status, _ in results) >= 4


async def test_worker_killed_mid_request_fails_it_and_comes_back(server, http):
    worker = server.supervisor.workers[0]
    old_pid = worker.pid
    request = asyncio.create_task(http.post("/predictions/slow", data=np.zeros(4, "<f4").tobytes()))
    while worker.in_flight == 0:
        await asyncio.sleep(0.01)
    os.kill(old_pid, signal.SIGKILL)
    response = await asyncio.wait_for(request, 10)
    assert response.status == 502
    assert (await response.json())["code"] == "worker_died"
    response.release()

    async with asyncio.timeout(30):
        while not (server.supervisor.ready and worker.pid != old_pid):
            await asyncio.sleep(0.05)
    async with http.post("/predictions/echo", data=np.zeros(16, "<f4").tobytes()) as response:
        assert response.status == 200
    assert_all_slots_free(server)


async def test_client_gone_mid_request_does_not_leak_its_slot(server):
    worker = server.supervisor.workers[0]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
        request = asyncio.create_task(session.post("/predictions/slow", data=np.zeros(4, "<f4").tobytes()))
        while worker.in_flight == 0:
            await asyncio.sleep(0.01)
        request.cancel()
    async with asyncio.timeout(10):
        while server.supervisor.pool.free_count != server.supervisor.pool.slot_count:
            await asyncio.sleep(0.05)


async def test_management_lists_and_describes(server):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as session:
        async with session.get("/models") as response:
            assert await response.json() == {"models": [{"modelName": "echo"}, {"modelName": "slow"}]}
        async with session.get("/models/echo") as response:
            body = await response.json()
        assert body["inputs"] == [{"name": "input", "dtype": "float32", "shape": [16]}]
        assert body["workers"][0]["state"] == "ready"
        async with session.get("/models/nope") as response:
            assert response.status == 404
