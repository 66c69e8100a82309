"""Management (register, scale, unregister under load), /metrics, bearer tokens, access log and limits."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import numpy as np
import pytest
from conftest import running_server
from prometheus_client.parser import text_string_to_metric_families


def serving(tmp_path, **overrides):
    settings = {
        "models": ("echo=echo:float32:16",),
        "shm_slot_bytes": 1 << 16,
        "shm_slots_per_worker": 8,
        "max_body_bytes": 1 << 16,
        "batch_max_size": 4,
        **overrides,
    }
    return running_server(tmp_path, **settings)


def v2_body(value: float, count: int = 16, datatype: str = "FP32") -> bytes:
    return b'{"inputs": [{"name": "input", "shape": [1, %d], "datatype": "%s", "data": [%s]}]}' % (
        count,
        datatype.encode(),
        ",".join([str(int(value))] * count).encode(),
    )


async def test_register_scale_unregister_under_load(tmp_path):
    # Batches take 20 ms and 16 clients keep more rows waiting than a worker holds, so each
    # change meets queued batches that the old workers must finish.
    async with (
        serving(tmp_path, models=("echo=echo:float32:16:0.02",)) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as manage,
    ):
        failures: list[str] = []
        served = {"echo": 0, "more": 0}
        more_gone = asyncio.Event()
        stop = asyncio.Event()

        async def load(i: int) -> None:
            while not stop.is_set():
                async with http.post("/v2/models/echo/infer", data=v2_body(i)) as response:
                    if response.status != 200 or (await response.json())["outputs"][0]["data"] != [i] * 16:
                        failures.append(f"echo v2: {response.status} {await response.text()}")
                async with http.post("/predictions/echo", data=np.full(16, i, "<f4").tobytes()) as response:
                    if response.status != 200:
                        failures.append(f"echo predictions: {response.status} {await response.text()}")
                served["echo"] += 2
                if "more" in server.supervisor.model_paths or more_gone.is_set():
                    async with http.post("/v2/models/more/infer", data=v2_body(i, 4, "INT32")) as response:
                        if response.status == 200:
                            served["more"] += 1
                        elif not (response.status == 404 and more_gone.is_set()):
                            failures.append(f"more: {response.status} {await response.text()}")

        async def served_meanwhile(change) -> dict:
            start = dict(served)
            response = await change
            async with response:
                body = await response.json()
                assert response.status in (200, 201), body
            await asyncio.sleep(0.1)
            assert served["echo"] > start["echo"], "the load ran during the change"
            return body

        loads = [asyncio.create_task(load(i)) for i in range(16)]
        try:
            await asyncio.sleep(0.2)
            described = await served_meanwhile(manage.post("/models", json={"name": "more", "path": "echo:int32:4"}))
            assert described["status"] == "ready" and described["inputs"][0]["dtype"] == "int32"
            old_pids = {w["pid"] for w in described["workers"]}
            body = await served_meanwhile(manage.put("/workers", json={"count": 2}))
            assert body["count"] == 2 and not old_pids & {w["pid"] for w in body["workers"]}
            assert server.supervisor.pool.slot_count == 16, "a bigger pool for more workers"
            body = await served_meanwhile(manage.put("/workers?count=1"))
            assert body["count"] == 1
            assert served["more"] > 0
            more_gone.set()
            await served_meanwhile(manage.delete("/models/more"))
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*loads)
        assert failures == []

        async with manage.get("/models") as response:
            assert await response.json() == {"models": [{"modelName": "echo"}]}
        async with manage.get("/models/echo") as response:
            body = await response.json()
        assert body["status"] == "ready" and body["versions"] == ["1"] and body["batch_max_size"] == 4
        assert body["path"] == "echo:float32:16:0.02" and len(body["workers"]) == 1
        pool = server.supervisor.pool
        assert pool.free_count == pool.slot_count


@pytest.mark.parametrize(
    "method, path, json_body, status, code",
    [
        ("POST", "/models", {"name": "echo", "path": "echo:float32:4"}, 409, "model_exists"),
        ("POST", "/models", {"name": "x", "path": "no/such/file.onnx"}, 400, "bad_request"),
        ("POST", "/models", {"name": "../x", "path": "echo:float32:4"}, 400, "bad_request"),
        ("POST", "/models", {"name": "x"}, 400, "bad_request"),
        ("DELETE", "/models/nope", None, 404, "model_not_found"),
        ("GET", "/models/nope", None, 404, "model_not_found"),
        ("PUT", "/workers", {"count": 0}, 400, "bad_request"),
        ("PUT", "/workers", {"count": "\u0968"}, 400, "bad_request"),  # Devanagari two: a digit, not ASCII
        ("PUT", "/workers", {"count": "\u00b2"}, 400, "bad_request"),  # superscript two
    ],
    ids=[
        "exists",
        "no-file",
        "bad-name",
        "no-path",
        "unregister-unknown",
        "describe-unknown",
        "zero-workers",
        "devanagari-count",
        "superscript-count",
    ],
)
async def test_management_errors_are_json(tmp_path, method, path, json_body, status, code):
    async with (
        serving(tmp_path) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as manage,
    ):
        pids = [w.pid for w in server.supervisor.workers]
        async with manage.request(method, path, json=json_body) as response:
            assert response.status == status
            error = await response.json()
        assert error["code"] == code and error["message"]
        assert [w.pid for w in server.supervisor.workers] == pids, "the workers were left alone"


async def test_register_from_the_model_store_and_a_failed_load_keeps_serving(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "broken.onnx").write_bytes(b"not an onnx file")
    async with (
        serving(tmp_path, model_store=str(store)) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as manage,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
    ):
        pids = [w.pid for w in server.supervisor.workers]
        async with manage.post("/models", json={"path": "broken.onnx"}) as response:
            assert response.status == 500
            assert (await response.json())["code"] == "model_load_error"
        assert [w.pid for w in server.supervisor.workers] == pids
        async with manage.get("/models") as response:
            assert await response.json() == {"models": [{"modelName": "echo"}]}
        async with http.post("/predictions/echo", data=np.zeros(16, "<f4").tobytes()) as response:
            assert response.status == 200


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_parse_and_move(tmp_path):
    async with (
        serving(tmp_path) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as manage,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
    ):

        async def scrape() -> dict:
            async with manage.get("/metrics") as response:
                assert response.status == 200 and response.content_type == "text/plain"
                return samples(await response.text())

        v2_ok = ("fastinfer_requests_total", (("code", "ok"), ("model", "echo"), ("protocol", "v2")))
        v2_bad = ("fastinfer_requests_total", (("code", "bad_request"), ("model", "echo"), ("protocol", "v2")))
        v2_latency = ("fastinfer_request_latency_seconds_count", (("model", "echo"), ("protocol", "v2")))
        batches = ("fastinfer_batch_size_count", (("model", "echo"),))
        compute = ("fastinfer_compute_latency_seconds_count", (("model", "echo"),))
        before = await scrape()
        for i in range(3):
            async with http.post("/v2/models/echo/infer", data=v2_body(i)) as response:
                assert response.status == 200
        async with http.post("/v2/models/echo/infer", data=b"{") as response:
            assert response.status == 400
        after = await scrape()
        assert after[v2_ok] - before.get(v2_ok, 0) == 3
        assert after[v2_bad] - before.get(v2_bad, 0) == 1
        assert after[v2_latency] - before.get(v2_latency, 0) == 4
        assert after[batches] - before.get(batches, 0) >= 1
        assert after[compute] == after[batches]
        assert after[("fastinfer_workers_ready", ())] == 1
        assert after[("fastinfer_in_flight", (("protocol", "v2"),))] == 0


async def test_bearer_tokens_and_the_access_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastinfer.access")
    async with serving(tmp_path, inference_token="infer-secret", management_token="manage-secret") as server:
        infer = {"Authorization": "Bearer infer-secret"}
        manage = {"Authorization": "Bearer manage-secret"}
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
            for headers in ({}, manage, {"Authorization": "Bearer infer-secre"}):
                async with http.post("/v2/models/echo/infer", data=v2_body(1), headers=headers) as response:
                    assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
                    assert "Bearer" in (await response.json())["error"]
                async with http.post("/predictions/echo", data=b"", headers=headers) as response:
                    assert response.status == 401 and (await response.json())["code"] == "unauthorized"
            async with http.post("/v2/models/echo/infer", data=v2_body(1), headers=infer) as response:
                assert response.status == 200
            for path in ("/ping", "/v2/health/ready", "/v2/health/live"):
                async with http.get(path) as response:
                    assert response.status == 200, path
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as management:
            for headers, status in (({}, 401), (infer, 401), (manage, 200)):
                async with management.get("/metrics", headers=headers) as response:
                    assert response.status == status
    lines = [r.getMessage() for r in caplog.records if r.name == "fastinfer.access"]
    assert any(line.startswith("POST /v2/models/echo/infer model=echo status=200 ") for line in lines), lines
    assert any(line.startswith("POST /v2/models/echo/infer model=echo status=401 ") for line in lines), lines
    assert any(line.startswith("GET /metrics model=- status=200 ") for line in lines), lines
    assert not any("secret" in line for line in lines)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return status, await reader.readexactly(length)


async def test_limits_body_timeout_header_timeout_and_connection_cap(tmp_path):
    async with serving(tmp_path, body_timeout_s=0.5, header_timeout_s=1.0, max_connections=3) as server:
        port = server.http_port
        pool = server.supervisor.pool

        # Past max_connections: 503 and closed; once one closes, a new one is served.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            status, body = await read_response(reader)
            assert await reader.read() == b""
        assert status == 503 and b"too_many_connections" in body
        writer.close()
        held.pop()[1].close()
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http, http.get("/ping") as response:
            assert response.status == 200
        for _, held_writer in held:
            held_writer.close()

        # Headers, then a body that stalls: 408 once body_timeout_s is up; meanwhile it holds no row.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n" + b"\x00" * 10)
        await asyncio.sleep(0.2)
        assert pool.free_count == pool.slot_count, "a request takes a row only once its body is in"
        async with asyncio.timeout(5):
            status, body = await read_response(reader)
        assert status == 408 and b"request_timeout" in body
        assert pool.free_count == pool.slot_count
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n{")
        async with asyncio.timeout(5):
            status, body = await read_response(reader)
        assert status == 408 and json.loads(body) == {"error": "the body did not arrive within 0.5 s"}
        writer.close()

        # Headers that never finish: the connection is closed after header_timeout_s.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\n")
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        assert loop.time() - started >= 0.9
        writer.close()


async def test_a_model_batches_within_its_own_limits(tmp_path):
    """``--model-limits``: the front's batcher and the worker lay out that model's batches alike
    (so results reach the right requests), and its queue bound is its own."""
    limits = ("small:batch_max_size=2", "small:queue_max_size=3")
    async with (
        serving(tmp_path, models=("echo=echo:float32:16", "small=echo:float32:16"), model_limits=limits) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.management_port}") as manage,
    ):
        for model, batch_max_size in (("echo", 4), ("small", 2)):
            async with manage.get(f"/models/{model}") as response:
                assert (await response.json())["batch_max_size"] == batch_max_size

        async def infer(model: str, value: int) -> list:
            async with http.post(f"/v2/models/{model}/infer", data=v2_body(value)) as response:
                assert response.status == 200, await response.text()
                return (await response.json())["outputs"][0]["data"]

        models = ["echo", "small"] * 3  # as many of small as its queue holds
        results = await asyncio.gather(*(infer(model, i) for i, model in enumerate(models)))
        assert results == [[i] * 16 for i in range(len(models))]
        samples = {"inputs": [{"name": "input", "shape": [4, 16], "datatype": "FP32", "data": [0.0] * 64}]}
        async with http.post("/v2/models/small/infer", json=samples) as response:
            assert response.status == 400 and "4" in (await response.json())["error"]
        async with http.post("/v2/models/echo/infer", json=samples) as response:
            assert response.status == 200, "the server-wide queue bound (256) admits four samples"
