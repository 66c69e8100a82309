"""What a frame of the binary protocol is made of: header, frame types, dtypes, envelopes, errors.

docs/protocol.md is the specification; this module is its executable form. Nothing here does
I/O: ``fastinfer.protocol.codec`` turns bytes into frames and back with these definitions.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastinfer.errors import FastInferError

MAGIC = b"FINF"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

# magic, version, frame type, flags, request id, envelope length, payload length.
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_SIZE = HEADER.size  # 24

ALIGNMENT = 64
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_REQUEST_ID = 2**32 - 1
MAX_RANK = 32
MAX_TENSORS = 256


class FrameType(enum.IntEnum):
    """The frame types of version 1; any other value is refused for that frame only."""

    HELLO = 1
    REQUEST = 2
    RESPONSE = 3
    ERROR = 4
    PING = 5
    PONG = 6


PAYLOAD_FRAMES = frozenset({FrameType.REQUEST, FrameType.RESPONSE})

# Explicit little-endian dtypes: the wire is little-endian whatever the host.
DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype("?"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "uint16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "uint32": np.dtype("<u4"),
    "int64": np.dtype("<i8"),
    "uint64": np.dtype("<u8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

# The same codes and statuses as the HTTP API (fastinfer.errors and its users), plus the
# protocol's own. A peer may send a code missing here; its status then says what kind it is.
ERROR_STATUS: dict[str, int] = {
    "bad_request": 400,
    "bad_image": 400,
    "image_too_large": 400,
    "protocol_error": 400,
    "unauthorized": 401,
    "model_not_found": 404,
    "request_timeout": 408,
    "payload_too_large": 413,
    "internal_error": 500,
    "model_load_error": 500,
    "unsafe_pickle": 500,
    "worker_died": 502,
    "model_not_ready": 503,
    "overloaded": 503,
    "too_many_connections": 503,
    "timeout": 504,
    "deadline_exceeded": 504,
    "unsupported_version": 505,
}


class ProtocolError(FastInferError):
    """The peer broke the protocol. Subclasses say whether the connection can go on."""

    code = "protocol_error"
    status = 400
    recoverable = False

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, request_id: int = 0):
        super().__init__(message, code=code, status=status)
        self.request_id = request_id


class FrameError(ProtocolError):
    """One frame is wrong but its lengths were sound: skip its payload, answer an ERROR, go on."""

    recoverable = True


class StreamError(ProtocolError):
    """The byte stream cannot be parsed any further: answer an ERROR with request id 0, close.

    ``events`` holds the events the decoder completed in the same call before the error.
    """

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message, code=code, status=status, request_id=0)
        self.events: list[Any] = []


class ProtocolUsageError(FastInferError):
    """Our own code misused the codec (as h11's LocalProtocolError): a bug here, not the peer's."""

    code = "internal_error"
    status = 500


@dataclass(frozen=True, slots=True)
class TensorDescriptor:
    """Where one tensor lies in a payload, as a frame's envelope describes it (a model's
    per-sample spec is :class:`fastinfer.signature.TensorSpec`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A run of opaque bytes in a payload (an encoded image)."""

    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Request:
    """A REQUEST envelope: run ``model`` on tensors (``inputs``) or on one encoded ``image``."""

    model: str
    inputs: tuple[TensorDescriptor, ...] = ()
    image: ByteRange | None = None
    version: str | None = None
    timeout_ms: int | None = None
    outputs: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """A RESPONSE envelope: output tensors in the payload, and classes for classifiers."""

    model: str
    outputs: tuple[TensorDescriptor, ...] = ()
    classes: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An ERROR envelope."""

    code: str
    message: str
    status: int


@dataclass(frozen=True, slots=True)
class Hello:
    """A HELLO envelope: the versions a peer speaks, its name, and the limits it enforces."""

    versions: tuple[int, ...]
    agent: str | None = None
    max_envelope_bytes: int | None = None
    max_payload_bytes: int | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never shown


Message = Request | Response | ErrorReply | Hello | None


def aligned(offset: int) -> int:
    """``offset`` rounded up to the next multiple of ALIGNMENT."""
    return -(-offset // ALIGNMENT) * ALIGNMENT


def parse_envelope(frame_type: int, envelope: Any, payload_length: int) -> Message:
    """The typed message of a decoded envelope; FrameError when it breaks the specification.

    Keys the specification does not name are ignored, so later versions can add optional ones.
    """
    if not isinstance(envelope, dict):
        raise FrameError(f"the envelope is a {type(envelope).__name__}, not a map")
    if frame_type not in PAYLOAD_FRAMES and payload_length:
        raise FrameError(
            f"a {FrameType(frame_type).name} frame carries no payload; this one has {payload_length} bytes"
        )
    if frame_type == FrameType.REQUEST:
        return _parse_request(envelope, payload_length)
    if frame_type == FrameType.RESPONSE:
        classes = envelope.get("classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, dict) for c in classes)):
            raise FrameError("'classes' must be a list of maps")
        return Response(
            model=_field(envelope, "model", str),
            outputs=parse_tensors(envelope.get("outputs", []), payload_length, "outputs"),
            classes=None if classes is None else tuple(classes),
        )
    if frame_type == FrameType.ERROR:
        return ErrorReply(
            _field(envelope, "code", str), _field(envelope, "message", str), _field(envelope, "status", int)
        )
    if frame_type == FrameType.HELLO:
        versions = _field(envelope, "versions", list)
        if not versions or not all(_is_int(v) for v in versions):
            raise FrameError("'versions' must be a non-empty list of integers")
        return Hello(
            versions=tuple(versions),
            agent=_optional(envelope, "agent", str),
            max_envelope_bytes=_optional(envelope, "max_envelope_bytes", int),
            max_payload_bytes=_optional(envelope, "max_payload_bytes", int),
            token=_optional(envelope, "token", str),
        )
    return None  # PING, PONG: the envelope is empty or ignored.


def _parse_request(envelope: dict, payload_length: int) -> Request:
    model = _field(envelope, "model", str)
    has_inputs, has_image = "inputs" in envelope, "image" in envelope
    if has_inputs == has_image:
        raise FrameError("a request carries either 'inputs' or 'image', and not both")
    image = None
    inputs: tuple[TensorDescriptor, ...] = ()
    if has_image:
        raw = envelope["image"]
        if not isinstance(raw, dict):
            raise FrameError("'image' must be a map {offset, nbytes}")
        image = ByteRange(_field(raw, "offset", int), _field(raw, "nbytes", int))
        _check_range(image.offset, image.nbytes, payload_length, "image")
    else:
        inputs = parse_tensors(envelope["inputs"], payload_length, "inputs")
    timeout_ms = _optional(envelope, "timeout_ms", int)
    if timeout_ms is not None and timeout_ms <= 0:
        raise FrameError(f"'timeout_ms' must be positive, not {timeout_ms}")
    outputs = _optional(envelope, "outputs", list)
    if outputs is not None and not all(isinstance(name, str) for name in outputs):
        raise FrameError("'outputs' must be a list of names")
    return Request(
        model=model,
        inputs=inputs,
        image=image,
        version=_optional(envelope, "version", str),
        timeout_ms=timeout_ms,
        outputs=None if outputs is None else tuple(outputs),
    )


def parse_tensors(raw: Any, payload_length: int, what: str) -> tuple[TensorDescriptor, ...]:
    """Validated tensor descriptors: known dtype, nbytes = prod(shape) * itemsize, aligned
    offsets, inside the payload, unique names, no two tensors overlapping."""
    if not isinstance(raw, list):
        raise FrameError(f"'{what}' must be a list of tensor descriptors")
    if len(raw) > MAX_TENSORS:
        raise FrameError(f"'{what}' lists {len(raw)} tensors; the limit is {MAX_TENSORS}")
    specs = tuple(_parse_tensor(item, payload_length, what) for item in raw)
    if len({spec.name for spec in specs}) != len(specs):
        raise FrameError(f"two tensors of '{what}' share a name")
    end = 0
    for spec in sorted((s for s in specs if s.nbytes), key=lambda s: s.offset):
        if spec.offset < end:
            raise FrameError(f"tensor {spec.name!r} overlaps another")
        end = spec.offset + spec.nbytes
    return specs


def _parse_tensor(raw: Any, payload_length: int, what: str) -> TensorDescriptor:
    if not isinstance(raw, dict):
        raise FrameError(f"each of '{what}' must be a map {{name, dtype, shape, offset, nbytes}}")
    name = _field(raw, "name", str)
    dtype = _field(raw, "dtype", str)
    if dtype not in DTYPES:
        raise FrameError(f"tensor {name!r} has unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    shape = _field(raw, "shape", list)
    if len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise FrameError(f"tensor {name!r} needs a shape of at most {MAX_RANK} non-negative integers")
    offset, nbytes = _field(raw, "offset", int), _field(raw, "nbytes", int)
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != expected:
        raise FrameError(f"tensor {name!r} of {dtype} {shape} is {expected} bytes, not {nbytes}")
    if offset % ALIGNMENT:
        raise FrameError(f"tensor {name!r} starts at offset {offset}, not a multiple of {ALIGNMENT}")
    _check_range(offset, nbytes, payload_length, f"tensor {name!r}")
    return TensorDescriptor(name, dtype, tuple(shape), offset, nbytes)


def _check_range(offset: int, nbytes: int, payload_length: int, what: str) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > payload_length:
        raise FrameError(f"{what} at [{offset}, {offset + nbytes}) is outside the payload of {payload_length} bytes")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(envelope: Mapping, key: str, kind: type) -> Any:
    if key not in envelope:
        raise FrameError(f"the envelope has no {key!r}")
    value = envelope[key]
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise FrameError(f"{key!r} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _optional(envelope: Mapping, key: str, kind: type) -> Any:
    return None if envelope.get(key) is None else _field(envelope, key, kind)


def error_envelope(code: str, message: str, status: int | None = None, **extra: Any) -> dict[str, Any]:
    """The envelope of an ERROR frame; ``status`` defaults to the code's own. ``extra`` keys are
    added as they are (``versions=[1]`` with ``unsupported_version``)."""
    status = status if status is not None else ERROR_STATUS.get(code, 500)
    return {"code": code, "message": message, "status": status, **extra}
