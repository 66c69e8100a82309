"""The KServe v2 core without a server: bodies built and read by tritonclient itself, and each bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http._utils import _get_error
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from fastinfer.errors import BadRequest, ModelNotFound
from fastinfer.server.fronts.kserve.codec import (
    HEADER_LENGTH,
    InferRequest,
    RequestedOutput,
    build_infer_response,
    error_body,
    kserve_to_numpy,
    model_metadata,
    numpy_to_kserve,
    parse_header_length,
    parse_infer_request,
    server_metadata,
    validate_outputs,
)
from fastinfer.signature import TensorSpec, samples_of

Client = triton.InferenceServerClient
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that use the dtype's range: extremes for ints, fractions and negatives for floats."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        flat = values.reshape(-1)
        if flat.size >= 2:
            flat[0], flat[1] = info.min, info.max
        return values
    return (rng.standard_normal(shape) * 100).astype(dtype)


def triton_body(*inputs: tuple[str, np.ndarray, bool], outputs=None, request_id: str = "") -> tuple[bytes, int | None]:
    tensors = []
    for name, array, binary in inputs:
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return Client.generate_request_body(tensors, outputs=outputs, request_id=request_id)


def json_body(header: dict, tail: bytes = b"") -> tuple[bytes, int | None]:
    raw = json.dumps(header).encode()
    return raw + tail, (len(raw) if tail else None)


def read_response(headers: dict[str, str], parts: list) -> triton.InferResult:
    body = b"".join(bytes(part) for part in parts)
    length = headers.get(HEADER_LENGTH)
    return Client.parse_response_body(body, header_length=int(length) if length is not None else None)


# -- datatypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_datatypes_agree_with_tritonclient(datatype):
    dtype = kserve_to_numpy(datatype)
    assert dtype == np.dtype(triton_to_np_dtype(datatype))
    assert numpy_to_kserve(dtype) == datatype
    assert np_to_triton_dtype(dtype) == datatype
    assert numpy_to_kserve(dtype.newbyteorder(">")) == datatype


@pytest.mark.parametrize(
    ("datatype", "words"), [("BYTES", "BYTES"), ("BF16", "BF16"), ("FLOAT32", "unknown datatype"), ("fp32", "unknown")]
)
def test_unsupported_datatypes_are_bad_requests(datatype, words):
    with pytest.raises(BadRequest) as caught:
        kserve_to_numpy(datatype)
    assert caught.value.status == 400
    assert words in caught.value.message


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype("U3"), np.object_, np.dtype("datetime64[s]")])
def test_numpy_dtypes_without_a_kserve_name_are_our_error(dtype):
    with pytest.raises(ValueError, match="no KServe datatype"):
        numpy_to_kserve(dtype)


# -- requests from tritonclient ------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_parse_one_input_of_each_datatype(datatype, binary):
    array = sample(datatype, (2, 3, 4))
    body, length = triton_body(("x", array, binary))
    assert (length is not None) == binary
    request = parse_infer_request(body, length)
    [tensor] = request.inputs
    assert tensor.name == "x"
    assert tensor.dtype == array.dtype
    assert tensor.shape == (2, 3, 4)
    got = tensor.as_numpy()
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert bytes(tensor.raw_bytes()) == array.astype(array.dtype.newbyteorder("<")).tobytes()
    assert tensor.nbytes == array.nbytes


def test_binary_inputs_are_views_of_the_body():
    a, b = sample("FP32", (1, 16)), sample("INT64", (1, 3), seed=1)
    body, length = triton_body(("a", a, True), ("b", b, True))
    view = memoryview(body)
    request = parse_infer_request(view, length)
    for tensor in request.inputs:
        assert isinstance(tensor.data, memoryview)
        assert tensor.data.obj is body
        assert tensor.raw_bytes().obj is body
        assert np.shares_memory(tensor.as_numpy(), np.frombuffer(body, np.uint8))
    assert length is not None
    assert bytes(request.inputs[0].data) == body[length : length + 64]
    assert bytes(request.inputs[1].data) == body[length + 64 :]


def test_mixed_inputs_outputs_and_id():
    x = sample("FP32", (1, 3, 2, 2))
    mask = sample("BOOL", (1, 4), seed=2)
    ids = sample("INT32", (1, 5), seed=3)
    outputs = [
        triton.InferRequestedOutput("logits", binary_data=True),
        triton.InferRequestedOutput("probs", binary_data=False, class_count=3),
    ]
    body, length = triton_body(
        ("x", x, True), ("mask", mask, False), ("ids", ids, True), outputs=outputs, request_id="r-7"
    )
    request = parse_infer_request(body, length)
    assert request.id == "r-7"
    assert [t.name for t in request.inputs] == ["x", "mask", "ids"]
    for tensor, array in zip(request.inputs, (x, mask, ids), strict=True):
        np.testing.assert_array_equal(tensor.as_numpy(), array)
    assert isinstance(request.inputs[0].data, memoryview)
    assert isinstance(request.inputs[1].data, np.ndarray)
    assert isinstance(request.inputs[2].data, memoryview)
    assert request.outputs == [RequestedOutput("logits", True), RequestedOutput("probs", False, 3)]
    assert request.binary_data_output is False


def test_without_outputs_tritonclient_asks_for_all_in_binary():
    body, length = triton_body(("x", sample("FP16", (4,)), False))
    request = parse_infer_request(body, length)
    assert request.outputs is None
    assert request.binary_data_output is True
    assert request.id is None
    assert request.parameters == {"binary_data_output": True}


def test_request_default_binary_applies_to_outputs_without_a_flag():
    header = {
        "inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}],
        "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True},
    }
    request = parse_infer_request(*json_body(header))
    assert request.outputs == [RequestedOutput("a", True), RequestedOutput("b", False)]
    header["parameters"] = {}
    request = parse_infer_request(*json_body(header))
    assert request.outputs == [RequestedOutput("a", False), RequestedOutput("b", False)]


def test_empty_outputs_list_asks_for_all():
    header = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}], "outputs": []}
    assert parse_infer_request(*json_body(header)).outputs is None


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([2, 3], [[1, 2, 3], [4, 5, 6]]),
        ([2, 3], [1, 2, 3, 4, 5, 6]),
        ([1, 2, 3], [[1, 2, 3, 4, 5, 6]]),
        ([1, 2, 3], [[[1, 2, 3], [4, 5, 6]]]),
        ([6], [1, 2, 3, 4, 5, 6]),
    ],
)
def test_json_data_flat_or_nested_is_row_major(shape, data):
    header = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP64", "data": data}]}
    [tensor] = parse_infer_request(*json_body(header)).inputs
    np.testing.assert_array_equal(tensor.as_numpy(), np.arange(1, 7, dtype=np.float64).reshape(shape))


def test_json_empty_tensor_and_scalar():
    header = {
        "inputs": [
            {"name": "empty", "shape": [2, 0], "datatype": "INT32", "data": [[], []]},
            {"name": "scalar", "shape": [], "datatype": "FP32", "data": [2.5]},
        ]
    }
    empty, scalar = parse_infer_request(*json_body(header)).inputs
    assert empty.as_numpy().shape == (2, 0)
    assert scalar.as_numpy().shape == () and scalar.as_numpy() == np.float32(2.5)


def test_json_floats_accept_ints_and_non_finite():
    header = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP16", "data": [1, 0.5, float("inf")]}]}
    [tensor] = parse_infer_request(*json_body(header)).inputs
    np.testing.assert_array_equal(tensor.as_numpy(), np.array([1, 0.5, np.inf], np.float16))


def test_parse_header_length():
    assert parse_header_length(None) is None
    assert parse_header_length("42") == 42
    with pytest.raises(BadRequest, match=HEADER_LENGTH):
        parse_header_length("4x2")


# -- bad requests --------------------------------------------------------------------------------


def _bad(header: dict | str, tail: bytes = b"", header_length: int | str | None = "auto"):
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    if header_length == "auto":
        header_length = len(raw) if tail else None
    return raw + tail, header_length


def _x(**fields):
    return {"name": "x", "shape": [1, 16], "datatype": "FP32", **fields}


ZEROS_64B = np.zeros(16, np.float32).tobytes()
BAD_REQUESTS = {
    "not json": (_bad("{inputs: ]"), ["not valid JSON"]),
    "header not an object": (_bad("[1, 2]"), ["JSON object"]),
    "header length past body": ((b'{"inputs": []}', 99), [HEADER_LENGTH, "99"]),
    "header length negative": ((b'{"inputs": []}', -1), [HEADER_LENGTH, "-1"]),
    "header length cuts json": ((b'{"inputs": []}', 5), ["not valid JSON"]),
    "no inputs": (_bad({"id": "a"}), ['"inputs"']),
    "inputs not a list": (_bad({"inputs": {"name": "x"}}), ['"inputs"', "list"]),
    "input not an object": (_bad({"inputs": [3]}), ["inputs[0]"]),
    "input without name": (_bad({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}), ["inputs[0]", "name"]),
    "input without shape": (_bad({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}), ['"x"', "shape"]),
    "input without datatype": (_bad({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}), ['"x"', "datatype"]),
    "unknown datatype": (_bad({"inputs": [_x(datatype="FLOAT", data=[0] * 16)]}), ['"x"', "FLOAT"]),
    "bytes datatype": (_bad({"inputs": [_x(datatype="BYTES", data=["a"] * 16)]}), ['"x"', "BYTES"]),
    "bf16 datatype": (
        _bad({"inputs": [_x(datatype="BF16", parameters={"binary_data_size": 32})]}, ZEROS_64B[:32]),
        ["BF16"],
    ),
    "shape negative": (_bad({"inputs": [_x(shape=[1, -16], data=[0] * 16)]}), ['"x"', "shape", "-16"]),
    "shape of floats": (_bad({"inputs": [_x(shape=[1, 16.0], data=[0] * 16)]}), ['"x"', "shape"]),
    "shape of bools": (_bad({"inputs": [_x(shape=[True, 16], data=[0] * 16)]}), ['"x"', "shape"]),
    "shape not a list": (_bad({"inputs": [_x(shape="1,16", data=[0] * 16)]}), ['"x"', "shape"]),
    "data count": (_bad({"inputs": [_x(data=[0] * 15)]}), ['input "x"', "[1,16]", "16 FP32", "15"]),
    "data not a list": (_bad({"inputs": [_x(data=0)]}), ['"x"', '"data"']),
    "data ragged": (_bad({"inputs": [_x(shape=[2, 2], data=[[1, 2, 3], [4]])]}), ['"x"', "nesting", "[2,2]"]),
    "data too deep": (_bad({"inputs": [_x(shape=[2], data=[[1], [2]])]}), ['"x"', "nesting"]),
    "data mixed depth": (_bad({"inputs": [_x(shape=[2, 2], data=[[1, 2], 3, 4])]}), ['"x"', "mixes"]),
    "data strings": (_bad({"inputs": [_x(shape=[2], data=["1.5", 2])]}), ['"x"', '"1.5"', "FP32"]),
    "data bools for ints": (_bad({"inputs": [_x(shape=[2], datatype="INT8", data=[True, 2])]}), ['"x"', "INT8"]),
    "data floats for ints": (_bad({"inputs": [_x(shape=[2], datatype="INT32", data=[1.5, 2])]}), ['"x"', "1.5"]),
    "data ints for bools": (_bad({"inputs": [_x(shape=[2], datatype="BOOL", data=[1, 0])]}), ['"x"', "BOOL"]),
    "data null": (_bad({"inputs": [_x(shape=[2], data=[None, 1])]}), ['"x"', "null"]),
    "int out of range": (_bad({"inputs": [_x(shape=[2], datatype="UINT8", data=[1, 256])]}), ['"x"', "UINT8", "range"]),
    "negative unsigned": (_bad({"inputs": [_x(shape=[1], datatype="UINT64", data=[-1])]}), ['"x"', "UINT64"]),
    "float out of range": (_bad({"inputs": [_x(shape=[1], datatype="FP16", data=[1e6])]}), ['"x"', "FP16", "range"]),
    "binary size disagrees": (
        _bad({"inputs": [_x(parameters={"binary_data_size": 60})]}, ZEROS_64B[:60]),
        ['input "x": shape [1,16] holds 16 FP32 elements (64 bytes) but binary_data_size is 60'],
    ),
    "binary size past body": (
        _bad({"inputs": [_x(parameters={"binary_data_size": 64})]}, ZEROS_64B[:32]),
        ['"x"', "past"],
    ),
    "binary bytes left over": (
        _bad({"inputs": [_x(parameters={"binary_data_size": 64})]}, ZEROS_64B + b"\0"),
        ["1 bytes after", "binary_data_size"],
    ),
    "bytes after json header": (_bad({"inputs": [_x(data=[0] * 16)]}, b"\0\0"), ["2 bytes after"]),
    "binary without header length": (
        (json.dumps({"inputs": [_x(parameters={"binary_data_size": 64})]}).encode(), None),
        ['"x"', HEADER_LENGTH],
    ),
    "binary after json without header length": (
        _bad({"inputs": [_x(parameters={"binary_data_size": 64})]}, ZEROS_64B, None),
        ["not valid JSON", HEADER_LENGTH],
    ),
    "binary size not an int": (
        _bad({"inputs": [_x(parameters={"binary_data_size": "64"})]}, ZEROS_64B),
        ['"x"', "binary_data_size"],
    ),
    "data and binary": (
        _bad({"inputs": [_x(data=[0] * 16, parameters={"binary_data_size": 64})]}, ZEROS_64B),
        ['"x"', '"data"', "binary_data_size", "both"],
    ),
    "neither data nor binary": (_bad({"inputs": [_x()]}), ['"x"', "neither", '"data"', "binary_data_size"]),
    "shared memory": (_bad({"inputs": [_x(parameters={"shared_memory_region": "r"})]}), ['"x"', "shared-memory"]),
    "input twice": (_bad({"inputs": [_x(data=[0] * 16), _x(data=[0] * 16)]}), ['"x"', "twice"]),
    "id not a string": (_bad({"id": 3, "inputs": [_x(data=[0] * 16)]}), ['"id"']),
    "parameters not an object": (_bad({"parameters": [], "inputs": [_x(data=[0] * 16)]}), ['"parameters"']),
    "binary_data_output not bool": (
        _bad({"parameters": {"binary_data_output": "yes"}, "inputs": [_x(data=[0] * 16)]}),
        ["binary_data_output"],
    ),
    "outputs not a list": (_bad({"inputs": [_x(data=[0] * 16)], "outputs": "y"}), ['"outputs"']),
    "output without name": (_bad({"inputs": [_x(data=[0] * 16)], "outputs": [{}]}), ["outputs[0]", "name"]),
    "output twice": (
        _bad({"inputs": [_x(data=[0] * 16)], "outputs": [{"name": "y"}, {"name": "y"}]}),
        ['"y"', "twice"],
    ),
    "output binary not bool": (
        _bad({"inputs": [_x(data=[0] * 16)], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}),
        ['"y"', "binary_data"],
    ),
    "classification negative": (
        _bad({"inputs": [_x(data=[0] * 16)], "outputs": [{"name": "y", "parameters": {"classification": -1}}]}),
        ['"y"', "classification"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_name_the_field(case):
    (body, header_length), words = BAD_REQUESTS[case]
    with pytest.raises(BadRequest) as caught:
        parse_infer_request(body, header_length)
    assert caught.value.status == 400
    for word in words:
        assert word in caught.value.message


def test_invalid_utf8_header_is_a_bad_request():
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_infer_request(b'{"inputs": "\xff\xfe"}', None)


def test_deeply_nested_json_is_a_bad_request():
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_infer_request(b"[" * 100_000 + b"]" * 100_000, None)


# -- checking against the model ------------------------------------------------------------------

SPECS = (TensorSpec("image", "float32", (3, 8, 8)), TensorSpec("scale", "int64", (1,)))  # per sample


def given(**shapes_and_dtypes: tuple[tuple[int, ...], str]) -> list:
    return [(name, np.dtype(dtype), shape) for name, (shape, dtype) in shapes_and_dtypes.items()]


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_samples_up_to_the_bound(batch):
    assert samples_of(SPECS, given(image=((batch, 3, 8, 8), "float32"), scale=((batch, 1), "int64")), 4) == batch


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ({"image": ((1, 3, 8, 8), "float32")}, ['missing input "scale"']),
        (
            {"image": ((1, 3, 8, 8), "float32"), "scale": ((1, 1), "int64"), "extra": ((1,), "int8")},
            ['unexpected input "extra"', '"image", "scale"'],
        ),
        (
            {"image": ((1, 3, 8, 8), "float64"), "scale": ((1, 1), "int64")},
            ['input "image" is float64', "takes float32"],
        ),
        ({"image": ((1, 3, 8, 8), "float32"), "scale": ((1, 1), "int32")}, ['input "scale" is int32', "int64"]),
        ({"image": ((5, 3, 8, 8), "float32"), "scale": ((5, 1), "int64")}, ['"image"', "[5,3,8,8]", "[1..4,3,8,8]"]),
        ({"image": ((0, 3, 8, 8), "float32"), "scale": ((0, 1), "int64")}, ['"image"', "[0,3,8,8]"]),
        ({"image": ((1, 3, 8, 7), "float32"), "scale": ((1, 1), "int64")}, ['"image"', "[1,3,8,7]"]),
        ({"image": ((1, 3, 64), "float32"), "scale": ((1, 1), "int64")}, ['"image"', "[1,3,64]"]),
        ({"image": ((2, 3, 8, 8), "float32"), "scale": ((3, 1), "int64")}, ['"scale"', "batch size 3", "2"]),
    ],
)
def test_samples_of_rejects(inputs, words):
    with pytest.raises(BadRequest) as caught:
        samples_of(SPECS, given(**inputs), 4)
    assert caught.value.status == 400
    for word in words:
        assert word in caught.value.message


def test_a_dynamic_spec_dim_matches_any_size_and_no_bound_says_n():
    specs = (TensorSpec("tokens", "int32", (-1,)),)
    assert samples_of(specs, given(tokens=((2, 7), "int32"))) == 2
    with pytest.raises(BadRequest, match=r"takes \[N,-1\]"):
        samples_of(specs, given(tokens=((2, 7, 1), "int32")))


def test_validate_outputs():
    request = InferRequest(None, [], [RequestedOutput("logits", True), RequestedOutput("feat", False)])
    specs = (TensorSpec("logits", "float32", (1, 10)),)
    with pytest.raises(BadRequest, match='unknown output "feat"; the model gives "logits"'):
        validate_outputs(request, specs)
    validate_outputs(InferRequest(None, [], None), specs)
    validate_outputs(InferRequest(None, [], [RequestedOutput("logits", True)]), specs)


# -- responses read by tritonclient --------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_response_of_each_datatype(datatype, binary):
    array = sample(datatype, (2, 5), seed=4)
    headers, parts = build_infer_response("m", "1", "req-1", [("y", array)], None, binary_default=binary)
    result = read_response(headers, parts)
    got = result.as_numpy("y")
    assert got.dtype == array.dtype and got.shape == (2, 5)
    np.testing.assert_array_equal(got, array)
    document = result.get_response()
    assert (document["model_name"], document["model_version"], document["id"]) == ("m", "1", "req-1")
    assert document["outputs"][0]["datatype"] == datatype
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        assert int(headers[HEADER_LENGTH]) == len(parts[0])
        assert np.shares_memory(np.frombuffer(parts[1], np.uint8), array)
    else:
        assert headers == {"Content-Type": "application/json"}
        assert len(parts) == 1
        # the shortest text that reads back as the same value of the tensor's dtype
        data = document["outputs"][0]["data"]
        np.testing.assert_array_equal(np.array(data, dtype=array.dtype), array.reshape(-1))


def test_response_only_requested_outputs_with_their_flags():
    logits, feat, extra = sample("FP32", (1, 10)), sample("FP16", (1, 2, 2), seed=5), sample("INT8", (1, 3), seed=6)
    requested = [RequestedOutput("feat", False), RequestedOutput("logits", True)]
    headers, parts = build_infer_response(
        "m", None, None, [("logits", logits), ("feat", feat), ("extra", extra)], requested
    )
    result = read_response(headers, parts)
    document = result.get_response()
    assert [o["name"] for o in document["outputs"]] == ["feat", "logits"]
    assert "model_version" not in document and "id" not in document
    assert "data" in document["outputs"][0] and "parameters" not in document["outputs"][0]
    assert document["outputs"][1]["parameters"] == {"binary_data_size": logits.nbytes}
    assert result.as_numpy("extra") is None
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_array_equal(result.as_numpy("feat"), feat)
    assert len(parts) == 2


def test_response_of_strided_and_big_endian_arrays():
    base = sample("FP32", (4, 6), seed=7)
    strided = base[:, ::2]
    big = sample("INT32", (3,), seed=8).astype(">i4")
    headers, parts = build_infer_response("m", "1", None, [("s", strided), ("b", big)], binary_default=True)
    result = read_response(headers, parts)
    np.testing.assert_array_equal(result.as_numpy("s"), strided)
    np.testing.assert_array_equal(result.as_numpy("b"), big)


def test_response_unknown_requested_output():
    with pytest.raises(BadRequest, match='unknown output "z"'):
        build_infer_response("m", "1", None, [("y", np.zeros(2))], [RequestedOutput("z", True)])


def test_round_trip_request_to_response():
    """What the routes will do: parse, run (here: echo), answer as asked; tritonclient reads it back."""
    x, y = sample("FP32", (2, 4)), sample("UINT16", (2, 3), seed=9)
    outputs = [triton.InferRequestedOutput("x", binary_data=False), triton.InferRequestedOutput("y")]
    body, length = triton_body(("x", x, True), ("y", y, False), outputs=outputs, request_id="abc")
    request = parse_infer_request(body, length)
    echoed = [(t.name, t.as_numpy()) for t in request.inputs]
    headers, parts = build_infer_response("echo", "1", request.id, echoed, request.outputs, request.binary_data_output)
    result = read_response(headers, parts)
    assert result.get_response()["id"] == "abc"
    np.testing.assert_array_equal(result.as_numpy("x"), x)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    assert "data" in result.get_output("x") and "parameters" in result.get_output("y")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification(binary):
    scores = np.array([[0.1, 0.7, 0.2, 0.7], [0.9, 0.0, 0.05, 0.05]], np.float32)
    requested = [RequestedOutput("probs", binary, class_count=2)]
    labels = ["cat", "dog", "fish"]
    headers, parts = build_infer_response("m", "1", None, [("probs", scores)], requested, labels=labels)
    got = read_response(headers, parts).as_numpy("probs")
    assert got.shape == (2, 2)
    assert [[s.decode() if isinstance(s, bytes) else s for s in row] for row in got.tolist()] == [
        ["0.700000:1:dog", "0.700000:3"],
        ["0.900000:0:cat", "0.050000:2:fish"],
    ]


# -- documents -----------------------------------------------------------------------------------


def test_server_metadata():
    assert server_metadata("0.3.0") == {
        "name": "fastinfer",
        "version": "0.3.0",
        "extensions": ["binary_tensor_data", "classification"],
    }
    assert server_metadata("1", ["binary_tensor_data"])["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize(("max_batch", "batch_dim"), [(8, -1), (None, 1)])
def test_model_metadata(max_batch, batch_dim):
    inputs = (TensorSpec("image", "float32", (1, 3, 224, 224)),)
    outputs = (TensorSpec("logits", "float16", (1, 1000)), TensorSpec("top", "int64", (1, -1)))
    document = model_metadata("effnet", ["1"], "tvm_relax", inputs, outputs, max_batch=max_batch)
    assert document == {
        "name": "effnet",
        "versions": ["1"],
        "platform": "tvm_relax",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [batch_dim, 3, 224, 224]}],
        "outputs": [
            {"name": "logits", "datatype": "FP16", "shape": [batch_dim, 1000]},
            {"name": "top", "datatype": "INT64", "shape": [batch_dim, -1]},
        ],
    }


class _ErrorResponse:
    """What tritonclient's error check reads of an HTTP response."""

    def __init__(self, status: int, body: bytes):
        self.status_code = status
        self.body = body

    def read(self) -> bytes:
        return self.body


@pytest.mark.parametrize(
    ("error", "message"),
    [(BadRequest('input "x": bad'), 'input "x": bad'), (ModelNotFound("no model m"), "no model m"), ("plain", "plain")],
)
def test_error_body_is_what_tritonclient_raises(error, message):
    assert error_body(error) == {"error": message}
    raised = _get_error(_ErrorResponse(400, json.dumps(error_body(error)).encode()))
    assert raised.message() == message
    assert raised.status() == "400"
