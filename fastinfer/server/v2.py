"""The KServe v2 (Open Inference Protocol) routes: aiohttp glue around the sans-IO :mod:`.kserve` codec.

An infer request whose batch dimension is N takes N rows of its model's batches, one per sample,
so its samples batch with other requests' like any other (any N: the metadata's batch dimension
is -1); the outputs are stacked back in order. The body is received chunk by chunk into memory of
the request's own, within the body timeout; a body past ``OFF_LOOP_BYTES`` is parsed (JSON with
orjson, tensors converted) in a thread, so a large JSON body does not hold the event loop.
Image models take encoded images, which KServe's numeric tensors cannot carry: they answer 400
and point to ``/predictions``.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Middleware

from fastinfer import __version__
from fastinfer.batcher import Row
from fastinfer.config import Config
from fastinfer.errors import BadRequest, FastInferError, PayloadTooLarge
from fastinfer.protocol import aligned_buffer
from fastinfer.server import kserve
from fastinfer.server.access import CHECKS_TOKEN, bearer_auth
from fastinfer.server.admission import MODEL_VERSION, RETRY_AFTER_S, check_version, read_body_into, timeout_from
from fastinfer.server.jsonerrors import errors_as
from fastinfer.signature import ModelSignature, TensorSpec, samples_of
from fastinfer.supervisor import Supervisor

PREFIX = "/v2"
HEALTH_PATHS = (PREFIX + "/health/live", PREFIX + "/health/ready")  # open without a token
PLATFORM = "fastinfer_tvm"
PROTOCOL = "v2"
OFF_LOOP_BYTES = 64 << 10  # bodies past this are parsed in a thread (a thousand floats of JSON take ~0.2 ms)


class V2Routes:
    """Handlers of the ``/v2`` routes for one server."""

    def __init__(self, supervisor: Supervisor, config: Config):
        self.supervisor = supervisor
        self.config = config
        self.metrics = supervisor.metrics

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(kserve.server_metadata(__version__))

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.supervisor.ready and not self.supervisor.draining
        headers = None if ready else {"Retry-After": str(RETRY_AFTER_S)}
        return web.json_response({"ready": ready}, status=200 if ready else 503, headers=headers)

    def _signature(self, request: web.Request) -> ModelSignature:
        model = request.match_info["model"]
        check_version(model, request.match_info.get("version"))
        return self.supervisor.signature(model)

    async def model_metadata(self, request: web.Request) -> web.Response:
        signature = self._signature(request)
        max_batch = self.supervisor.batcher.queues[signature.name].max_batch
        document = kserve.model_metadata(
            signature.name,
            [MODEL_VERSION],
            PLATFORM,
            batched(signature.inputs, max_batch),
            batched(signature.outputs, max_batch),
            max_batch,
        )
        return web.json_response(document)

    async def model_ready(self, request: web.Request) -> web.Response:
        self._signature(request)  # 404 if unknown, 503 if not ready
        return web.json_response({"name": request.match_info["model"], "ready": True})

    async def infer(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        started = time.perf_counter()
        code = "ok"
        self.metrics.request_started(PROTOCOL)
        try:
            return await self._infer(request)
        except FastInferError as error:
            code = error.code
            raise
        except web.HTTPException as error:
            code = error.reason.lower().replace(" ", "_")
            raise
        finally:
            self.metrics.request_ended(PROTOCOL)
            if model in self.supervisor.model_paths:
                self.metrics.request_done(model, PROTOCOL, code, time.perf_counter() - started)

    async def _infer(self, request: web.Request) -> web.Response:
        signature = self._signature(request)
        if signature.takes_images:
            raise BadRequest(
                f"model {signature.name!r} takes encoded images, not tensors: POST the image to "
                f"/predictions/{signature.name}"
            )
        header_length = kserve.parse_header_length(request.headers.get(kserve.HEADER_LENGTH))
        timeout_s = timeout_from(request, self.config.request_timeout_s)
        body = await self._receive(request)
        if len(body) > OFF_LOOP_BYTES:
            parsed, data = await asyncio.to_thread(decode, body, header_length, signature, self.config.queue_max_size)
        else:
            parsed, data = decode(body, header_length, signature, self.config.queue_max_size)

        # The body is read: look the model up again, in case its workers were replaced meanwhile.
        signature = self._signature(request)
        batcher = self.supervisor.batcher
        samples = parsed.inputs[0].shape[0] if parsed.inputs else 1

        rows: list[Row] = []
        try:
            for _ in range(samples):
                rows.append(batcher.reserve(signature.name, timeout_s))
            for k, spec in enumerate(signature.inputs):
                raw = data[spec.name]
                for i, row in enumerate(rows):
                    with row.input_view(k) as view:
                        view[:] = raw[i * spec.nbytes : (i + 1) * spec.nbytes]
            sample_bytes = sum(spec.nbytes for spec in signature.inputs)
            for row in rows:
                row.filled(sample_bytes)
            results = await asyncio.gather(*(row.result() for row in rows))
            outputs = [
                (spec.name, np.stack([result.outputs[j] for result in results]))
                for j, spec in enumerate(signature.outputs)
            ]
        finally:
            for row in rows:
                row.release()
        headers, parts = kserve.build_infer_response(
            signature.name, MODEL_VERSION, parsed.id, outputs, parsed.outputs, parsed.binary_data_output
        )
        return web.Response(body=b"".join(parts), headers=headers)

    async def _receive(self, request: web.Request) -> memoryview:
        """The body, chunk by chunk into an aligned buffer (no join, no copy of aiohttp's)."""
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
        buffer = aligned_buffer(limit if request.content_length is None else request.content_length)
        too_long = lambda: PayloadTooLarge(f"the body is over the limit of {limit} bytes")  # noqa: E731
        nbytes = await read_body_into(request, buffer, too_long, self.config.body_timeout_s)
        return buffer[:nbytes]


def decode(
    body: memoryview, header_length: int | None, signature: ModelSignature, max_samples: int
) -> tuple[kserve.InferRequest, dict[str, memoryview]]:
    """Parse and check an infer request, and each input's bytes (sans-IO: runs in a thread for large bodies)."""
    parsed = kserve.parse_infer_request(body, header_length)
    given = [(t.name, t.dtype, t.shape) for t in parsed.inputs]
    samples_of(signature.inputs, given, max_samples, dtype_name=kserve.numpy_to_kserve)
    kserve.validate_outputs(parsed, signature.outputs)
    return parsed, {tensor.name: tensor.raw_bytes() for tensor in parsed.inputs}


def batched(specs: tuple[TensorSpec, ...], max_batch: int) -> list[TensorSpec]:
    """Per-sample specs with the batch axis put in front, as KServe shows and checks them."""
    return [TensorSpec(spec.name, spec.dtype, (max_batch, *spec.shape)) for spec in specs]


def v2_app(supervisor: Supervisor, config: Config) -> web.Application:
    """The ``/v2`` routes, as a sub-application to mount at ``PREFIX``: its errors answer in KServe's
    shape, its bearer check (when the port has a token) included."""
    middlewares: list[Middleware] = [errors_as(kserve_error)]
    if config.inference_token:
        middlewares.append(bearer_auth(config.inference_token, HEALTH_PATHS))
    app = web.Application(middlewares=middlewares)
    app[CHECKS_TOKEN] = bool(config.inference_token)
    routes = V2Routes(supervisor, config)
    app.router.add_get("", routes.server_metadata)  # PREFIX itself
    app.router.add_get("/health/live", routes.live)
    app.router.add_get("/health/ready", routes.ready)
    for prefix in ("/models/{model}", "/models/{model}/versions/{version}"):
        app.router.add_get(prefix, routes.model_metadata)
        app.router.add_get(prefix + "/ready", routes.model_ready)
        app.router.add_post(prefix + "/infer", routes.infer)
    return app


def kserve_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """``{"error": message}``, which KServe v2 clients (tritonclient) show."""
    return web.json_response(kserve.error_body(message), status=status, headers=headers)
