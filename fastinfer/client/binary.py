"""What both binary-protocol clients share: addresses, request frames, and reading replies."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from fastinfer.errors import FastInferError
from fastinfer.protocol import (
    MAX_REQUEST_ID,
    VERSION,
    ErrorReply,
    FrameHead,
    FrameType,
    Hello,
    ProtocolError,
    Response,
    encode_frame,
    pack_tensors,
    unpack_tensors,
)

DEFAULT_ADDRESS = "tcp://127.0.0.1:8090"
DEFAULT_TIMEOUT_S = 30.0
AGENT = "fastinfer-python"


class InferenceServerError(FastInferError):
    """The server answered with an ERROR frame; ``code`` and ``status`` are the HTTP API's."""

    def __init__(self, code: str, message: str, status: int):
        super().__init__(message, code=code, status=status)

    def __repr__(self) -> str:
        return f"InferenceServerError({self.code!r}, {self.message!r}, {self.status})"


@dataclass(frozen=True, slots=True)
class Address:
    """Where a server listens: ``tcp://host:port`` or ``unix:///path/to.sock``."""

    family: socket.AddressFamily
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, address: str) -> Address:
        parts = urlsplit(address)
        if parts.scheme == "tcp" and parts.hostname and parts.port is not None:
            return cls(
                socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET, host=parts.hostname, port=parts.port
            )
        if parts.scheme == "unix" and parts.path:
            return cls(socket.AF_UNIX, path=parts.path)
        raise ValueError(f"{address!r} is neither tcp://host:port nor unix:///path")


class RequestIds:
    """Request ids 1 .. 2**32-1 in turn, skipping those still awaiting a reply (0 is the connection's)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self, in_flight: Mapping[int, Any] | set[int]) -> int:
        for _ in range(len(in_flight) + 1):
            self._last = self._last % MAX_REQUEST_ID + 1
            if self._last not in in_flight:
                return self._last
        raise AssertionError("unreachable: more ids than requests in flight")


def request_frame(
    request_id: int,
    model: str,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    image: bytes | bytearray | memoryview | None = None,
    timeout_s: float | None = None,
    version: str | None = None,
    outputs: Sequence[str] | None = None,
) -> list[bytes | memoryview]:
    """A REQUEST frame for tensors or for one encoded image, as buffers to send unjoined."""
    envelope: dict[str, Any] = {"model": model}
    parts: Sequence[bytes | bytearray | memoryview]
    if image is not None:
        view = memoryview(image).cast("B")
        envelope["image"] = {"offset": 0, "nbytes": view.nbytes}
        parts = [view]
    else:
        envelope["inputs"], parts = pack_tensors(inputs or {})
    if version is not None:
        envelope["version"] = version
    if timeout_s is not None:
        envelope["timeout_ms"] = max(1, round(timeout_s * 1000))
    if outputs is not None:
        envelope["outputs"] = list(outputs)
    return encode_frame(FrameType.REQUEST, request_id, envelope, parts)


def hello_frame(request_id: int, token: str | None = None) -> list[bytes | memoryview]:
    """A HELLO; with ``token``, the one that opens a connection to a server that requires it."""
    envelope: dict[str, Any] = {"versions": [VERSION], "agent": AGENT}
    if token is not None:
        envelope["token"] = token
    return encode_frame(FrameType.HELLO, request_id, envelope)


def hello_of(head: FrameHead) -> Hello:
    """The server's HELLO; InferenceServerError for an ERROR frame (a refused token)."""
    if head.frame_type is FrameType.ERROR:
        raise server_error(head)
    if not isinstance(head.message, Hello):
        raise InferenceServerError("protocol_error", f"HELLO was answered by {head.frame_type.name}", 400)
    return head.message


def server_error(head: FrameHead) -> InferenceServerError:
    assert isinstance(head.message, ErrorReply)
    return InferenceServerError(head.message.code, head.message.message, head.message.status)


def response_of(head: FrameHead) -> Response:
    """The RESPONSE a reply carries; InferenceServerError for an ERROR frame."""
    if head.frame_type is FrameType.ERROR:
        raise server_error(head)
    if not isinstance(head.message, Response):
        raise ProtocolError(f"a request was answered by a {head.frame_type.name} frame")
    return head.message


def outputs_of(head: FrameHead, payload: memoryview | None) -> dict[str, np.ndarray]:
    """The reply's output tensors, as arrays viewing its payload (no copy)."""
    return unpack_tensors(response_of(head).outputs, payload if payload is not None else b"")


def classes_of(head: FrameHead) -> list[dict[str, Any]]:
    """The reply's classes ``[{"index", "class", "probability"}, ...]``."""
    classes = response_of(head).classes
    if classes is None:
        raise ProtocolError("the reply to a classify request carries no 'classes'")
    return list(classes)
