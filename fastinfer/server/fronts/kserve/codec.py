"""The KServe v2 (Open Inference Protocol) HTTP front, sans-IO: request bodies in, response parts out.

No aiohttp, asyncio or sockets here; the routes call these functions. The rules, after the KServe
v2 REST spec and Triton's binary tensor data extension:

- An infer request body is a JSON header, optionally followed by raw tensor bytes. The
  ``Inference-Header-Content-Length`` HTTP header says where the JSON ends; without it the whole
  body is JSON.
- An input carries its values either as a JSON ``data`` list (flat or nested, row-major) or as
  ``parameters.binary_data_size`` bytes after the header, little-endian, inputs in request order.
  Binary inputs are handed on as views of the body, never copied.
- Outputs are binary when the requested output says ``binary_data: true``, or, failing that, when
  the request says ``parameters.binary_data_output: true``. A response with any binary output is a
  JSON header plus raw bytes, with ``Inference-Header-Content-Length``; JSON outputs use flat
  ``data`` lists, as the spec and Triton do.
- An input or output may instead name a client shared-memory region (Triton's system shared-memory
  extension): ``parameters.shared_memory_region``, ``shared_memory_byte_size`` and optionally
  ``shared_memory_offset``. The codec only parses the reference (:class:`RegionRef`); the routes
  move the bytes (:mod:`.sysshm`).
- Errors leave as ``{"error": message}``, which tritonclient raises as ``InferenceServerException``.

A client that breaks these rules gets :class:`~fastinfer.errors.BadRequest` (400) with a message
naming the field; misuse by our own code (an output dtype KServe cannot name) is ``ValueError``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from fastinfer.errors import BadRequest, FastInferError
from fastinfer.server.fronts.jsonbody import dumps as json_dumps
from fastinfer.signature import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
SUPPORTED_EXTENSIONS = ("binary_tensor_data", "classification")

# Binary tensor data is little-endian whatever the host: spell the byte order out.
_KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NUMPY_TO_KSERVE = {(dtype.kind, dtype.itemsize): name for name, dtype in _KSERVE_TO_NUMPY.items()}
_UNSUPPORTED = {
    "BYTES": "BYTES (string) tensors are not supported for model inputs here; send numeric tensors",
    "BF16": "BF16 is not supported: numpy has no bfloat16; send FP32 or FP16",
}
# Python types a JSON ``data`` element may have, by numpy dtype kind. bool is not an int here.
_JSON_TYPES: dict[str, set[type]] = {"b": {bool}, "u": {int}, "i": {int}, "f": {int, float}}


def kserve_to_numpy(datatype: str) -> np.dtype:
    """The (little-endian) numpy dtype of a KServe datatype name; BadRequest if unknown or unsupported."""
    if datatype in _KSERVE_TO_NUMPY:
        return _KSERVE_TO_NUMPY[datatype]
    if datatype in _UNSUPPORTED:
        raise BadRequest(f'datatype "{datatype}": {_UNSUPPORTED[datatype]}')
    raise BadRequest(f'unknown datatype "{datatype}"; known: {", ".join(_KSERVE_TO_NUMPY)}')


def numpy_to_kserve(dtype: np.dtype | str | type) -> str:
    """The KServe datatype name of a numpy dtype (either byte order); ValueError if it has none."""
    dtype = np.dtype(dtype)
    try:
        return _NUMPY_TO_KSERVE[dtype.kind, dtype.itemsize]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe datatype here") from None


def _shape_str(shape: Sequence[int]) -> str:
    """A shape as the messages write it: ``[1,16]``."""
    return "[" + ",".join(str(d) for d in shape) + "]"


# -- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionRef:
    """Bytes in a client's shared-memory region: ``byte_size`` at ``offset`` of region ``region``."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(frozen=True)
