"""The HTTP apps: inference (``/predictions``, ``/ping``) and management (``/models``).

Handlers parse and copy bytes only: a body goes chunk by chunk straight into a worker's
shared-memory slot, and everything heavier (decoding, numpy math) happens in the worker.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import numpy as np
from aiohttp import BodyPartReader, web

from fastinfer.config import Config
from fastinfer.errors import BadRequest, FastInferError, PayloadTooLarge
from fastinfer.shm import SlotsExhausted
from fastinfer.supervisor import Supervisor

IMAGE_FIELDS = ("data", "input0")
RETRY_AFTER_S = 1


class Overloaded(FastInferError):
    code = "overloaded"
    status = 503


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error, ours or aiohttp's, leaves as ``{"code", "message"}`` with its HTTP status."""
    try:
        return await handler(request)
    except FastInferError as error:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
        return json_error(error.status, error.code, error.message, headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = error.reason.lower().replace(" ", "_")
        message = error.text if error.text and not error.text.startswith(f"{error.status}:") else error.reason
        if error.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif error.status == 404:
            message = f"no route {request.path}"
        return json_error(error.status, code, message, {k: v for k, v in error.headers.items() if k == "Allow"})


async def _copy_stream(read_chunk: Callable[[], Awaitable[bytes]], view: memoryview, limit: int) -> int:
    received = 0
    while chunk := await read_chunk():
        if received + len(chunk) > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        view[received : received + len(chunk)] = chunk
        received += len(chunk)
    return received


async def read_body_into(request: web.Request, view: memoryview, limit: int) -> int:
    """Copy the payload (raw body, or the ``data``/``input0`` field of a form) into ``view``."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name in IMAGE_FIELDS:
                return await _copy_stream(part.read_chunk, view, limit)
            await part.release()
        raise BadRequest(f"the form has no field named {' or '.join(IMAGE_FIELDS)}")
    return await _copy_stream(request.content.readany, view, limit)


class InferenceRoutes:
    def __init__(self, supervisor: Supervisor, config: Config):
        self.supervisor = supervisor
        self.config = config

    async def ping(self, request: web.Request) -> web.Response:
        if self.supervisor.ready:
            return web.json_response({"status": "Healthy"})
        status = "Unhealthy" if self.supervisor.failure else "Starting"
        return web.json_response({"status": status}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def predict(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        signature = self.supervisor.signature(model)
        worker = self.supervisor.pick(model)
        try:
            slot = worker.acquire_slot()
        except SlotsExhausted:
            raise Overloaded(f"worker {worker.index} has no free slot; retry later") from None
        view = worker.pool.view(slot)
        try:
            nbytes = await read_body_into(request, view, self.config.max_body_bytes)
            kind = "image" if signature.takes_images else "tensor"
            reply = await worker.run(model, kind, slot, nbytes, self.config.request_timeout_s)
            if reply["op"] == "error":
                raise FastInferError(reply["message"], code=reply["code"], status=reply["status"])
            if "classes" in reply:
                return web.json_response(reply["classes"])
            return web.Response(
                body=json.dumps({"model_name": model, "outputs": _outputs_json(reply, view)}),
                content_type="application/json",
            )
        finally:
            view.release()
            worker.release_slot(slot)


def _outputs_json(reply: dict, view: memoryview) -> list[dict]:
    outputs = []
    for out in reply["outputs"]:
        count = int(np.prod(out["shape"]))
        array = np.frombuffer(view, dtype=out["dtype"], count=count, offset=out["offset"])
        outputs.append({"name": out["name"], "dtype": out["dtype"], "shape": out["shape"], "data": array.tolist()})
    return outputs


def inference_app(supervisor: Supervisor, config: Config) -> web.Application:
    routes = InferenceRoutes(supervisor, config)
    app = web.Application(middlewares=[errors_as_json])
    app.router.add_get("/ping", routes.ping)
    app.router.add_post("/predictions/{model}", routes.predict)
    return app


def management_app(supervisor: Supervisor) -> web.Application:
    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"modelName": name} for name in sorted(supervisor.model_paths)]})

    async def describe_model(request: web.Request) -> web.Response:
        signature = supervisor.signature(request.match_info["model"])
        workers = [{"index": w.index, "pid": w.pid, "state": w.state, "cores": w.cores} for w in supervisor.workers]
        return web.json_response({**signature.to_dict(), "workers": workers})

    app = web.Application(middlewares=[errors_as_json])
    app.router.add_get("/models", list_models)
    app.router.add_get("/models/{model}", describe_model)
    return app
