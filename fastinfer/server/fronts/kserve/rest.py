"""The KServe v2 (Open Inference Protocol) routes: aiohttp glue around the sans-IO :mod:`.codec`.

An infer request whose batch dimension is N takes N rows of its model's batches, one per sample,
so its samples batch with other requests' like any other (any N: the metadata's batch dimension
is -1); the outputs are stacked back in order (or written to the client's shared-memory region,
see :mod:`.sysshm`, whose ``/v2/systemsharedmemory`` routes are here, and answer 403 while it
is off). The body is received chunk by chunk into memory of the request's own, within the body
timeout; a body past ``OFF_LOOP_BYTES`` is parsed (JSON with orjson, tensors converted) in the
parse thread (see :func:`.inference.parse_off_loop_if`), and a JSON reply past it is encoded there,
so a large JSON body does not hold the event loop.
Image models take encoded images, which KServe's numeric tensors cannot carry: they answer 400
and point to ``/predictions``.
"""

from __future__ import annotations

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Middleware

from fastinfer import __version__
from fastinfer.config import Config
from fastinfer.errors import BadRequest, PayloadTooLarge
from fastinfer.protocol import aligned_buffer
from fastinfer.server.admission import (
    MODEL_VERSION,
    RETRY_AFTER_S,
    Counted,
    check_version,
    read_body,
    timeout_from,
)
from fastinfer.server.fronts.access import CHECKS_TOKEN, bearer_auth
from fastinfer.server.fronts.jsonbody import json_response
from fastinfer.server.fronts.jsonerrors import errors_as
from fastinfer.server.fronts.kserve import codec, inference, sysshm
from fastinfer.server.fronts.kserve.sysshm import ClientRegions
from fastinfer.server.supervisor import Supervisor
from fastinfer.signature import ModelSignature, TensorSpec

PREFIX = "/v2"
HEALTH_PATHS = (PREFIX + "/health/live", PREFIX + "/health/ready")  # open without a token
PLATFORM = "fastinfer_tvm"
PROTOCOL = "v2"
OFF_LOOP_BYTES = 64 << 10  # bodies past this are parsed in a thread (a thousand floats of JSON take ~0.2 ms)


