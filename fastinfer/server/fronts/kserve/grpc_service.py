"""KServe v2 over gRPC (``inference.GRPCInferenceService``): a codec around the v2 inference step.

grpcio's asyncio server runs on the front's own event loop (uvloop included: its completion queue
is polled by a thread of grpcio's that wakes the loop through a socket), so its handlers are
coroutines beside the HTTP and binary fronts', admitting requests through the same
:mod:`.infer` step and batcher. Messages are parsed by protobuf's C code (upb); what is left in
Python here is per tensor, not per element: raw contents are views copied once into the rows, typed
contents are converted by numpy, in a thread when large.

The rules, after the Open Inference Protocol's gRPC spec and Triton's server:

- An input carries raw bytes (``raw_input_contents``, one entry per input that has no region, in
  order, little-endian) or typed ``contents``, never both; or names a shared-memory region in its
  parameters (``shared_memory_region``, ``shared_memory_byte_size``, ``shared_memory_offset``).
- Outputs leave in ``raw_output_contents`` (as tritonclient and the kserve SDK read them), or in the
  client's region when the requested output names one.
- Errors leave with the gRPC status of :attr:`FastInferError.grpc_code` and the same message as on
  the other fronts. The deadline is the call's; without one, ``request_timeout_s``.
- With an inference token, every call but ServerLive and ServerReady (health) needs metadata
  ``authorization: Bearer <token>``. Messages are limited to ``max_body_bytes``; connections to
  ``max_connections``; an idle connection goes after ``header_timeout_s``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

# The front forks only to exec a worker at once, which needs none of gRPC's fork handlers; with
# them on, gRPC logs at every worker start that it skipped them (its threads are busy).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import grpc
import numpy as np

from fastinfer import __version__
from fastinfer.config import Config
from fastinfer.errors import BadRequest, DeadlineExceeded, FastInferError, ModelNotReady, Unauthorized
from fastinfer.server.admission import MODEL_VERSION, Counted, check_version
from fastinfer.server.fronts.access import token_matches
from fastinfer.server.fronts.kserve import codec, inference, proto, sysshm
from fastinfer.server.fronts.kserve.sysshm import ClientRegions
from fastinfer.server.supervisor import Supervisor

log = logging.getLogger(__name__)

PROTOCOL = "grpc"
PLATFORM = "fastinfer_tvm"
OPEN_METHODS = ("ServerLive", "ServerReady")  # health: no token needed, as the HTTP health paths
OFF_LOOP_ELEMENTS = 16 << 10  # typed contents past this are converted in a thread

# KServe datatype -> the typed-contents field that carries it (FP16, BF16: raw contents only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

M = {name: proto.message(name) for name in ("ModelInferResponse", "ModelMetadataResponse")}


# -- the codec (sans-IO) -------------------------------------------------------------------------


def parameters_of(parameters: Any) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain values."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in parameters.items()
    }


def typed_element_count(request: Any) -> int:
    """How many values the request's typed contents hold (to decide where to convert them)."""
    return sum(len(getattr(t.contents, field)) for t in request.inputs for field in set(_CONTENTS_FIELD.values()))


