"""The codec without sockets: round trips, every split of a stream, each bad input, and fuzzing."""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections import deque

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastinfer.protocol import (
    ALIGNMENT,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    FrameDecoder,
    FrameError,
    FrameHead,
    FrameRejected,
    FrameType,
    Hello,
    PayloadComplete,
    ProtocolError,
    ProtocolUsageError,
    Request,
    Response,
    StreamError,
    encode_frame,
    error_envelope,
    pack_tensors,
    unpack_tensors,
)
from fastinfer.protocol.codec import DIRECT_READ_MIN_BYTES

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def joined(*frames: list) -> bytes:
    return b"".join(bytes(part) for frame in frames for part in frame)


def raw_frame(
    frame_type: int = FrameType.PING,
    request_id: int = 1,
    envelope: bytes = b"\x80",
    payload: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = 1,
    flags: int = 0,
    envelope_length: int | None = None,
    payload_length: int | None = None,
) -> bytes:
    """A frame built by hand, so that any field can be wrong."""
    envelope_length = len(envelope) if envelope_length is None else envelope_length
    payload_length = len(payload) if payload_length is None else payload_length
    header = HEADER.pack(magic, version, frame_type, flags, request_id, envelope_length, payload_length)
    return header + envelope + payload


def request(request_id: int, inputs: dict[str, np.ndarray], model: str = "m") -> list:
    descriptors, parts = pack_tensors(inputs)
    return encode_frame(FrameType.REQUEST, request_id, {"model": model, "inputs": descriptors}, parts)


def summary(events: list) -> list[tuple]:
    """Events as plain values, so that two decodings can be compared."""
    out = []
    for event in events:
        if isinstance(event, FrameHead):
            out.append(("head", event.frame_type, event.request_id, event.envelope, event.payload_length))
        elif isinstance(event, PayloadComplete):
            out.append(("done", event.request_id, None if event.payload is None else bytes(event.payload)))
        else:
            out.append(("rejected", event.frame_type, event.request_id, event.error.code))
    return out


def drive(decoder: FrameDecoder, data: bytes, chunk_sizes, decide) -> list:
    """Receive ``data`` the way asyncio.BufferedProtocol does, deciding on payloads with ``decide``."""
    events: list = []
    position = 0
    sizes = iter(chunk_sizes)
    while position < len(data):
        buffer = decoder.get_buffer(-1)
        assert buffer.nbytes > 0
        count = min(buffer.nbytes, len(data) - position, next(sizes))
        buffer[:count] = data[position : position + count]
        position += count
        queue = deque(decoder.buffer_updated(count))
        while queue:
            event = queue.popleft()
            events.append(event)
            if event is decoder.undecided:
                queue.extend(decide(decoder, event))
    return events


SAMPLE_INPUTS = {
    "image": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
    "mask": np.array([True, False, True]),
    "ids": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
    "half": np.array([0.5, -1.25], dtype=np.float16),
    "scalar": np.float64(3.5),
    "empty": np.zeros((0, 5), dtype=np.uint16),
}


def sample_stream() -> bytes:
    """Several frames of every kind, one of them rejected, with payloads between."""
    bad_dtype = msgpack.packb(
        {"model": "m", "inputs": [{"name": "x", "dtype": "complex64", "shape": [1], "offset": 0, "nbytes": 8}]}
    )
    return joined(
        encode_frame(FrameType.HELLO, 1, {"versions": [1], "agent": "test"}),
        request(2, SAMPLE_INPUTS),
        [raw_frame(FrameType.REQUEST, 3, bad_dtype, b"\x01" * 8)],
        encode_frame(FrameType.PING, 4),
        encode_frame(FrameType.ERROR, 5, error_envelope("model_not_found", "no model 'x'")),
        encode_frame(
            FrameType.RESPONSE,
            6,
            {"model": "m", "outputs": [], "classes": [{"index": 281, "class": "tabby", "probability": 0.9}]},
        ),
        request(7, {"x": np.ones(3, dtype=np.uint8)}),
    )


def test_header_layout_is_the_documented_one():
    frame = encode_frame(FrameType.REQUEST, 0x01020304, {"model": "m", "inputs": []}, [b"abc"])
    header = bytes(frame[0][:HEADER_SIZE])
    assert HEADER_SIZE == 24
    assert header[:4] == b"FINF" and header[4] == 1 and header[5] == FrameType.REQUEST
    assert struct.unpack_from("<HIIQ", header, 6) == (0, 0x01020304, len(frame[0]) - HEADER_SIZE, 3)
    assert msgpack.unpackb(frame[0][HEADER_SIZE:]) == {"model": "m", "inputs": []}