class InputTensor:
    """One input: a view of the body (binary), an array converted from JSON ``data``, or a
    reference to a client's shared-memory region."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    data: memoryview | np.ndarray | RegionRef

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def raw_bytes(self) -> memoryview:
        """The tensor as little-endian, row-major bytes, without copying (not for RegionRef data)."""
        assert not isinstance(self.data, RegionRef)
        if isinstance(self.data, memoryview):
            return self.data
        return self.data.reshape(-1).view(np.uint8).data

    def as_numpy(self) -> np.ndarray:
        """The tensor as an array of its shape; a read-only view of the body for binary inputs."""
        if isinstance(self.data, np.ndarray):
            return self.data
        assert not isinstance(self.data, RegionRef)
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` already resolved against the request default."""

    name: str
    binary: bool
    class_count: int = 0
    region: RegionRef | None = None


@dataclass
class InferRequest:
    """A parsed infer request. ``outputs`` is None when the client asked for all outputs."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None
    binary_data_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def wants_json_outputs(self) -> bool:
        """Whether an output goes back as JSON ``data`` (whose encoding takes time in its size)."""
        if self.outputs is None:
            return not self.binary_data_output
        return any(not output.binary for output in self.outputs)


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header's value as an int (None when absent)."""
    if value is None:
        return None
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise BadRequest(f'{HEADER_LENGTH} must be an integer, not "{value}"') from None


def parse_infer_request(body: bytes | memoryview, header_length: int | None) -> InferRequest:
    """Parse an infer request body; ``header_length`` is the ``Inference-Header-Content-Length`` value."""
    view = memoryview(body).cast("B")
    if header_length is None:
        header_length = len(view)
        binary_allowed = False
    elif not 0 <= header_length <= len(view):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length} but the body is {len(view)} bytes")
    else:
        binary_allowed = True
    try:
        header = _loads(view[:header_length])
    except (ValueError, RecursionError) as error:
        hint = ""
        if not binary_allowed and str(error).startswith("Extra data"):
            hint = f" (binary data after the JSON needs the {HEADER_LENGTH} header)"
        raise BadRequest(f"the request header is not valid JSON: {error}{hint}") from None
    if not isinstance(header, dict):
        raise BadRequest("the request header must be a JSON object")

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest('"id" must be a string')
    parameters = _object(header.get("parameters"), '"parameters"')
    binary_data_output = _bool(parameters.get("binary_data_output", False), '"parameters.binary_data_output"')

    inputs_json = header.get("inputs")
    if inputs_json is None:
        raise BadRequest('the request has no "inputs"')
    if not isinstance(inputs_json, list):
        raise BadRequest('"inputs" must be a list')
    inputs: list[InputTensor] = []
    offset = header_length
    for index, item in enumerate(inputs_json):
        tensor, size = _parse_input(item, index, view, offset, binary_allowed)
        if any(t.name == tensor.name for t in inputs):
            raise BadRequest(f'input "{tensor.name}" is given twice')
        inputs.append(tensor)
        offset += size
    if offset != len(view):
        raise BadRequest(
            f"the body has {len(view) - offset} bytes after the binary inputs' binary_data_size "
            f"({offset - header_length} bytes in all) and the {header_length}-byte header"
        )

    outputs = None
    if "outputs" in header:
        # An empty list asks for every output, as in Triton.
        outputs = _parse_outputs(header["outputs"], binary_data_output) or None
    return InferRequest(request_id, inputs, outputs, binary_data_output, parameters)


def _loads(document: memoryview) -> Any:
    """JSON with orjson (a fifth of json's time, and no copy of the view); the json module only for
    what orjson refuses, to accept NaN and Infinity as Python clients write them, and to word errors."""
    try:
        return orjson.loads(document)
    except orjson.JSONDecodeError:
        return json.loads(bytes(document))


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false")
    return value