def parse_infer_request(request: Any) -> codec.InferRequest:
    """A ``ModelInferRequest`` as the same :class:`~.kserve.InferRequest` the REST codec makes."""
    raw = list(request.raw_input_contents)
    used_raw = 0
    inputs: list[codec.InputTensor] = []
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise BadRequest(f"inputs[{index}] has no name")
        where = f'input "{name}"'
        if any(t.name == name for t in inputs):
            raise BadRequest(f"{where} is given twice")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise BadRequest(f"{where}: the shape must hold non-negative integers, not {list(shape)}")
        try:
            dtype = codec.kserve_to_numpy(tensor.datatype)
        except BadRequest as error:
            raise BadRequest(f"{where}: {error.message}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        holds = f"shape {list(shape)} holds {math.prod(shape)} {tensor.datatype} elements ({nbytes} bytes)"
        parameters = parameters_of(tensor.parameters)
        has_contents = tensor.HasField("contents")
        data: memoryview | np.ndarray | codec.RegionRef
        if "shared_memory_region" in parameters:
            if has_contents:
                raise BadRequest(f"{where} names a shared-memory region and also has contents; give one")
            data = codec.region_ref(parameters, where)
            if data.byte_size != nbytes:
                raise BadRequest(f"{where}: {holds} but shared_memory_byte_size is {data.byte_size}")
        elif raw:
            if has_contents:
                raise BadRequest(f"{where} has contents, but the request uses raw_input_contents; give one kind")
            if used_raw >= len(raw):
                raise BadRequest(f"raw_input_contents has {len(raw)} entries, fewer than the inputs without a region")
            data = memoryview(raw[used_raw])
            used_raw += 1
            if len(data) != nbytes:
                raise BadRequest(f"{where}: {holds} but its raw_input_contents entry has {len(data)} bytes")
        else:
            data = _typed(tensor, dtype, shape, where, holds)
        inputs.append(codec.InputTensor(name, dtype, shape, data))
    if used_raw != len(raw):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries but {used_raw} inputs take raw contents")

    outputs: list[codec.RequestedOutput] = []
    for index, wanted in enumerate(request.outputs):
        if not wanted.name:
            raise BadRequest(f"outputs[{index}] has no name")
        where = f'output "{wanted.name}"'
        if any(o.name == wanted.name for o in outputs):
            raise BadRequest(f"{where} is requested twice")
        parameters = parameters_of(wanted.parameters)
        region = codec.region_ref(parameters, where) if "shared_memory_region" in parameters else None
        class_count = parameters.get("classification", 0)
        if type(class_count) is not int or class_count < 0:
            raise BadRequest(f'{where}: "classification" must be a non-negative integer')
        if region is not None and class_count:
            raise BadRequest(f"{where}: classification cannot go to a shared-memory region")
        outputs.append(codec.RequestedOutput(wanted.name, True, class_count, region))
    return codec.InferRequest(request.id or None, inputs, outputs or None, True, parameters_of(request.parameters))


def _typed(tensor: Any, dtype: np.dtype, shape: tuple[int, ...], where: str, holds: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise BadRequest(f"{where}: {tensor.datatype} has no typed contents; send it in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        raise BadRequest(f"{where}: {holds} but contents.{field} has {len(values)}")
    wide = np.array(values, dtype=np.float64 if dtype.kind == "f" else np.bool_ if dtype.kind == "b" else np.int64)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise BadRequest(f"{where}: contents.{field} holds a value out of range for {tensor.datatype}")
    if dtype.kind == "u" and dtype.itemsize == 8:
        wide = np.array(values, dtype=np.uint64)  # past int64's range
    return wide.astype(dtype).reshape(shape)


def build_infer_response(
    model: str, request: codec.InferRequest, outputs: inference.Outputs, labels: list[str] | None = None
) -> Any:
    """The ``ModelInferResponse``: the requested outputs (all, when none is named), raw or in regions."""
    response = M["ModelInferResponse"](model_name=model, model_version=MODEL_VERSION, id=request.id or "")
    arrays = dict(outputs)
    requested = request.outputs or [codec.RequestedOutput(name, True) for name, _ in outputs]
    for want in requested:
        value = arrays[want.name]
        tensor = response.outputs.add(name=want.name)
        if isinstance(value, codec.WrittenToRegion):
            entry = codec.region_entry(want.name, value)
            tensor.datatype, tensor.shape[:] = entry["datatype"], entry["shape"]
            tensor.parameters["shared_memory_region"].string_param = value.region.region
            tensor.parameters["shared_memory_byte_size"].int64_param = entry["parameters"]["shared_memory_byte_size"]
        elif want.class_count:
            strings = codec.classify(value, want.class_count, labels)
            tensor.datatype, tensor.shape[:] = "BYTES", list(strings.shape)
            response.raw_output_contents.append(
                b"".join(len(s).to_bytes(4, "little") + s for s in strings.reshape(-1).tolist())
            )
        else:
            tensor.datatype, tensor.shape[:] = codec.numpy_to_kserve(value.dtype), list(value.shape)
            response.raw_output_contents.append(np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes())
    return response


def peer_host(peer: str) -> str | None:
    """The address in a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``); None for Unix."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind.startswith("unix"):
        return None
    return peer or "unknown"


# -- the service ---------------------------------------------------------------------------------


class GrpcFront:
    """The gRPC listener; ``start()`` binds ``host:grpc_port`` (-1: any free port)."""

    def __init__(self, supervisor: Supervisor, config: Config, regions: ClientRegions | None = None):
        self.supervisor = supervisor
        self.config = config
        self.regions = regions
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.max_body_bytes),
            ("grpc.max_allowed_incoming_connections", config.max_connections),
            ("grpc.max_connection_idle_ms", int(config.header_timeout_s * 1000)),
            ("grpc.so_reuseport", 0),  # a second server on the port is an error, as on HTTP
        ]
        server = grpc.aio.server(options=options)
        handlers = {}
        for name, (request_class, response_class) in proto.methods().items():
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._handler(name, getattr(self, name), response_class),
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proto.SERVICE, handlers),))
        port = max(config.grpc_port, 0)
        try:
            self.port = server.add_insecure_port(f"{_bracketed(config.host)}:{port}")
        except RuntimeError as error:
            raise OSError(98, f"cannot bind the gRPC port: {error}") from None
        self._server = server
        await server.start()

    async def stop(self, timeout_s: float) -> None:
        """Refuse new calls; let those in flight finish within ``timeout_s``, then cancel them."""
        if self._server is not None:
            await self._server.stop(timeout_s)
            self._server = None

    def _handler(
        self, name: str, method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]], response_class: Any
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """``method`` behind the token check, its FastInferErrors as gRPC statuses."""
        token = self.config.inference_token

        @functools.wraps(method)
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if token and name not in OPEN_METHODS and not token_matches(_bearer(context), token):
                    raise Unauthorized("this port needs metadata authorization: Bearer <token>, and that one is not it")
                return await method(request, response_class(), context)
            except FastInferError as error:
                status, message = grpc.StatusCode[error.grpc_code], error.message
            # Outside the except block: gRPC keeps the exception abort() raises for as long as the
            # call lives, and raised in there it would chain the error, whose traceback holds the
            # request's frames (with any view of the slot memory they hold, which then stays mapped).
            await context.abort(status, message)

        return handle

    # -- health and metadata --

    async def ServerLive(self, request: Any, response: Any, context: Any) -> Any:
        response.live = True
        return response

    async def ServerReady(self, request: Any, response: Any, context: Any) -> Any:
        response.ready = self.supervisor.ready and not self.supervisor.draining  # as /v2/health/ready
        return response

    async def ModelReady(self, request: Any, response: Any, context: Any) -> Any:
        check_version(request.name, request.version or None)
        try:
            self.supervisor.signature(request.name)  # ModelNotFound: NOT_FOUND
            response.ready = True
        except ModelNotReady:
            response.ready = False
        return response

    async def ServerMetadata(self, request: Any, response: Any, context: Any) -> Any:
        response.name, response.version = "fastinfer", __version__
        response.extensions[:] = [*codec.SUPPORTED_EXTENSIONS, *([sysshm.EXTENSION] if self.regions else [])]
        return response

    async def ModelMetadata(self, request: Any, response: Any, context: Any) -> Any:
        check_version(request.name, request.version or None)
        signature = self.supervisor.signature(request.name)
        # Per-sample shapes with a batch axis of -1 in front: any number of samples, as on REST.
        document = codec.model_metadata(signature.name, [MODEL_VERSION], PLATFORM, signature.inputs, signature.outputs)
        response.name, response.platform = document["name"], document["platform"]
        response.versions[:] = document["versions"]
        for key in ("inputs", "outputs"):
            for tensor in document[key]:
                getattr(response, key).add(
                    name=tensor["name"], datatype=tensor["datatype"], shape=[-1, *tensor["shape"]]
                )
        return response

    # -- inference --

    async def ModelInfer(self, request: Any, response: Any, context: grpc.aio.ServicerContext) -> Any:
        with Counted(self.supervisor.metrics, self.supervisor.model_paths, request.model_name, PROTOCOL):
            return await self._infer(request, context)

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        check_version(request.model_name, request.model_version or None)
        signature = self.supervisor.signature(request.model_name)
        if signature.takes_images:
            raise BadRequest(
                f"model {signature.name!r} takes encoded images, not tensors: POST the image to "
                f"/predictions/{signature.name}"
            )
        remaining = context.time_remaining()
        timeout_s = self.config.request_timeout_s if remaining is None else remaining
        if timeout_s <= 0:
            raise DeadlineExceeded("the call's deadline passed before it was read")

        most_samples = self.supervisor.batcher.queues[signature.name].limits.queue_max_size

        def parse() -> codec.InferRequest:
            parsed = parse_infer_request(request)
            inference.check(parsed, signature, most_samples)
            return parsed

        parsed = await inference.parse_off_loop_if(typed_element_count(request) > OFF_LOOP_ELEMENTS, parse)
        local = sysshm.is_local(peer_host(context.peer()))
        outputs = await inference.infer(self.supervisor, signature, parsed, timeout_s, self.regions, local)
        return build_infer_response(signature.name, parsed, outputs)

    # -- Triton's system shared-memory extension --

    def _regions(self, context: Any) -> ClientRegions:
        inference.check_regions_allowed(self.regions, sysshm.is_local(peer_host(context.peer())))
        assert self.regions is not None
        return self.regions

    async def SystemSharedMemoryStatus(self, request: Any, response: Any, context: Any) -> Any:
        for region in self._regions(context).status(request.name):
            entry = response.regions[str(region["name"])]
            entry.name, entry.key = region["name"], region["key"]
            entry.offset, entry.byte_size = region["offset"], region["byte_size"]
        return response

    async def SystemSharedMemoryRegister(self, request: Any, response: Any, context: Any) -> Any:
        self._regions(context).register(request.name, request.key, request.offset, request.byte_size)
        return response

    async def SystemSharedMemoryUnregister(self, request: Any, response: Any, context: Any) -> Any:
        self._regions(context).unregister(request.name)
        return response


def _bearer(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, token = str(value).strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