def test_tensors_round_trip_aligned_and_uncopied():
    descriptors, parts = pack_tensors(SAMPLE_INPUTS)
    assert all(d["offset"] % ALIGNMENT == 0 for d in descriptors)
    image_part = next(p for p in parts if p.nbytes == SAMPLE_INPUTS["image"].nbytes)
    assert np.shares_memory(np.frombuffer(image_part, np.uint8), SAMPLE_INPUTS["image"])
    frame = encode_frame(FrameType.REQUEST, 9, {"model": "m", "inputs": descriptors}, parts)
    assert frame[1:] == parts  # the encoder hands the parts on as they are
    head, done = FrameDecoder().feed(joined(frame))
    assert isinstance(head.message, Request) and head.message.model == "m"
    arrays = unpack_tensors(head.message.inputs, done.payload)
    assert arrays.keys() == SAMPLE_INPUTS.keys()
    for name, array in arrays.items():
        assert array.dtype == np.asarray(SAMPLE_INPUTS[name]).dtype
        np.testing.assert_array_equal(array, SAMPLE_INPUTS[name])
    assert np.shares_memory(arrays["image"], np.frombuffer(done.payload, np.uint8))
    assert all(array.ctypes.data % ALIGNMENT == 0 for array in arrays.values() if array.size)


def test_big_endian_and_strided_arrays_travel_as_little_endian_copies():
    array = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    head, done = FrameDecoder().feed(joined(request(1, {"a": array})))
    assert head.envelope["inputs"][0]["dtype"] == "int32"
    np.testing.assert_array_equal(unpack_tensors(head.message.inputs, done.payload)["a"], array)


