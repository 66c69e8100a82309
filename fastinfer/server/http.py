"""The HTTP apps: inference (``/predictions``, ``/ping``) and management (``/models``, ``/metrics``).

Handlers parse and copy bytes only: a body goes chunk by chunk straight into its row of a batch
in shared memory, and everything heavier (decoding, numpy math) happens in the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, web

from fastinfer.config import Config
from fastinfer.errors import BadRequest, FastInferError, PayloadTooLarge
from fastinfer.supervisor import Supervisor

IMAGE_FIELDS = ("data", "input0")
RETRY_AFTER_S = 1
DEADLINE_HEADER = "X-Deadline-Ms"


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


async def _copy_stream(
    read_chunk: Callable[[], Awaitable[bytes]], view: memoryview, too_long: Callable[[], FastInferError]
) -> int:
    received = 0
    while chunk := await read_chunk():
        if received + len(chunk) > len(view):
            raise too_long()
        view[received : received + len(chunk)] = chunk
        received += len(chunk)
    return received


async def read_body_into(request: web.Request, view: memoryview, too_long: Callable[[], FastInferError]) -> int:
    """Copy the payload (raw body, or the ``data``/``input0`` field of a form) into ``view``."""
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name in IMAGE_FIELDS:
                return await _copy_stream(part.read_chunk, view, too_long)
            await part.release()
        raise BadRequest(f"the form has no field named {' or '.join(IMAGE_FIELDS)}")
    if request.content_length is not None and request.content_length > len(view):
        raise too_long()
    return await _copy_stream(request.content.readany, view, too_long)


def deadline_from(request: web.Request, default_s: float) -> float:
    """The request's deadline on the loop clock: ``X-Deadline-Ms`` (relative) or the default."""
    header = request.headers.get(DEADLINE_HEADER)
    timeout_s = default_s
    if header is not None:
        try:
            timeout_s = float(header) / 1000
        except ValueError:
            raise BadRequest(f"{DEADLINE_HEADER} must be a number of milliseconds, not {header!r}") from None
        if timeout_s <= 0:
            raise BadRequest(f"{DEADLINE_HEADER} must be positive")
    return asyncio.get_running_loop().time() + timeout_s


class InferenceRoutes:
    def __init__(self, supervisor: Supervisor, config: Config):
        self.supervisor = supervisor
        self.config = config
        self.metrics = supervisor.metrics

    async def ping(self, request: web.Request) -> web.Response:
        if self.supervisor.ready:
            return web.json_response({"status": "Healthy"})
        status = "Unhealthy" if self.supervisor.failure else "Starting"
        body = {"status": status, **self.supervisor.health()}
        return web.json_response(body, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def predict(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        started = time.perf_counter()
        code = "ok"
        self.metrics.in_flight.labels("http").inc()
        try:
            return await self._predict(request, model)
        except FastInferError as error:
            code = error.code
            raise
        finally:
            self.metrics.in_flight.labels("http").dec()
            if model in self.supervisor.model_paths:
                self.metrics.requests.labels(model, "http", code).inc()
                self.metrics.request_latency.labels(model, "http").observe(time.perf_counter() - started)

    async def _predict(self, request: web.Request, model: str) -> web.Response:
        signature = self.supervisor.signature(model)
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
        row = self.supervisor.batcher.reserve(model, deadline_from(request, self.config.request_timeout_s))
        try:
            view = row.payload_view()
            try:
                if signature.takes_images:
                    body = view[:limit]
                    nbytes = await read_body_into(
                        request, body, lambda: PayloadTooLarge(f"the body is over the limit of {limit} bytes")
                    )
                    body.release()
                else:
                    sample = len(view)
                    nbytes = await read_body_into(
                        request, view, lambda: BadRequest(f"the body is longer than the {sample} bytes the model takes")
                    )
            finally:
                view.release()
            row.filled(nbytes)
            result = await row.result()
            if signature.top_k and result.classes is not None:
                return web.json_response(result.classes)
            outputs = [
                {"name": spec.name, "dtype": spec.dtype, "shape": [1, *spec.shape], "data": array.reshape(-1).tolist()}
                for spec, array in zip(signature.outputs, result.outputs, strict=True)
            ]
            return web.json_response({"model_name": model, "outputs": outputs})
        finally:
            row.release()


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
        return web.json_response({**signature.to_dict(), **supervisor.health()})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=supervisor.metrics.exposition(), content_type="text/plain", charset="utf-8")

    app = web.Application(middlewares=[errors_as_json])
    app.router.add_get("/models", list_models)
    app.router.add_get("/models/{model}", describe_model)
    app.router.add_get("/metrics", metrics)
    return app