def _parse_input(item: Any, index: int, body: memoryview, offset: int, binary_allowed: bool) -> tuple[InputTensor, int]:
    """One input, and how many body bytes it took from ``offset``."""
    if not isinstance(item, dict):
        raise BadRequest(f"inputs[{index}] must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f'inputs[{index}] has no "name" (a non-empty string)')
    where = f'input "{name}"'
    for key in ("shape", "datatype"):
        if key not in item:
            raise BadRequest(f'{where} has no "{key}"')
    shape = item["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f'{where}: "shape" must be a list of non-negative integers, not {json.dumps(shape)}')
    datatype = item["datatype"]
    if not isinstance(datatype, str):
        raise BadRequest(f'{where}: "datatype" must be a string')
    try:
        dtype = kserve_to_numpy(datatype)
    except BadRequest as error:
        raise BadRequest(f"{where}: {error.message}") from None

    parameters = _object(item.get("parameters"), f'{where}: "parameters"')
    count = math.prod(shape)
    holds = f"shape {_shape_str(shape)} holds {count} {datatype} elements"
    if "shared_memory_region" in parameters:
        if "data" in item or "binary_data_size" in parameters:
            raise BadRequest(f"{where} names a shared-memory region and also carries data; give one")
        region = region_ref(parameters, where)
        if region.byte_size != count * dtype.itemsize:
            raise BadRequest(
                f"{where}: {holds} ({count * dtype.itemsize} bytes) but shared_memory_byte_size is {region.byte_size}"
            )
        return InputTensor(name, dtype, tuple(shape), region), 0
    has_data = "data" in item
    has_size = "binary_data_size" in parameters
    if has_data and has_size:
        raise BadRequest(f'{where} has both "data" and "parameters.binary_data_size"; give one')
    if not has_data and not has_size:
        raise BadRequest(f'{where} has neither "data" nor "parameters.binary_data_size"')

    if has_data:
        array = _json_tensor(item["data"], dtype, tuple(shape), f"{where}: {holds}", where, datatype)
        return InputTensor(name, dtype, tuple(shape), array), 0

    size = parameters["binary_data_size"]
    if type(size) is not int or size < 0:
        raise BadRequest(f'{where}: "binary_data_size" must be a non-negative integer')
    if not binary_allowed:
        raise BadRequest(f"{where} has binary_data_size but the request has no {HEADER_LENGTH} header")
    nbytes = count * dtype.itemsize
    if size != nbytes:
        raise BadRequest(f"{where}: {holds} ({nbytes} bytes) but binary_data_size is {size}")
    if offset + size > len(body):
        raise BadRequest(
            f"{where}: binary_data_size {size} at body offset {offset} runs past the body's {len(body)} bytes"
        )
    return InputTensor(name, dtype, tuple(shape), body[offset : offset + size]), size


def _json_tensor(
    data: Any, dtype: np.dtype, shape: tuple[int, ...], holds: str, where: str, datatype: str
) -> np.ndarray:
    """A JSON ``data`` list, flat or nested to follow ``shape``, as an array of that dtype and shape."""
    if not isinstance(data, list):
        raise BadRequest(f'{where}: "data" must be a list')
    # Flatten one level at a time: a list at depth k holds shape[k] lists, or, innermost, all the
    # prod(shape[k:]) values of its row; so flat, fully nested and in-between all read row-major.
    level: list[Any] = [data]
    depth = 0
    while True:
        items = list(itertools.chain.from_iterable(level))
        types = set(map(type, items))
        if list not in types:
            break
        if types != {list}:
            raise BadRequest(f'{where}: "data" mixes lists and values at depth {depth + 1}')
        if depth >= len(shape) or set(map(len, level)) != {shape[depth]}:
            raise BadRequest(f'{where}: the nesting of "data" does not follow shape {_shape_str(shape)}')
        level = items
        depth += 1
    if depth and (depth >= len(shape) or set(map(len, level)) != {math.prod(shape[depth:])}):
        raise BadRequest(f'{where}: the nesting of "data" does not follow shape {_shape_str(shape)}')
    if len(items) != math.prod(shape):
        raise BadRequest(f'{holds} but "data" has {len(items)}')
    allowed = _JSON_TYPES[dtype.kind]
    if not types <= allowed:
        wrong = next(v for v in items if type(v) not in allowed)
        raise BadRequest(f'{where}: "data" holds {json.dumps(wrong)}, which is not a {datatype} value')
    try:
        with np.errstate(over="raise"):
            array = np.array(items, dtype=dtype)
    except (OverflowError, FloatingPointError, ValueError) as error:
        raise BadRequest(f'{where}: "data" holds a value out of range for {datatype}: {error}') from None
    return array.reshape(shape)


def _parse_outputs(outputs_json: Any, binary_default: bool) -> list[RequestedOutput]:
    if not isinstance(outputs_json, list):
        raise BadRequest('"outputs" must be a list')
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(outputs_json):
        if not isinstance(item, dict):
            raise BadRequest(f"outputs[{index}] must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f'outputs[{index}] has no "name" (a non-empty string)')
        where = f'output "{name}"'
        if any(o.name == name for o in outputs):
            raise BadRequest(f"{where} is requested twice")
        parameters = _object(item.get("parameters"), f'{where}: "parameters"')
        region = region_ref(parameters, where) if "shared_memory_region" in parameters else None
        binary = _bool(parameters.get("binary_data", binary_default), f'{where}: "binary_data"')
        class_count = parameters.get("classification", 0)
        if type(class_count) is not int or class_count < 0:
            raise BadRequest(f'{where}: "classification" must be a non-negative integer')
        if region is not None and class_count:
            raise BadRequest(f"{where}: classification cannot go to a shared-memory region")
        outputs.append(RequestedOutput(name, binary, class_count, region))
    return outputs


def region_ref(parameters: dict[str, Any], where: str) -> RegionRef:
    """The ``shared_memory_*`` parameters of a tensor (JSON values, or gRPC parameters as values)."""
    region = parameters["shared_memory_region"]
    if not isinstance(region, str) or not region:
        raise BadRequest(f'{where}: "shared_memory_region" must be a non-empty string')
    if "shared_memory_byte_size" not in parameters:
        raise BadRequest(f'{where} names a shared-memory region but no "shared_memory_byte_size"')
    values = []
    for key in ("shared_memory_byte_size", "shared_memory_offset"):
        value = parameters.get(key, 0)
        if type(value) is not int or value < 0:
            raise BadRequest(f'{where}: "{key}" must be a non-negative integer')
        values.append(value)
    return RegionRef(region, values[0], values[1])


# -- checking against the model ------------------------------------------------------------------


def validate_outputs(request: InferRequest, signature_outputs: Sequence[TensorSpec]) -> None:
    """Check that every requested output is one the model gives (BadRequest if not)."""
    names = [spec.name for spec in signature_outputs]
    for output in request.outputs or ():
        if output.name not in names:
            given = ", ".join(f'"{name}"' for name in names)
            raise BadRequest(f'unknown output "{output.name}"; the model gives {given}')


# -- responses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenToRegion:
    """An output the routes wrote into the client's region: the response says where, not what."""

    shape: tuple[int, ...]
    dtype: np.dtype
    region: RegionRef


def region_entry(name: str, written: WrittenToRegion) -> dict[str, Any]:
    """An output's entry in the response when it went to a region, as Triton writes it."""
    return {
        "name": name,
        "datatype": numpy_to_kserve(written.dtype),
        "shape": list(written.shape),
        "parameters": {
            "shared_memory_region": written.region.region,
            "shared_memory_byte_size": math.prod(written.shape) * written.dtype.itemsize,
        },
    }


def build_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray | WrittenToRegion]],
    requested: Sequence[RequestedOutput] | None = None,
    binary_default: bool = False,
    labels: Sequence[str] | None = None,
) -> tuple[dict[str, str], list[bytes | memoryview]]:
    """Extra HTTP headers and body parts of an infer response.

    ``requested`` is the request's ``outputs`` (None: every output, binary if ``binary_default``,
    which is the request's ``binary_data_output``). The first part is the JSON header; then come
    the binary outputs' bytes as views of the arrays (copied only when not C-contiguous or not
    little-endian), so the arrays must outlive the write. A requested ``classification`` returns
    the top classes per batch row as BYTES ``"value:index[:label]"``, as Triton does.
    """
    arrays = dict(outputs)
    if requested is None:
        requested = [RequestedOutput(name, binary_default) for name, _ in outputs]
    header_outputs: list[dict[str, Any]] = []
    binary_parts: list[bytes | memoryview] = []
    for want in requested:
        if want.name not in arrays:
            given = ", ".join(f'"{name}"' for name in arrays)
            raise BadRequest(f'unknown output "{want.name}"; the model gives {given}')
        value = arrays[want.name]
        if isinstance(value, WrittenToRegion):
            header_outputs.append(region_entry(want.name, value))
            continue
        array = np.asarray(value)
        if want.class_count:
            strings = classify(array, want.class_count, labels)
            entry: dict[str, Any] = {"name": want.name, "datatype": "BYTES", "shape": list(strings.shape)}
            if want.binary:
                raw = b"".join(len(s).to_bytes(4, "little") + s for s in strings.reshape(-1).tolist())
                entry["parameters"] = {"binary_data_size": len(raw)}
                binary_parts.append(raw)
            else:
                entry["data"] = [s.decode() for s in strings.reshape(-1).tolist()]
        else:
            entry = {"name": want.name, "datatype": numpy_to_kserve(array.dtype), "shape": list(array.shape)}
            if want.binary:
                raw_view = _little_endian_bytes(array)
                entry["parameters"] = {"binary_data_size": len(raw_view)}
                binary_parts.append(raw_view)
            else:
                entry["data"] = array.reshape(-1)
        header_outputs.append(entry)

    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = str(model_version)
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = header_outputs
    header = json_dumps(document)
    if not binary_parts:
        return {"Content-Type": "application/json"}, [header]
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return headers, [header, *binary_parts]