def test_unsupported_arrays_and_ids_are_usage_errors():
    with pytest.raises(ProtocolUsageError):
        pack_tensors({"z": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(ProtocolUsageError):
        encode_frame(FrameType.PING, 2**32)
    with pytest.raises(ProtocolUsageError):
        encode_frame(FrameType.PING, 1, {"blob": "x" * 70_000})


def test_every_split_gives_the_same_events():
    data = sample_stream()
    expected = summary(FrameDecoder().feed(data))
    assert [e[0] for e in expected].count("rejected") == 1
    assert len(expected) == 13
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        assert summary(decoder.feed(data[:cut]) + decoder.feed(data[cut:])) == expected, cut
        assert decoder.at_frame_boundary
    decoder = FrameDecoder()
    assert summary([event for byte in data for event in decoder.feed(bytes([byte]))]) == expected


@pytest.mark.parametrize("policy", ["own buffer", "discard", "undecided"])
def test_buffered_protocol_reads_with_random_chunks(policy):
    big = np.arange(3 * DIRECT_READ_MIN_BYTES, dtype=np.int32)  # large enough to be read in place
    data = sample_stream() + joined(request(8, {"big": big}), encode_frame(FrameType.PONG, 9))
    expected = summary(FrameDecoder().feed(data))
    buffers = {}

    def decide(decoder, head):
        if policy == "own buffer":
            buffers[head.request_id] = bytearray(head.payload_length + 100)
            return decoder.set_payload_buffer(buffers[head.request_id])
        if policy == "discard":
            return decoder.discard_payload()
        return []  # the decoder allocates at its next get_buffer()

    rng = random.Random(7)
    for _ in range(20):
        events = drive(FrameDecoder(), data, iter(lambda: rng.choice([1, 7, 64, 1000, 70_000]), None), decide)
        got = summary(events)
        if policy == "discard":
            expected_here = [(e[0], e[1], None) if e[0] == "done" and e[2] else e for e in expected]
            assert got == expected_here
        else:
            assert got == expected
    if policy == "own buffer":
        done = next(e for e in events if isinstance(e, PayloadComplete) and e.request_id == 8)
        assert done.payload.obj is buffers[8]  # received where the caller said, not copied after
        np.testing.assert_array_equal(np.frombuffer(buffers[8], np.int32, count=big.size), big)


def test_large_payload_goes_straight_into_the_callers_buffer():
    big = np.arange(4 * DIRECT_READ_MIN_BYTES, dtype=np.uint8)
    data = joined(request(1, {"big": big}))
    decoder = FrameDecoder()
    buffer = decoder.get_buffer()
    buffer[:1000] = data[:1000]
    (head,) = decoder.buffer_updated(1000)
    target = bytearray(head.payload_length)
    assert decoder.set_payload_buffer(target) == []
    view = decoder.get_buffer()
    assert view.obj is target and view.nbytes == head.payload_length - (1000 - (len(data) - head.payload_length))


def test_events_before_a_fatal_error_are_kept():
    data = joined(encode_frame(FrameType.PING, 1)) + raw_frame(magic=b"HTTP")
    with pytest.raises(StreamError) as caught:
        FrameDecoder().feed(data)
    assert summary(caught.value.events) == [("head", FrameType.PING, 1, {}, 0), ("done", 1, b"")]


STREAM_ERRORS = {
    "bad magic": (raw_frame(magic=b"GET "), "protocol_error", 400),
    "bad version": (raw_frame(version=2), "unsupported_version", 505),
    "envelope over the limit": (raw_frame(envelope_length=64 * 1024 + 1), "payload_too_large", 413),
    "payload over the limit": (raw_frame(FrameType.REQUEST, payload_length=2**63), "payload_too_large", 413),
}


@pytest.mark.parametrize("case", STREAM_ERRORS)
def test_stream_errors_are_fatal(case):
    data, code, status = STREAM_ERRORS[case]
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(StreamError) as caught:
            decoder.feed(data + joined(encode_frame(FrameType.PING, 2)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the lengths were refused before anything was allocated
    assert (caught.value.code, caught.value.status, caught.value.recoverable) == (code, status, False)
    assert caught.value.request_id == 0
    with pytest.raises(StreamError):
        decoder.feed(joined(encode_frame(FrameType.PING, 3)))
    assert decoder.get_buffer().nbytes > 0  # a closing BufferedProtocol may still be asked


def test_limits_are_configurable():
    decoder = FrameDecoder(max_payload_bytes=100)
    decoder.feed(raw_frame(FrameType.REQUEST, payload_length=100, envelope_length=0))
    with pytest.raises(StreamError, match="limit is 100"):
        FrameDecoder(max_payload_bytes=100).feed(raw_frame(FrameType.REQUEST, payload_length=101))


def descriptor(**changes) -> dict:
    return {"name": "x", "dtype": "float32", "shape": [2, 2], "offset": 0, "nbytes": 16, **changes}


FRAME_ERRORS = {
    "envelope not msgpack": (FrameType.REQUEST, b"\xc1"),
    "envelope truncated msgpack": (FrameType.REQUEST, b"\x82\xa5model"),
    "envelope not a map": (FrameType.REQUEST, msgpack.packb([1, 2])),
    "no model": (FrameType.REQUEST, msgpack.packb({"inputs": [descriptor()]})),
    "unknown dtype": (FrameType.REQUEST, msgpack.packb({"model": "m", "inputs": [descriptor(dtype="float8")]})),
    "nbytes mismatch": (FrameType.REQUEST, msgpack.packb({"model": "m", "inputs": [descriptor(nbytes=12)]})),
    "negative dim": (FrameType.REQUEST, msgpack.packb({"model": "m", "inputs": [descriptor(shape=[-2, -2])]})),
    "misaligned offset": (FrameType.REQUEST, msgpack.packb({"model": "m", "inputs": [descriptor(offset=8)]})),
    "offset out of range": (FrameType.REQUEST, msgpack.packb({"model": "m", "inputs": [descriptor(offset=64)]})),
    "overlap": (FrameType.REQUEST, msgpack.packb({"model": "m", "inputs": [descriptor(), descriptor(name="y")]})),
    "duplicate name": (FrameType.RESPONSE, msgpack.packb({"model": "m", "outputs": [descriptor(), descriptor()]})),
    "inputs and image": (
        FrameType.REQUEST,
        msgpack.packb({"model": "m", "inputs": [], "image": {"offset": 0, "nbytes": 1}}),
    ),
    "image out of range": (FrameType.REQUEST, msgpack.packb({"model": "m", "image": {"offset": 0, "nbytes": 99}})),
    "error without status": (FrameType.ERROR, msgpack.packb({"code": "x", "message": "y"})),
    "unknown frame type": (77, b"\x80"),
    "payload on a ping": (FrameType.PING, b"\x80"),
}


@pytest.mark.parametrize("case", FRAME_ERRORS)
def test_frame_errors_skip_the_frame_and_go_on(case):
    frame_type, envelope = FRAME_ERRORS[case]
    data = raw_frame(frame_type, 41, envelope, b"\x07" * 32) + joined(encode_frame(FrameType.PING, 42))
    events = FrameDecoder().feed(data)
    rejected = events[0]
    assert isinstance(rejected, FrameRejected) and rejected.request_id == 41
    assert isinstance(rejected.error, FrameError) and rejected.error.recoverable
    assert (rejected.error.code, rejected.error.status, rejected.error.request_id) == ("protocol_error", 400, 41)
    assert summary(events[1:]) == [("head", FrameType.PING, 42, {}, 0), ("done", 42, b"")]


def test_nonzero_flags_are_refused():
    events = FrameDecoder().feed(raw_frame(flags=1, request_id=5))
    assert isinstance(events[0], FrameRejected) and "flags" in events[0].error.message


def test_truncated_stream_is_reported_at_eof():
    data = joined(request(1, {"x": np.ones(4, np.float32)}))
    for cut in (1, HEADER_SIZE, HEADER_SIZE + 3, len(data) - 1):
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        with pytest.raises(StreamError, match="ended inside a frame"):
            decoder.eof()
    decoder = FrameDecoder()
    decoder.feed(data)
    decoder.eof()  # at a frame boundary: a clean close


def test_typed_messages():
    events = FrameDecoder().feed(sample_stream())
    heads = {e.request_id: e for e in events if isinstance(e, FrameHead)}
    assert heads[1].message == Hello(versions=(1,), agent="test")
    assert heads[5].message.status == 404 and heads[5].message.code == "model_not_found"
    assert isinstance(heads[6].message, Response) and heads[6].message.classes[0]["class"] == "tabby"
    assert heads[4].message is None


def test_usage_errors():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolUsageError):
        decoder.discard_payload()
    decoder.get_buffer()
    data = joined(request(1, {"x": np.ones(4, np.float32)}))
    view = decoder.get_buffer()
    view[: len(data)] = data
    decoder.buffer_updated(len(data))
    with pytest.raises(ProtocolUsageError):
        decoder.set_payload_buffer(bytearray(3))
    with pytest.raises(ProtocolUsageError):
        decoder.set_payload_buffer(b"read-only bytes")


# Fuzzing: the decoder meets hostile bytes; it may only ever raise its own ProtocolError.

SMALL_LIMITS = {"max_envelope_bytes": 512, "max_payload_bytes": 4096}

wire_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
wire_values = st.recursive(
    wire_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
spec_keys = st.sampled_from(
    [
        "model",
        "inputs",
        "outputs",
        "image",
        "name",
        "dtype",
        "shape",
        "offset",
        "nbytes",
        "code",
        "message",
        "status",
        "versions",
        "classes",
        "timeout_ms",
        "version",
    ]
)
near_valid_descriptors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=3) | wire_scalars,
        "dtype": st.sampled_from(["float32", "int8", "bool", "float128", ""]) | wire_scalars,
        "shape": st.lists(st.integers(-1, 5), max_size=3) | wire_values,
        "offset": st.sampled_from([0, 64, 63, 128, -64]) | wire_scalars,
        "nbytes": st.integers(-1, 200) | wire_scalars,
    },
)
envelopes = (
    st.dictionaries(
        spec_keys, wire_values | st.lists(near_valid_descriptors, max_size=3) | near_valid_descriptors, max_size=6
    )
    | wire_values
)


@st.composite
def likely_descriptors(draw) -> dict:
    """Descriptors that are often valid, and otherwise wrong in one field."""
    dtype = draw(st.sampled_from(["float32", "float16", "int64", "bool", "uint8", "float8"]))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    itemsize = {"float32": 4, "float16": 2, "int64": 8, "bool": 1, "uint8": 1}.get(dtype, 1)
    nbytes = int(np.prod(shape)) * itemsize + draw(st.sampled_from([0, 0, 0, 1, -1]))
    spec = {
        "name": draw(st.sampled_from("abc")),
        "dtype": dtype,
        "shape": shape,
        "offset": 64 * draw(st.integers(0, 4)),
        "nbytes": nbytes,
    }
    if draw(st.booleans()):
        spec[draw(st.sampled_from(list(spec)))] = draw(wire_scalars)
    return spec


likely_heads = st.one_of(
    st.tuples(
        st.just(FrameType.REQUEST),
        st.fixed_dictionaries(
            {"model": st.text(max_size=3), "inputs": st.lists(likely_descriptors(), max_size=3)},
            optional={"timeout_ms": st.integers(-1, 10), "outputs": wire_values, "version": wire_scalars},
        ),
    ),
    st.tuples(
        st.just(FrameType.REQUEST),
        st.fixed_dictionaries(
            {
                "model": st.text(max_size=3),
                "image": st.fixed_dictionaries({"offset": st.integers(-1, 300), "nbytes": st.integers(-1, 300)}),
            }
        ),
    ),
    st.tuples(
        st.just(FrameType.RESPONSE),
        st.fixed_dictionaries(
            {"model": st.text(max_size=3), "outputs": st.lists(likely_descriptors(), max_size=3)},
            optional={"classes": wire_values},
        ),
    ),
    st.tuples(
        st.just(FrameType.ERROR),
        st.fixed_dictionaries({"code": st.text(max_size=3), "message": st.text(max_size=3), "status": wire_scalars}),
    ),
    st.tuples(
        st.just(FrameType.HELLO),
        st.fixed_dictionaries(
            {"versions": wire_values}, optional={"agent": wire_scalars, "max_payload_bytes": wire_scalars}
        ),
    ),
    st.tuples(st.sampled_from(list(FrameType)) | st.integers(0, 255), envelopes),
)


def stream_of_frames():
    payloads = st.binary(max_size=300) | st.just(b"")
    frame = st.tuples(likely_heads, st.integers(0, 2**32 - 1), payloads)
    return st.lists(frame, min_size=1, max_size=4).map(
        lambda frames: b"".join(raw_frame(t, rid, msgpack.packb(env), payload) for (t, env), rid, payload in frames)
    )


def fuzz_decode(data: bytes, chunk_sizes: list[int]) -> None:
    decoder = FrameDecoder(**SMALL_LIMITS)
    sizes = iter(chunk_sizes * (len(data) + 1) if chunk_sizes else [len(data) or 1])
    position = 0
    try:
        while position < len(data):
            size = next(sizes)
            for event in decoder.feed(data[position : position + size]):
                if isinstance(event, PayloadComplete) and event.payload is not None:
                    assert event.payload.nbytes <= SMALL_LIMITS["max_payload_bytes"]
                if isinstance(event, FrameRejected):
                    assert isinstance(event.error, FrameError)
            position += size
        decoder.eof()
    except ProtocolError:
        pass


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, position, value in edits:
        if not buffer:
            break
        position %= len(buffer)
        if kind == 0:
            buffer[position] = value
        elif kind == 1:
            buffer.insert(position, value)
        elif kind == 2:
            del buffer[position]
        else:
            del buffer[position:]
    return bytes(buffer)


@FUZZ
@given(data=st.binary(max_size=400), chunks=st.lists(st.integers(1, 64), max_size=5))
def test_fuzz_random_bytes(data, chunks):
    fuzz_decode(data, chunks)
    fuzz_decode(MAGIC + b"\x01" + data, chunks)


@FUZZ
@given(data=stream_of_frames(), chunks=st.lists(st.integers(1, 64), max_size=5))
def test_fuzz_generated_envelopes(data, chunks):
    fuzz_decode(data, chunks)


@FUZZ
@given(
    frames=st.lists(st.sampled_from(range(7)), min_size=1, max_size=4),
    edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    chunks=st.lists(st.integers(1, 64), max_size=5),
)
def test_fuzz_mutated_valid_frames(frames, edits, chunks):
    valid = [
        joined(request(1, {"x": np.arange(6, dtype=np.float32), "m": np.array([True])})),
        joined(encode_frame(FrameType.PING, 2)),
        joined(encode_frame(FrameType.ERROR, 3, error_envelope("overloaded", "busy"))),
        joined(encode_frame(FrameType.HELLO, 4, {"versions": [1]})),
        joined(encode_frame(FrameType.RESPONSE, 5, {"model": "m", "outputs": [], "classes": [{"index": 1}]})),
        joined(
            encode_frame(FrameType.REQUEST, 6, {"model": "m", "image": {"offset": 0, "nbytes": 5}}, [b"\xff\xd8jpg"])
        ),
        raw_frame(FrameType.REQUEST, 7, envelope_length=2**31, payload_length=2**60),
    ]
    fuzz_decode(mutate(b"".join(valid[i] for i in frames), edits), chunks)


@settings(max_examples=60, deadline=None)
@given(
    data=stream_of_frames(),
    edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_fuzz_never_allocates_beyond_the_limits(data, edits):
    tracemalloc.start()
    try:
        fuzz_decode(mutate(data, edits), [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The read buffer (256 KiB) plus one payload (4 KiB) and envelopes, never a claimed length.
    assert peak < 2 << 20