class V2Routes:
    """Handlers of the ``/v2`` routes for one server."""

    def __init__(self, supervisor: Supervisor, config: Config, regions: ClientRegions | None = None):
        self.supervisor = supervisor
        self.config = config
        self.metrics = supervisor.metrics
        self.regions = regions

    async def server_metadata(self, request: web.Request) -> web.Response:
        extensions = [*codec.SUPPORTED_EXTENSIONS, *([sysshm.EXTENSION] if self.regions is not None else [])]
        return web.json_response(codec.server_metadata(__version__, extensions))

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
        document = codec.model_metadata(
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
        with Counted(self.metrics, self.supervisor.model_paths, model, PROTOCOL) as counted:
            try:
                return await self._infer(request)
            except web.HTTPException as error:
                counted.code = error.reason.lower().replace(" ", "_")
                raise

    async def _infer(self, request: web.Request) -> web.Response:
        signature = self._signature(request)
        if signature.takes_images:
            raise BadRequest(
                f"model {signature.name!r} takes encoded images, not tensors: POST the image to "
                f"/predictions/{signature.name}"
            )
        header_length = codec.parse_header_length(request.headers.get(codec.HEADER_LENGTH))
        timeout_s = timeout_from(request, self.config.request_timeout_s)
        body = await self._receive(request)
        most_samples = self.supervisor.batcher.queues[signature.name].limits.queue_max_size
        parsed = await inference.parse_off_loop_if(
            len(body) > OFF_LOOP_BYTES, decode, body, header_length, signature, most_samples
        )

        # The body is read: look the model up again, in case its workers were replaced meanwhile.
        signature = self._signature(request)
        local = sysshm.is_local(request.remote)
        outputs = await inference.infer(self.supervisor, signature, parsed, timeout_s, self.regions, local)
        json_bytes = sum(array.nbytes for _, array in outputs if isinstance(array, np.ndarray))
        headers, parts = await inference.parse_off_loop_if(
            parsed.wants_json_outputs and json_bytes > OFF_LOOP_BYTES,
            codec.build_infer_response,
            signature.name,
            MODEL_VERSION,
            parsed.id,
            outputs,
            parsed.outputs,
            parsed.binary_data_output,
        )
        return web.Response(body=b"".join(parts), headers=headers)

    async def _receive(self, request: web.Request) -> memoryview:
        """The body, whole, in one aligned buffer: one copy of the chunks aiohttp received."""
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
        size = limit if request.content_length is None else request.content_length
        too_long = lambda: PayloadTooLarge(f"the body is over the limit of {limit} bytes")  # noqa: E731
        body = await read_body(request, size, too_long, self.config.body_timeout_s)
        buffer = aligned_buffer(body.nbytes)  # one contiguous copy, aligned for the tensors inside
        body.copy_into(buffer)
        return buffer


def decode(
    body: memoryview, header_length: int | None, signature: ModelSignature, max_samples: int
) -> codec.InferRequest:
    """Parse and check an infer request (sans-IO: runs in a thread for large bodies)."""
    parsed = codec.parse_infer_request(body, header_length)
    inference.check(parsed, signature, max_samples)
    return parsed


class SharedMemoryRoutes:
    """``/v2/systemsharedmemory``: Triton's system shared-memory extension, for local clients only."""

    def __init__(self, regions: ClientRegions | None):
        self.regions = regions

    def _local(self, request: web.Request) -> ClientRegions:
        """The registry, once the client may use it (403 saying why not)."""
        inference.check_regions_allowed(self.regions, sysshm.is_local(request.remote))
        assert self.regions is not None
        return self.regions

    async def status(self, request: web.Request) -> web.Response:
        return json_response(self._local(request).status(request.match_info.get("name", "")))

    async def register(self, request: web.Request) -> web.Response:
        regions = self._local(request)
        try:
            document = await request.json() if request.can_read_body else None
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise BadRequest('the body must be a JSON object {"key", "offset", "byte_size"}')
        regions.register(
            request.match_info["name"], document.get("key"), document.get("offset", 0), document.get("byte_size")
        )
        return web.Response()

    async def unregister(self, request: web.Request) -> web.Response:
        self._local(request).unregister(request.match_info.get("name", ""))
        return web.Response()


def batched(specs: tuple[TensorSpec, ...], max_batch: int) -> list[TensorSpec]:
    """Per-sample specs with the batch axis put in front, as KServe shows and checks them."""
    return [TensorSpec(spec.name, spec.dtype, (max_batch, *spec.shape)) for spec in specs]


def v2_app(supervisor: Supervisor, config: Config, regions: ClientRegions | None = None) -> web.Application:
    """The ``/v2`` routes, as a sub-application to mount at ``PREFIX``: its errors answer in KServe's
    shape, its bearer check (when the port has a token) included."""
    middlewares: list[Middleware] = [errors_as(kserve_error)]
    if config.inference_token:
        middlewares.append(bearer_auth(config.inference_token, HEALTH_PATHS))
    app = web.Application(middlewares=middlewares)
    app[CHECKS_TOKEN] = bool(config.inference_token)
    routes = V2Routes(supervisor, config, regions)
    app.router.add_get("", routes.server_metadata)  # PREFIX itself
    app.router.add_get("/health/live", routes.live)
    app.router.add_get("/health/ready", routes.ready)
    for prefix in ("/models/{model}", "/models/{model}/versions/{version}"):
        app.router.add_get(prefix, routes.model_metadata)
        app.router.add_get(prefix + "/ready", routes.model_ready)
        app.router.add_post(prefix + "/infer", routes.infer)
    shm = SharedMemoryRoutes(regions)  # with regions None (off), each answers 403 saying so
    for prefix in ("/systemsharedmemory", "/systemsharedmemory/region/{name}"):
        app.router.add_get(prefix + "/status", shm.status)
        app.router.add_post(prefix + "/unregister", shm.unregister)
    app.router.add_post("/systemsharedmemory/region/{name}/register", shm.register)
    return app


def kserve_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """``{"error": message}``, which KServe v2 clients (tritonclient) show."""
    return web.json_response(codec.error_body(message), status=status, headers=headers)
