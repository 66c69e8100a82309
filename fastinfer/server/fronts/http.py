"""The inference HTTP app: ``/predictions``, ``/ping``, and the KServe v2 routes of :mod:`.kserve.rest`.

Handlers parse and copy bytes only: a body goes chunk by chunk straight into its row of a batch
in shared memory, and everything heavier (decoding, numpy math) happens in the worker.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from fastinfer.config import Config
from fastinfer.errors import (
    BadImage,
    BadRequest,
    FastInferError,
    PayloadTooLarge,
)
from fastinfer.server.admission import RETRY_AFTER_S, Body, Counted, check_version, read_body, timeout_from
from fastinfer.server.fronts.access import AccessLog, bearer_auth, guard_server
from fastinfer.server.fronts.jsonbody import json_response
from fastinfer.server.fronts.jsonerrors import errors_as_json
from fastinfer.server.fronts.kserve import rest
from fastinfer.server.fronts.kserve.sysshm import ClientRegions
from fastinfer.server.supervisor import Supervisor
from fastinfer.signature import ModelSignature

LINGER_MAX_S = 10.0
HEALTH_PATHS = ("/ping",)  # and the KServe routes' own (see rest.HEALTH_PATHS)


class InferenceRoutes:
    def __init__(self, supervisor: Supervisor, config: Config):
        self.supervisor = supervisor
        self.config = config
        self.metrics = supervisor.metrics

    async def ping(self, request: web.Request) -> web.Response:
        if self.supervisor.ready and not self.supervisor.draining:
            return web.json_response({"status": "Healthy"})
        status = "Draining" if self.supervisor.draining else "Unhealthy" if self.supervisor.failure else "Starting"
        body = {"status": status, **self.supervisor.health()}
        return web.json_response(body, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def exposition(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), content_type="text/plain", charset="utf-8")

    async def predict(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        check_version(model, request.match_info.get("version"))
        with Counted(self.metrics, self.supervisor.model_paths, model, "http"):
            return await self._predict(request, model)

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
                if body.nbytes > len(view):
                    raise PayloadTooLarge(f"the body is {body.nbytes} bytes; a slot holds {len(view)}")
                body.copy_into(view)  # the one copy: from the chunks aiohttp received into the row
            finally:
                view.release()
            row.filled(body.nbytes)
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

    async def _receive(self, request: web.Request, signature: ModelSignature) -> Body:
        """The body (an image, or one sample's bytes), received whole into memory of the request's own."""
        limit = self.config.max_body_bytes
        sample = 0 if signature.takes_images else sum(spec.nbytes for spec in signature.inputs)
        too_long: Callable[[], FastInferError]
        if signature.takes_images:
            size, too_long = limit, lambda: PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        else:
            size, too_long = sample, lambda: BadRequest(f"the body is longer than the {sample} bytes the model takes")
        if request.content_length is not None:
            size = min(size, request.content_length)  # one too long is refused before a byte is read
        body = await read_body(request, size, too_long, self.config.body_timeout_s)
        if signature.takes_images and not body.nbytes:
            raise BadImage("the body is empty; send the encoded image bytes")
        if not signature.takes_images and body.nbytes != sample:
            spec = signature.inputs[0]
            raise BadRequest(
                f"input {spec.name!r} is {spec.dtype} {list(spec.shape)}, {sample} bytes; the body has {body.nbytes}"
            )
        return body


def inference_app(
    supervisor: Supervisor, config: Config, access: AccessLog | None = None, regions: ClientRegions | None = None
) -> web.Application:
    """``/ping``, ``/predictions/{model}[/{version}]`` and the KServe v2 sub-application, behind the
    port's guards."""
    middlewares: list[Middleware] = [access.middleware] if access is not None else []
    middlewares.append(errors_as_json)
    if config.inference_token:
        middlewares.append(bearer_auth(config.inference_token, HEALTH_PATHS))
    routes = InferenceRoutes(supervisor, config)
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app.router.add_get("/ping", routes.ping)
    # Also here, not only on the management port (localhost): a pod's scraper reaches the pod's IP.
    app.router.add_get("/metrics", routes.exposition)
    app.router.add_post("/predictions/{model}", routes.predict)
    app.router.add_post("/predictions/{model}/{version}", routes.predict)
    # The access log (outermost, above) records the sub-application's requests too, once.
    app.add_subapp(rest.PREFIX, rest.v2_app(supervisor, config, regions))

    async def close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
        # A kept-alive connection outlives the endpoint's removal from a load balancer: closing it
        # after each answer while draining sends the client's next request to another replica.
        if supervisor.draining:
            response.force_close()
            response.headers["Connection"] = "close"  # aiohttp wrote its headers before this hook

    app.on_response_prepare.append(close_when_draining)
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
