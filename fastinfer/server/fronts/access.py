"""Who may use an HTTP port, how many at once, and the record of what they did.

- Bearer tokens: a port with a token answers 401 to a request without ``Authorization: Bearer
  <token>`` (health checks excepted). Tokens are compared in constant time and never logged.
- Connections: past ``max_connections`` open connections a new one gets a 503 and is closed.
- The access log: one line per request (method, path, model, status, latency, bytes in and out).
  The request only appends a tuple to a list, which the loop hands over every 50 ms to a thread
  that formats and writes the lines (a hand-over per request would cost a thread wake-up per
  request), so a slow log never slows a request. Lines past the bound are dropped and counted.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler

from fastinfer.errors import Unauthorized

access_log = logging.getLogger("fastinfer.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCESS_LOG_QUEUE_SIZE = 10_000  # lines
ACCESS_LOG_HAND_OVER_S = 0.05
REFUSAL_BODY = b'{"code": "too_many_connections", "message": "the server has too many open connections; retry"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(REFUSAL_BODY)).encode() + b"\r\n\r\n" + REFUSAL_BODY
)


# Set on a sub-application that has its own ``bearer_auth``: its parent's leaves its requests to it.
CHECKS_TOKEN = web.AppKey("checks_token", bool)


def bearer_auth(token: str, exempt_paths: Collection[str] = ()) -> Middleware:
    """A middleware that requires ``Authorization: Bearer <token>`` on every path but ``exempt_paths``.

    aiohttp runs a parent application's middlewares on its sub-applications' requests too, above
    theirs: a sub-application marked ``CHECKS_TOKEN`` checks its requests itself, below its own
    error middleware, so a refusal answers in that application's error shape. Unmarked ones are
    checked here.
    """

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        owner = request.match_info.apps[-1]  # the application whose route (or 404, 405) this is
        if owner is not request.match_info.current_app and owner.get(CHECKS_TOKEN, False):
            return await handler(request)
        if request.path not in exempt_paths and not token_matches(bearer_token(request.headers), token):
            raise Unauthorized("this port needs an Authorization: Bearer token, and that one is not it")
        return await handler(request)

    return check_token


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ("" if none); the scheme's case
    does not matter (RFC 9110)."""
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def token_matches(given: str, expected: str) -> bool:
    """Compared in constant time, so the answer's timing tells nothing of the token."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def guard_server(server: web.Server, max_connections: int) -> None:
    """Put an HTTP port's guards on ``server``: at most ``max_connections`` open connections (each
    one past them gets a 503 and is closed), and requests that are not HTTP answered as JSON.

    The cap is counted in ``connection_made``, where aiohttp registers each connection, so a burst
    of accepts cannot slip past it.
    """
    server.__class__ = _GuardedServer  # aiohttp builds one RequestHandler per connection, by class
    server.max_connections = max_connections  # type: ignore[attr-defined]


class _GuardedServer(web.Server):
    max_connections: int

    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self.connections) > self.max_connections:
            transport.write(REFUSAL)
            # After aiohttp has started the connection's task, which expects it open; the
            # transport closes once REFUSAL is flushed.
            asyncio.get_running_loop().call_soon(handler.force_close)


# What each of aiohttp's parse errors means, in words that quote nothing the client sent.
_PARSE_ERRORS = {
    "BadHttpMethod": "the method is not valid",
    "BadStatusLine": "the request line is not valid",
    "InvalidURLError": "the URL is not valid",
    "InvalidHeader": "a header is not valid",
    "LineTooLong": "the request line or a header is too long",
    "ContentLengthError": "the body does not match its Content-Length",
    "TransferEncodingError": "the chunked body is malformed",
    "ContentEncodingError": "the body's Content-Encoding cannot be decoded",
    "DecompressSizeError": "the decompressed body is too large",
}


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, with its own error answers in the API's form.

    aiohttp answers a request it cannot parse with a plain-text 400 that quotes the bad bytes, and
    logs a traceback that holds them (an ``Authorization`` header, a query string): here that is a
    JSON 400 and one log line that names the kind of error only. Unhandled errors (our bugs) are
    still logged with their traceback by aiohttp, and answered with a JSON 500.
    """

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already; the connection is broken")
        if isinstance(exc, HttpProcessingError) or status < 500:
            what = _PARSE_ERRORS.get(type(exc).__name__, "it is not valid HTTP")
            access_log.info("bad HTTP request from %s: %s", request.remote, what)
            body = {"code": "bad_request", "message": f"the request cannot be read: {what}"}
            status = 400 if status >= 500 else status
        else:
            body = {"code": "internal_error", "message": "the server failed to handle the request"}
        response = web.json_response(body, status=status)
        response.force_close()
        return response


class AccessLog:
    """Access-log lines gathered on the event loop and written, a batch at a time, by a thread."""

    def __init__(self, logger: logging.Logger = access_log, max_queued: int = ACCESS_LOG_QUEUE_SIZE):
        self.logger = logger
        self.max_queued = max_queued
        self.dropped = 0
        self._gathered: list[tuple] = []
        self._queue: queue.Queue[list[tuple] | None] = queue.Queue(max(1, max_queued // 100))
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write, name="fastinfer-access-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is gathered, then end the thread."""
        if self._thread is None:
            return
        self._hand_over()
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._thread = None

    def record(
        self, method: str, path: str, model: str, status: int, latency_s: float, in_bytes: int, out_bytes: int
    ) -> None:
        if len(self._gathered) >= self.max_queued:
            self.dropped += 1
            return
        if not self._gathered:
            asyncio.get_running_loop().call_later(ACCESS_LOG_HAND_OVER_S, self._hand_over)
        self._gathered.append((method, path, model, status, latency_s, in_bytes, out_bytes))

    def _hand_over(self) -> None:
        lines, self._gathered = self._gathered, []
        if not lines:
            return
        try:
            self._queue.put_nowait(lines)
        except queue.Full:
            self.dropped += len(lines)

    def _write(self) -> None:
        while (lines := self._queue.get()) is not None:
            for method, path, model, status, latency_s, in_bytes, out_bytes in lines:
                self.logger.info(
                    "%s %s model=%s status=%d latency_ms=%.2f in=%d out=%d",
                    method,
                    path,
                    model or "-",
                    status,
                    latency_s * 1000,
                    in_bytes,
                    out_bytes,
                )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record every request, whatever its outcome (an escaping exception counts as 500)."""
        started = time.perf_counter()
        status, out_bytes = 500, 0
        try:
            response = await handler(request)
            status = response.status
            out_bytes = response.content_length or 0
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            # request.path, never the query string or headers: those may hold secrets.
            self.record(
                request.method,
                request.path,
                request.match_info.get("model", ""),
                status,
                time.perf_counter() - started,
                request.content_length or 0,
                out_bytes,
            )
