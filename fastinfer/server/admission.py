"""What every front does to admit a request, whatever its codec: check the model's version, take
its deadline, and receive its body into memory of its own.

HTTP ``/predictions``, KServe v2 and the binary protocol import these, so the same bad request
gets the same error everywhere; none of them imports another front.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Collection
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from fastinfer.errors import BadRequest, FastInferError, ModelNotFound, RequestTimeout

if TYPE_CHECKING:
    from fastinfer.server.metrics import Metrics

IMAGE_FIELDS = ("data", "input0")
RETRY_AFTER_S = 1
DEADLINE_HEADER = "X-Deadline-Ms"
MODEL_VERSION = "1"  # models have one version until archives carry theirs


class Counted:
    """A request a front answers in one call, counted: in flight while the ``with`` block runs, then
    answered with its code (``ok``, a FastInferError's, or one the front sets) and latency, for a
    model the server serves (an unknown name would grow the metrics without bound)."""

    def __init__(self, metrics: Metrics, served: Collection[str], model: str, protocol: str):
        self.metrics, self.served, self.model, self.protocol = metrics, served, model, protocol
        self.code = "ok"

    def __enter__(self) -> Counted:
        self.started = time.perf_counter()
        self.metrics.request_started(self.protocol)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: TracebackType | None) -> None:
        if isinstance(error, FastInferError):
            self.code = error.code
        self.metrics.request_ended(self.protocol)
        if self.model in self.served:
            self.metrics.request_done(self.model, self.protocol, self.code, time.perf_counter() - self.started)


def check_version(model: str, version: str | None) -> None:
    """ModelNotFound unless ``version`` is None or one the model has."""
    if version is not None and version != MODEL_VERSION:
        raise ModelNotFound(f"model {model!r} has no version {version!r}; it has version {MODEL_VERSION}")


class Body:
    """A request's payload as the chunks aiohttp received it in (bytes it makes anyway): nothing is
    copied until the payload goes where it is used, a row of a batch or a buffer to parse."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.nbytes = 0

    def copy_into(self, view: memoryview) -> None:
        """Write the payload at the start of ``view``, which holds at least ``nbytes``."""
        at = 0
        for chunk in self.chunks:
            view[at : at + len(chunk)] = chunk
            at += len(chunk)


async def _gather(
    read_chunk: Callable[[], Awaitable[bytes]], limit: int, too_long: Callable[[], FastInferError]
) -> Body:
    body = Body()
    while chunk := await read_chunk():
        if body.nbytes + len(chunk) > limit:
            raise too_long()
        body.chunks.append(chunk)
        body.nbytes += len(chunk)
    return body


async def read_body(request: web.Request, limit: int, too_long: Callable[[], FastInferError], timeout_s: float) -> Body:
    """The payload (raw body, or the ``data``/``input0`` field of a form), at most ``limit`` bytes:
    ``too_long()`` is raised past them, RequestTimeout (408) if it is not all in within ``timeout_s``.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit, too_long)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None


async def _read_body(request: web.Request, limit: int, too_long: Callable[[], FastInferError]) -> Body:
    if request.content_type.startswith("multipart/"):
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as error:  # no boundary, or an unusable one
            raise BadRequest(f"the multipart body cannot be read: {error}") from None
        while (part := await _next_part(reader)) is not None:
            if isinstance(part, BodyPartReader) and part.name in IMAGE_FIELDS:
                return await _gather(part.read_chunk, limit, too_long)
            await part.release()
        raise BadRequest(f"the form has no field named {' or '.join(IMAGE_FIELDS)}")
    if request.content_length is not None and request.content_length > limit:
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

    return await _gather(read_chunk, limit, too_long)


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
