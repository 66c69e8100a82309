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
from fastinfer.server.admission import MODEL_VERSION
from fastinfer.server.fronts.access import AccessLog, bearer_auth
from fastinfer.server.fronts.jsonerrors import errors_as_json
from fastinfer.server.supervisor import Supervisor

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_WORKERS = 256
TEST_RUNTIME_PREFIX = "echo:"
MAX_PATH_CHARS = 4096  # Linux's PATH_MAX


def resolve_model_path(path: str, model_store: str) -> str:
    """The file a registration names (BadRequest if there is none it may name).

    With a model store, only a file inside the store, named relative to it, and one answer for
    every refusal: "absent" and "not allowed" (an absolute path, ``..``, a symlink out of the store)
    must not tell a client which files exist elsewhere. Without one, any path (the management port
    is for the host's own administrators: localhost, and a token when set).
    """
    if path.startswith(TEST_RUNTIME_PREFIX):
        return path
    if "\x00" in path or len(path) > MAX_PATH_CHARS:
        raise BadRequest(f'"path" must be a file name of at most {MAX_PATH_CHARS} characters, without NUL')
    if model_store:
        return _in_store(path, Path(model_store))
    candidate = Path(path)
    if not _is_file(candidate):
        raise BadRequest(f'"path": no model file {path!r}')
    return str(candidate.resolve())


def _in_store(path: str, model_store: Path) -> str:
    refused = BadRequest(f'"path": no model file {path!r} in the model store')
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise refused
    store = model_store.resolve()
    candidate = (store / path).resolve()  # symlinks followed: where they lead must be in the store too
    if not candidate.is_relative_to(store) or not _is_file(candidate):
        raise refused
    return str(candidate)


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file; False for any error (a name too long, a folder we may not read)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


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
        resolved = resolve_model_path(path, self.config.model_store)
        if name is None:
            name = Path(path).stem
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise BadRequest(f'"name" must be 1-128 letters, digits, "_", "." or "-", not {name!r}')
        await self.supervisor.add_model(name, resolved)
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
        if isinstance(count, str) and count.isascii() and count.isdigit():
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
