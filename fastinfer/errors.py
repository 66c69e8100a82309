"""The one error tree of fastinfer.

Errors a client can cause or see carry a stable ``code`` and the HTTP ``status`` to answer with;
the binary protocol uses the same codes, and the gRPC front the status :data:`GRPC_CODES` derives
from the HTTP one.
"""

from __future__ import annotations

import math

# The gRPC status of each HTTP status our errors carry, as Triton maps them (names of
# ``grpc.StatusCode``: this module imports no grpc). UNAVAILABLE is the one gRPC clients retry.
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ALREADY_EXISTS",
    413: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class FastInferError(Exception):
    """Root of every error fastinfer raises on purpose."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def grpc_code(self) -> str:
        """The gRPC status to answer with (a ``grpc.StatusCode`` name), derived from the HTTP status."""
        return GRPC_CODES.get(self.status, "UNKNOWN" if self.status < 500 else "INTERNAL")

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict) -> FastInferError:
        """The error a worker reported, as ``{"code", "status", "message"}``."""
        return cls(data["message"], code=data["code"], status=data.get("status", 500))


class StartupError(FastInferError):
    """The server cannot start (a port is taken, a model cannot load): it exits, saying why."""

    code = "startup_error"


class BadRequest(FastInferError):
    """The request itself is wrong: the client must change it."""

    code = "bad_request"
    status = 400


class BadImage(BadRequest):
    """The body is not an image Pillow can decode, or it is truncated."""

    code = "bad_image"


class ImageTooLarge(BadRequest):
    """The image has more pixels than the decompression-bomb limit allows."""

    code = "image_too_large"


class RequestTimeout(FastInferError):
    """The client did not send its request body within the configured time."""

    code = "request_timeout"
    status = 408


class Unauthorized(FastInferError):
    """The request has no valid bearer token."""

    code = "unauthorized"
    status = 401


class Forbidden(FastInferError):
    """The request is authenticated, or needs no token, but may not do this (client shared memory)."""

    code = "forbidden"
    status = 403


class AlreadyExists(FastInferError):
    """A name the request would register is taken."""

    code = "already_exists"
    status = 409


class PayloadTooLarge(FastInferError):
    """The body does not fit the configured limit."""

    code = "payload_too_large"
    status = 413


class ModelNotFound(FastInferError):
    """No model of that name is served."""

    code = "model_not_found"
    status = 404


class ModelNotReady(FastInferError):
    """The model exists but no worker of it is warm yet (or any more)."""

    code = "model_not_ready"
    status = 503


class WorkerDied(FastInferError):
    """The worker running the request died before answering."""

    code = "worker_died"
    status = 502


class ModelLoadError(FastInferError):
    """A model could not be read, converted or compiled."""

    code = "model_load_error"
    status = 500


class UnsafePickle(ModelLoadError):
    """A weights file asked to run code we do not allow."""

    code = "unsafe_pickle"


class Overloaded(FastInferError):
    """The model's queue or shared memory is full, or its queue would not drain in time: retry after
    ``retry_after_s`` (HTTP's Retry-After)."""

    code = "overloaded"
    status = 503

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = max(1, min(60, math.ceil(retry_after_s)))  # whole seconds, as HTTP says them


class DeadlineExceeded(FastInferError):
    """The request's deadline passed before its result was ready."""

    code = "deadline_exceeded"
    status = 504