def _little_endian_bytes(array: np.ndarray) -> memoryview:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8).data


def classify(array: np.ndarray, class_count: int, labels: Sequence[str] | None) -> np.ndarray:
    """Top ``class_count`` entries of each batch row (first dim), best first, ties by index."""
    rows = array.reshape(array.shape[0] if array.ndim > 1 else 1, -1)
    k = min(class_count, rows.shape[1])
    value_format = "{:f}" if array.dtype.kind == "f" else "{:d}"
    result = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        order = np.lexsort((np.arange(row.size), -row.astype(np.float64)))[:k]
        for c, index in enumerate(order.tolist()):
            text = value_format.format(row[index].item()) + f":{index}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            result[r, c] = text.encode()
    return result if array.ndim > 1 else result.reshape(k)


def error_body(error: FastInferError | str) -> dict[str, str]:
    """The error document KServe v2 clients expect: ``{"error": message}``."""
    return {"error": error.message if isinstance(error, FastInferError) else error}


# -- metadata ------------------------------------------------------------------------------------


def server_metadata(version: str, extensions: Sequence[str] = SUPPORTED_EXTENSIONS) -> dict[str, Any]:
    """The document for ``GET /v2``."""
    return {"name": "fastinfer", "version": version, "extensions": list(extensions)}


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch: int | None = None,
) -> dict[str, Any]:
    """The document for ``GET /v2/models/{name}``. With ``max_batch`` set the batch dim shows as -1."""

    def tensors(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        described = []
        for spec in specs:
            shape = [d if d >= 0 else -1 for d in spec.shape]
            if max_batch is not None and shape:
                shape[0] = -1
            described.append({"name": spec.name, "datatype": numpy_to_kserve(spec.dtype), "shape": shape})
        return described

    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": tensors(inputs),
        "outputs": tensors(outputs),
    }
