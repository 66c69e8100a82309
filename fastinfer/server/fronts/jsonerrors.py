"""Errors as JSON: one middleware per error shape, for an app and the routes it owns.

Every error, ours (:class:`~fastinfer.errors.FastInferError`) or aiohttp's (404, 405, 413...),
leaves with its HTTP status and a JSON body. The body's shape is the app's: ``{"code", "message"}``
on our own routes, ``{"error"}`` on KServe's (which tritonclient shows); the KServe routes are a
sub-application with a middleware of their own, so no middleware looks at URLs to choose.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from fastinfer.errors import FastInferError, Overloaded
from fastinfer.server.admission import RETRY_AFTER_S

HTTP_CODES = {413: "payload_too_large"}  # aiohttp's refusals, under the codes our own errors use

# (status, code, message, headers) -> the answer
Render = Callable[[int, str, str, dict[str, str] | None], web.Response]


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """``{"code", "message"}``, the shape of our own routes' errors."""
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


def errors_as(render: Render) -> Middleware:
    """A middleware that answers every error of the routes below it with ``render``."""

    @web.middleware
    async def errors_as_json(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except FastInferError as error:
            retry_after_s = error.retry_after_s if isinstance(error, Overloaded) else RETRY_AFTER_S
            headers = {"Retry-After": str(retry_after_s)} if error.status == 503 else None
            if error.status == 401:
                headers = {"WWW-Authenticate": "Bearer"}
            return render(error.status, error.code, error.message, headers)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            code = HTTP_CODES.get(error.status) or error.reason.lower().replace(" ", "_")
            message = error.text if error.text and not error.text.startswith(f"{error.status}:") else error.reason
            if error.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            elif error.status == 404:
                message = f"no route {request.path}"
            return render(error.status, code, message, {k: v for k, v in error.headers.items() if k == "Allow"})

    return errors_as_json


errors_as_json = errors_as(json_error)
"""Every error, ours or aiohttp's, as ``{"code", "message"}`` with its HTTP status."""
