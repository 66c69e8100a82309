"""The management app (127.0.0.1 by default): models, workers and ``/metrics``.

Register, unregister and scale replace the workers without failing a request (see
:meth:`Supervisor.replace_workers`); each answers once the change is done.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from fastinfer.config import Config
from fastinfer.errors import BadRequest, FastInferError
from fastinfer.server.access import AccessLog, bearer_auth
from fastinfer.server.http import MODEL_VERSION, errors_as_json
from fastinfer.supervisor import Supervisor

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_WORKERS = 256
TEST_RUNTIME_PREFIX = "echo:"


def resolve_model_path(path: str, model_store: str) -> str:
    """The file a registration names: a path, or a file name inside the model store (BadRequest if none)."""
    if path.startswith(TEST_RUNTIME_PREFIX):
        return path
    candidate = Path(path)
    if model_store and not candidate.is_absolute():
        store = Path(model_store).resolve()
        candidate = (store / candidate).resolve()
        if not candidate.is_relative_to(store):
            raise BadRequest(f'"path" {path!r} leaves the model store')
    if not candidate.is_file():
        where = f" (nor in the model store {model_store})" if model_store else ""
        raise BadRequest(f'"path": no model file {path!r}{where}')
    return str(candidate.resolve())


async def _params(request: web.Request) -> dict[str, Any]:
    """Parameters from the query string and, if there is one, a JSON object body (which wins)."""
    params: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        try:
            body = json.loads(await request.read())
        except ValueError as error:
            raise BadRequest(f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        params.update(body)
    return params


class ManagementRoutes:
    """Handlers of the management app."""

    def __init__(self, supervisor: Supervisor, config: Config):
        self.supervisor = supervisor
        self.config = config

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"modelName": name} for name in sorted(self.supervisor.model_paths)]})

    def _describe(self, name: str) -> dict[str, Any]:
        supervisor = self.supervisor
        described: dict[str, Any] = {"name": name}
        try:
            signature = supervisor.signature(name)
        except FastInferError as error:
            if error.status != 503:
                raise
            described["status"] = "failed" if supervisor.failure else "loading"
        else:
            described.update(signature.to_dict())
            described["status"] = "ready"
            described["batch_max_size"] = supervisor.batcher.queues[name].max_batch
        described["path"] = supervisor.model_paths[name]
        described["versions"] = [MODEL_VERSION]
        return {**described, **supervisor.health()}

    async def describe_model(self, request: web.Request) -> web.Response:
        return web.json_response(self._describe(request.match_info["model"]))

    async def register_model(self, request: web.Request) -> web.Response:
        params = await _params(request)
        name, path = params.get("name"), params.get("path")
        if not isinstance(path, str) or not path:
            raise BadRequest('"path" (a model file, or a file name in the model store) is required')
        if name is None:
            name = Path(path).stem
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise BadRequest(f'"name" must be 1-128 letters, digits, "_", "." or "-", not {name!r}')
        await self.supervisor.add_model(name, resolve_model_path(path, self.config.model_store))
        return web.json_response(self._describe(name), status=201)

    async def unregister_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        await self.supervisor.remove_model(name)
        return web.json_response({"name": name, "status": "unregistered"})

    async def workers(self, request: web.Request) -> web.Response:
        return web.json_response({"count": len(self.supervisor.workers), **self.supervisor.health()})

    async def scale_workers(self, request: web.Request) -> web.Response:
        params = await _params(request)
        count = params.get("count")
        if isinstance(count, str) and count.isdigit():
            count = int(count)
        if type(count) is not int or not 1 <= count <= MAX_WORKERS:
            raise BadRequest(f'"count" must be an integer from 1 to {MAX_WORKERS}, not {count!r}')
        await self.supervisor.replace_workers(worker_count=count)
        return await self.workers(request)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.supervisor.metrics.exposition(), content_type="text/plain", charset="utf-8")


def management_app(supervisor: Supervisor, config: Config, access: AccessLog | None = None) -> web.Application:
    """The management routes, behind the management token if one is set."""
    middlewares: list[Middleware] = [access.middleware] if access is not None else []
    middlewares.append(errors_as_json)
    if config.management_token:
        middlewares.append(bearer_auth(config.management_token))
    routes = ManagementRoutes(supervisor, config)
    app = web.Application(middlewares=middlewares)
    app.router.add_get("/models", routes.list_models)
    app.router.add_post("/models", routes.register_model)
    app.router.add_get("/models/{model}", routes.describe_model)
    app.router.add_delete("/models/{model}", routes.unregister_model)
    app.router.add_get("/workers", routes.workers)
    app.router.add_put("/workers", routes.scale_workers)
    app.router.add_get("/metrics", routes.metrics)
    return app
