"""The inference HTTP app: ``/predictions``, ``/ping``, and the KServe v2 routes of :mod:`.v2`.

Handlers parse and copy bytes only: a body goes chunk by chunk straight into its row of a batch
in shared memory, and everything heavier (decoding, numpy math) happens in the worker.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Middleware

from fastinfer.config import Config
from fastinfer.errors import (
    BadImage,
    BadRequest,
    FastInferError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
)
from fastinfer.protocol import aligned_buffer
from fastinfer.server import kserve
from fastinfer.server.access import AccessLog, bearer_auth, guard_server
from fastinfer.server.jsonbody import json_response
from fastinfer.signature import ModelSignature
from fastinfer.supervisor import Supervisor

IMAGE_FIELDS = ("data", "input0")
RETRY_AFTER_S = 1
DEADLINE_HEADER = "X-Deadline-Ms"
LINGER_MAX_S = 10.0
MODEL_VERSION = "1"  # models have one version until archives carry theirs
HEALTH_PATHS = ("/ping", "/v2/health/live", "/v2/health/ready")
HTTP_CODES = {413: "payload_too_large"}  # aiohttp's refusals, under the codes our own errors use


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


def _error(request: web.Request, status: int, code: str, message: str, headers: dict[str, str] | None) -> web.Response:
    """KServe routes answer ``{"error"}``, which tritonclient shows; the others ``{"code", "message"}``."""
    if request.path == "/v2" or request.path.startswith("/v2/"):
        return web.json_response(kserve.error_body(message), status=status, headers=headers)
    return json_error(status, code, message, headers)


def check_version(model: str, version: str | None) -> None:
    """ModelNotFound unless ``version`` is None or one the model has."""
    if version is not None and version != MODEL_VERSION:
        raise ModelNotFound(f"model {model!r} has no version {version!r}; it has version {MODEL_VERSION}")


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error, ours or aiohttp's, leaves as JSON (see ``_error``) with its HTTP status."""
    try:
        return await handler(request)
    except FastInferError as error:
        retry_after_s = error.retry_after_s if isinstance(error, Overloaded) else RETRY_AFTER_S
        headers = {"Retry-After": str(retry_after_s)} if error.status == 503 else None
        if error.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(request, error.status, error.code, error.message, headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = HTTP_CODES.get(error.status) or error.reason.lower().replace(" ", "_")
        message = error.text if error.text and not error.text.startswith(f"{error.status}:") else error.reason
        if error.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif error.status == 404:
            message = f"no route {request.path}"
        return _error(request, error.status, code, message, {k: v for k, v in error.headers.items() if k == "Allow"})


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


async def read_body_into(
    request: web.Request, view: memoryview, too_long: Callable[[], FastInferError], timeout_s: float
) -> int:
    """Copy the payload (raw body, or the ``data``/``input0`` field of a form) into ``view``.

    A client that has not sent it all within ``timeout_s`` gets RequestTimeout (408).
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body_into(request, view, too_long)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None


async def _read_body_into(request: web.Request, view: memoryview, too_long: Callable[[], FastInferError]) -> int:
    if request.content_type.startswith("multipart/"):
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as error:  # no boundary, or an unusable one
            raise BadRequest(f"the multipart body cannot be read: {error}") from None
        while (part := await _next_part(reader)) is not None:
            if isinstance(part, BodyPartReader) and part.name in IMAGE_FIELDS:
                return await _copy_stream(part.read_chunk, view, too_long)
            await part.release()
        raise BadRequest(f"the form has no field named {' or '.join(IMAGE_FIELDS)}")
    if request.content_length is not None and request.content_length > len(view):
        raise too_long()

    content = request.content

    async def read_chunk() -> bytes:
        # Each chunk as it came; readany() would join those buffered, a copy of the body.
        while True:
            chunk, end_of_http_chunk = await content.readchunk()
            # (b"", True) marks the end of an HTTP chunk, so read on; but a body-less request's
            # reader answers it for ever without waiting, so its end must be asked for.
            if chunk or not end_of_http_chunk or content.at_eof():
                return chunk

    return await _copy_stream(read_chunk, view, too_long)


async def _next_part(reader: Any) -> Any:
    try:
        return await reader.next()
    except ValueError as error:  # a part without headers' end, a bad boundary line...
        raise BadRequest(f"the multipart body is malformed: {error}") from None


def timeout_from(request: web.Request, default_s: float) -> float:
    """Seconds the request may take: its ``X-Deadline-Ms`` header, or the server's default."""
    header = request.headers.get(DEADLINE_HEADER)
    timeout_s = default_s
    if header is not None:
        try:
            timeout_s = float(header) / 1000
        except ValueError:
            raise BadRequest(f"{DEADLINE_HEADER} must be a number of milliseconds, not {header!r}") from None
        if not 0 < timeout_s < math.inf:  # nan and inf are floats too, and no deadline
            raise BadRequest(f"{DEADLINE_HEADER} must be a positive, finite number of milliseconds")
    return timeout_s


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
        check_version(model, request.match_info.get("version"))
        started = time.perf_counter()
        code = "ok"
        self.metrics.request_started("http")
        try:
            return await self._predict(request, model)
        except FastInferError as error:
            code = error.code
            raise
        finally:
            self.metrics.request_ended("http")
            if model in self.supervisor.model_paths:
                self.metrics.request_done(model, "http", code, time.perf_counter() - started)

    async def _predict(self, request: web.Request, model: str) -> web.Response:
        signature = self.supervisor.signature(model)
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
        timeout_s = timeout_from(request, self.config.request_timeout_s)
        body = await self._receive(request, signature)
        # Only now, with every byte in, does the request take a row: a slow upload holds no slot
        # and keeps no batch waiting.
        row = self.supervisor.batcher.reserve(model, timeout_s)
        try:
            view = row.payload_view()
            try:
                view[: len(body)] = body
            finally:
                view.release()
            row.filled(len(body))
            result = await row.result()
            if signature.top_k and result.classes is not None:
                return json_response(result.classes)
            outputs = [
                {"name": spec.name, "dtype": spec.dtype, "shape": [1, *spec.shape], "data": array.reshape(-1)}
                for spec, array in zip(signature.outputs, result.outputs, strict=True)
            ]
            return json_response({"model_name": model, "outputs": outputs})  # before the row's views go
        finally:
            row.release()

    async def _receive(self, request: web.Request, signature: ModelSignature) -> memoryview:
        """The body (an image, or one sample's bytes), received into memory of the request's own."""
        limit = self.config.max_body_bytes
        sample = 0 if signature.takes_images else sum(spec.nbytes for spec in signature.inputs)
        too_long: Callable[[], FastInferError]
        if signature.takes_images:
            size, too_long = limit, lambda: PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        else:
            size, too_long = sample, lambda: BadRequest(f"the body is longer than the {sample} bytes the model takes")
        if request.content_length is not None:
            size = min(size, request.content_length)  # one too long is refused before a byte is read
        buffer = aligned_buffer(size)  # pages are committed as bytes arrive
        nbytes = await read_body_into(request, buffer, too_long, self.config.body_timeout_s)
        if signature.takes_images and not nbytes:
            raise BadImage("the body is empty; send the encoded image bytes")
        if not signature.takes_images and nbytes != sample:
            spec = signature.inputs[0]
            raise BadRequest(
                f"input {spec.name!r} is {spec.dtype} {list(spec.shape)}, {sample} bytes; the body has {nbytes}"
            )
        return buffer[:nbytes]


def inference_app(supervisor: Supervisor, config: Config, access: AccessLog | None = None) -> web.Application:
    """``/ping``, ``/predictions/{model}[/{version}]`` and the KServe v2 routes, behind the port's guards."""
    from fastinfer.server import v2

    middlewares: list[Middleware] = [access.middleware] if access is not None else []
    middlewares.append(errors_as_json)
    if config.inference_token:
        middlewares.append(bearer_auth(config.inference_token, HEALTH_PATHS))
    routes = InferenceRoutes(supervisor, config)
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app.router.add_get("/ping", routes.ping)
    app.router.add_post("/predictions/{model}", routes.predict)
    app.router.add_post("/predictions/{model}/{version}", routes.predict)
    v2.add_routes(app, supervisor, config)
    return app


def runner_for(app: web.Application, config: Config) -> web.AppRunner:
    """A runner with the configured limits: header and idle timeout, header sizes, shutdown time."""
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=config.shutdown_timeout_s,
        keepalive_timeout=config.header_timeout_s,
        # After an early answer (408, 413) the rest of the body is read and dropped, for a while.
        lingering_time=min(config.body_timeout_s, LINGER_MAX_S),
    )


async def start_runner(runner: web.AppRunner, host: str, port: int, max_connections: int) -> None:
    """Set the runner up, cap its connections and listen on ``host:port``."""
    await runner.setup()
    assert runner.server is not None
    guard_server(runner.server, max_connections)
    await web.TCPSite(runner, host, port).start()
