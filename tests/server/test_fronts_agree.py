"""The same bad request gets the same code on every front: /predictions, KServe v2, the binary protocol."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest
from conftest import running_server

from fastinfer.client import AsyncClient, InferenceServerError
from fastinfer.client.binary import outputs_of, request_frame

SAMPLE = np.zeros((1, 4), np.float32)


@pytest.fixture
async def fronts(tmp_path):
    """``send(case) -> (http, v2, binary)`` codes (``ok`` for a success)."""
    settings = {"max_body_bytes": 1 << 12, "shm_slot_bytes": 1 << 16}
    async with (
        running_server(tmp_path, models=("echo=echo:float32:4", "slow=echo:float32:4:1.0"), **settings) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
        AsyncClient(f"tcp://127.0.0.1:{server.binary.port}", timeout_s=10) as client,
    ):

        async def over_http(model, array, version, deadline_ms) -> str:
            path = f"/predictions/{model}" + (f"/{version}" if version else "")
            headers = {"X-Deadline-Ms": str(deadline_ms)} if deadline_ms else {}
            async with http.post(path, data=array.tobytes(), headers=headers) as response:
                return "ok" if response.status == 200 else (await response.json())["code"]

        async def over_v2(model, array, version, deadline_ms) -> str:
            path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
            datatype = {"float32": "FP32", "float64": "FP64"}[array.dtype.name]
            tensor = {"name": "input", "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}
            headers = {"X-Deadline-Ms": str(deadline_ms)} if deadline_ms else {}
            async with http.post(path, json={"inputs": [tensor]}, headers=headers) as response:
                if response.status == 200:
                    return "ok"
                return {400: "bad_request", 404: "model_not_found", 413: "payload_too_large", 504: "deadline_exceeded"}[
                    response.status
                ]

        async def over_binary(model, array, version, deadline_ms) -> str:
            deadline_s = deadline_ms / 1000 if deadline_ms else None

            def frame(rid):
                return request_frame(rid, model, inputs={"input": array}, timeout_s=deadline_s, version=version)

            try:  # the client waits longer than the request's deadline, to hear the server say it passed
                outputs_of(*await client._call(frame, 10))
            except InferenceServerError as error:
                return error.code
            return "ok"

        async def send(model="echo", array=SAMPLE, version=None, deadline_ms=None) -> tuple[str, str, str]:
            return tuple(
                [await front(model, array, version, deadline_ms) for front in (over_http, over_v2, over_binary)]
            )

        yield send


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ({}, "ok"),
        ({"version": "1"}, "ok"),
        ({"model": "nope"}, "model_not_found"),
        ({"version": "7"}, "model_not_found"),
        ({"array": np.zeros((1, 4), np.float64)}, "bad_request"),
        ({"array": np.zeros((1, 5), np.float32)}, "bad_request"),
        ({"array": np.zeros((1, 2048), np.float32)}, "payload_too_large"),
        ({"model": "slow", "deadline_ms": 100}, "deadline_exceeded"),
    ],
    ids=["ok", "version-1", "unknown-model", "unknown-version", "wrong-dtype", "wrong-shape", "too-large", "deadline"],
)
async def test_the_same_request_gets_the_same_code_everywhere(fronts, case, code):
    assert await fronts(**case) == (code, code, code)
