"""Clients that try to break the server: each test is a reproduction that once took it down, or
got an answer it should not have. Every one is small, bounded and on loopback."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import numpy as np
import pytest
from conftest import running_server

from fastinfer.client import AsyncClient, Client, InferenceServerError
from fastinfer.protocol import HEADER, MAGIC, FrameDecoder, FrameType, PayloadComplete, encode_frame, pack_tensors

TOKEN = "s3cret-token"
SAMPLE = np.arange(16, dtype=np.float32).reshape(1, 16)


@pytest.fixture
async def server(tmp_path):
    async with running_server(
        tmp_path,
        models=("echo=echo:float32:16",),
        shm_slot_bytes=1 << 16,
        shm_slots_per_worker=4,
        max_body_bytes=1 << 16,
        body_timeout_s=1.0,
        header_timeout_s=1.0,
        max_connections=4,
    ) as server:
        yield server


@pytest.fixture
async def guarded(tmp_path):
    async with running_server(tmp_path, models=("echo=echo:float32:16",), inference_token=TOKEN) as server:
        yield server


def binary_address(server) -> str:
    return f"tcp://127.0.0.1:{server.binary.port}"


async def serves_normally(server, **client_options) -> None:
    async with AsyncClient(binary_address(server), timeout_s=10, **client_options) as client:
        np.testing.assert_array_equal((await client.infer("echo", {"input": SAMPLE}))["output"], SAMPLE)


async def frames_until_closed(reader: asyncio.StreamReader, timeout_s: float = 10) -> list[PayloadComplete]:
    """Every frame the server sends before it closes the connection (TimeoutError if it never does)."""
    decoder, frames = FrameDecoder(), []
    async with asyncio.timeout(timeout_s):
        while data := await reader.read(1 << 16):
            frames += [event for event in decoder.feed(data) if isinstance(event, PayloadComplete)]
    return frames


def error_codes(frames: list[PayloadComplete]) -> list[tuple[int, str]]:
    return [(f.request_id, f.head.message.code) for f in frames if f.head.frame_type is FrameType.ERROR]


# HTTP


async def test_empty_bodies_are_refused_and_the_server_goes_on(server):
    """The second empty body once spun the event loop for ever: no port answered again."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}", timeout=timeout) as session:
        for _ in range(3):
            async with session.post("/predictions/echo", data=b"") as response:
                assert response.status == 400
                assert (await response.json())["code"] == "bad_request"
        async with session.post("/predictions/echo", data=SAMPLE.tobytes()) as response:
            assert response.status == 200
    await serves_normally(server)


async def test_multipart_without_a_boundary_is_a_json_400(server):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
        headers = {"Content-Type": "multipart/form-data"}
        async with session.post("/predictions/echo", data=b"--x\r\n\r\n", headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["code"] == "bad_request"


@pytest.mark.parametrize("deadline", ["nan", "inf", "-inf", "1e400", "0"])
async def test_a_deadline_must_be_a_finite_positive_number(server, deadline):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
        headers = {"X-Deadline-Ms": deadline}
        async with session.post("/predictions/echo", data=SAMPLE.tobytes(), headers=headers) as response:
            assert response.status == 400
            assert "X-Deadline-Ms" in (await response.json())["message"]


async def raw_http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /ping?key=SECRET-QUERY HTTP/1.1\x00\r\nHost: x\r\nAuthorization: Bearer SECRET-TOKEN\r\n\r\n",
        b"GET /ping HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer SECRET-TOKEN\x01\r\n\r\n",
        b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: SECRET-TOKEN\r\n\r\n",
        b"GET /" + b"SECRET-TOKEN" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["nul-in-request-line", "control-char-in-header", "bad-content-length", "huge-url"],
)
async def test_malformed_http_gets_json_and_one_log_line_without_secrets(server, caplog, request_bytes):
    caplog.set_level(logging.DEBUG)
    answer = await raw_http(server.http_port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", head
    assert b"application/json" in head
    assert b'"code": "bad_request"' in body or b'"code":"bad_request"' in body
    assert b"SECRET" not in answer
    for record in caplog.records:
        assert "SECRET" not in record.getMessage()
        assert record.exc_info is None or "SECRET" not in str(record.exc_info[1])
        assert not record.exc_text
    await serves_normally(server)


async def test_bearer_scheme_is_case_insensitive(guarded):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{guarded.http_port}") as session:
        for authorization, status in [
            (f"bearer {TOKEN}", 200),
            (f"BEARER {TOKEN}", 200),
            (f"Bearer  {TOKEN} ", 200),
            (f"Basic {TOKEN}", 401),
            (f"Bearer {TOKEN}x", 401),
            ("Bearer", 401),
        ]:
            headers = {"Authorization": authorization}
            async with session.post("/predictions/echo", data=SAMPLE.tobytes(), headers=headers) as response:
                assert response.status == status, authorization


# Binary: limits


def stalled_request(request_id: int = 1, samples: int = 16) -> bytes:
    """A REQUEST whose payload stops 10 bytes short of its length."""
    envelope = {"model": "echo", "inputs": pack_tensors({"input": np.zeros((samples, 16), np.float32)})[0]}
    header_and_envelope = encode_frame(FrameType.REQUEST, request_id, envelope, [bytes(samples * 64)])[0]
    return bytes(header_and_envelope) + bytes(samples * 64 - 10)


async def test_a_stalled_payload_times_out_and_gives_its_slots_back(server):
    """Two connections that stop 10 bytes short once held every slot until they closed."""
    pool = server.supervisor.pool
    connections = [await asyncio.open_connection("127.0.0.1", server.binary.port) for _ in range(2)]
    for _, writer in connections:
        writer.write(stalled_request())
    for reader, writer in connections:
        frames = await frames_until_closed(reader)
        assert error_codes(frames) == [(1, "request_timeout"), (0, "request_timeout")]
        writer.close()
    await serves_normally(server)
    assert pool.free_count == pool.slot_count


async def test_a_partial_header_times_out_too(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.binary.port)
    writer.write(stalled_request()[:10])
    assert error_codes(await frames_until_closed(reader)) == [(0, "request_timeout")]
    writer.close()


async def test_an_idle_connection_is_closed_and_the_clients_reconnect(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.binary.port)
    assert await frames_until_closed(reader) == []  # closed without a word, as HTTP's keep-alive end
    writer.close()

    async with AsyncClient(binary_address(server), timeout_s=10) as client:
        await client.infer("echo", {"input": SAMPLE})
        await asyncio.sleep(2.5)  # past header_timeout_s: the server closes the idle connection
        await client.infer("echo", {"input": SAMPLE})

    def blocking():
        with Client(binary_address(server), timeout_s=10) as client:
            client.infer("echo", {"input": SAMPLE})
            import time

            time.sleep(2.5)
            client.infer("echo", {"input": SAMPLE})

    await asyncio.to_thread(blocking)


async def test_a_slow_model_is_not_idle(tmp_path):
    """Waiting for a slow answer is not idling: the connection stays open for it (an answer three
    idle timeouts long; the timeout itself generous, as the client's request must come within it)."""
    settings = {"models": ("slow=echo:float32:4:3",), "header_timeout_s": 1.0}
    async with running_server(tmp_path, **settings) as server, AsyncClient(binary_address(server)) as client:
        await client.infer("slow", {"input": np.ones((1, 4), np.float32)})


async def test_connections_past_the_limit_are_refused_with_an_error_frame(server):
    held = [await asyncio.open_connection("127.0.0.1", server.binary.port) for _ in range(4)]
    for _, writer in held:
        writer.write(encode_frame(FrameType.PING, 1)[0])  # keep them busy-looking, not idle
    reader, writer = await asyncio.open_connection("127.0.0.1", server.binary.port)
    frames = await frames_until_closed(reader)
    assert error_codes(frames) == [(0, "too_many_connections")]
    assert frames[0].head.message.status == 503
    writer.close()
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    await serves_normally(server)


# Binary: zero-length payloads and request ids


@pytest.mark.parametrize(
    "envelope, reason",
    [
        ({"model": "echo", "inputs": []}, 'missing input "input"'),
        ({"model": "echo", "inputs": pack_tensors({"input": np.zeros((0, 16), np.float32)})[0]}, "shape [0,16]"),
        ({"model": "echo", "image": {"offset": 0, "nbytes": 0}}, "takes tensors"),
        ({"model": "nope", "inputs": []}, "no model named"),
    ],
    ids=["no-inputs", "zero-samples", "empty-image", "unknown-model"],
)
async def test_a_request_without_payload_bytes_is_answered(server, envelope, reason):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.binary.port)
    try:
        writer.write(encode_frame(FrameType.REQUEST, 7, envelope)[0])
        decoder = FrameDecoder()
        async with asyncio.timeout(10):
            while not (
                events := [e for e in decoder.feed(await reader.read(1 << 16)) if isinstance(e, PayloadComplete)]
            ):
                pass
        (reply,) = events
        assert reply.request_id == 7 and reply.head.frame_type is FrameType.ERROR
        assert reason in reply.head.message.message
    finally:
        writer.close()


@pytest.mark.parametrize("frame_type", [FrameType.REQUEST, FrameType.PING, FrameType.HELLO])
async def test_request_id_0_is_the_connections_own(server, frame_type):
    envelope = {"versions": [1]} if frame_type is FrameType.HELLO else {}
    if frame_type is FrameType.REQUEST:
        descriptors, parts = pack_tensors({"input": SAMPLE})
        envelope, payload = {"model": "echo", "inputs": descriptors}, parts
    else:
        payload = []
    reader, writer = await asyncio.open_connection("127.0.0.1", server.binary.port)
    writer.writelines(encode_frame(frame_type, 0, envelope, payload))
    frames = await frames_until_closed(reader)
    assert error_codes(frames) == [(0, "protocol_error")]
    assert "request id 0" in frames[0].head.message.message
    writer.close()


# Binary: the inference token


async def test_the_binary_port_requires_the_token(guarded):
    address = binary_address(guarded)
    with pytest.raises((InferenceServerError, ConnectionError)) as refused:
        await serves_normally(guarded)
    assert getattr(refused.value, "code", "unauthorized") == "unauthorized"
    with pytest.raises(InferenceServerError) as wrong:
        await serves_normally(guarded, token=TOKEN + "x")
    assert wrong.value.code == "unauthorized" and wrong.value.status == 401
    await serves_normally(guarded, token=TOKEN)

    def blocking(token):
        with Client(address, timeout_s=10, token=token) as client:
            return client.infer("echo", {"input": SAMPLE})["output"]

    np.testing.assert_array_equal(await asyncio.to_thread(blocking, TOKEN), SAMPLE)
    with pytest.raises(InferenceServerError):
        await asyncio.to_thread(blocking, "nope")


async def test_frames_before_the_token_close_the_connection_unanswered(guarded, caplog):
    caplog.set_level(logging.DEBUG)
    descriptors, parts = pack_tensors({"input": SAMPLE})
    for first in (
        encode_frame(FrameType.REQUEST, 1, {"model": "echo", "inputs": descriptors}, parts),
        encode_frame(FrameType.PING, 1),
        encode_frame(FrameType.HELLO, 1, {"versions": [1], "token": "guess"}),
        # a header that announces a large payload: nothing is allocated or read for it
        [HEADER.pack(MAGIC, 1, FrameType.REQUEST, 0, 1, 1, 8 << 20) + b"\x80"],
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.binary.port)
        writer.writelines(first)
        frames = await frames_until_closed(reader)
        assert [code for _, code in error_codes(frames)] == ["unauthorized"]
        assert not [f for f in frames if f.head.frame_type is FrameType.RESPONSE]
        writer.close()
    assert "guess" not in caplog.text and TOKEN not in caplog.text


def test_the_token_is_not_in_a_hello_repr():
    from fastinfer.protocol import Hello

    assert TOKEN not in repr(Hello(versions=(1,), token=TOKEN))


async def test_a_refused_connection_does_not_stall_the_listener(server):
    """Sockets that connect and send nothing, past the limit, are each told and closed."""
    sockets = []
    for _ in range(12):
        sock = socket.create_connection(("127.0.0.1", server.binary.port))
        sockets.append(sock)
    try:
        await asyncio.sleep(0.2)
        assert server.binary.refused >= 8
    finally:
        for sock in sockets:
            sock.close()
    await asyncio.sleep(1.5)  # the held ones idle out
    await serves_normally(server)


async def test_the_binary_port_checks_the_version_and_counts_refusals(server):
    metrics = server.supervisor.metrics
    async with AsyncClient(binary_address(server), timeout_s=10) as client:
        with pytest.raises(InferenceServerError) as wrong_version:
            await client.infer("echo", {"input": SAMPLE}, version="7")
        assert wrong_version.value.code == "model_not_found"
        np.testing.assert_array_equal((await client.infer("echo", {"input": SAMPLE}, version="1"))["output"], SAMPLE)
        with pytest.raises(InferenceServerError):
            await client.infer("echo", {"input": np.zeros((1, 15), np.float32)})
    assert metrics.requests[("echo", "binary", "model_not_found")] == 1
    assert metrics.requests[("echo", "binary", "bad_request")] == 1
    assert metrics.requests[("echo", "binary", "ok")] == 1
    assert metrics.in_flight["binary"] == 0


async def test_a_slow_upload_delays_no_other_request_of_its_model(tmp_path):
    """A request's row once waited in its batch for its body, and the batch for it: one client that
    sent 10 of 64 bytes held every other request of the model until the body timeout (30 s)."""
    async with running_server(tmp_path, models=("echo=echo:float32:16",), body_timeout_s=30) as server:
        slow_http = await asyncio.open_connection("127.0.0.1", server.http_port)
        slow_http[1].write(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n" + bytes(10))
        slow_binary = await asyncio.open_connection("127.0.0.1", server.binary.port)
        slow_binary[1].write(stalled_request(samples=1))
        await asyncio.sleep(0.2)
        timeout = aiohttp.ClientTimeout(total=10)  # far below the 30 s the slow ones may take
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}", timeout=timeout) as session:

            async def one() -> int:
                async with session.post("/predictions/echo", data=SAMPLE.tobytes()) as response:
                    return response.status

            assert await asyncio.gather(*(one() for _ in range(16))) == [200] * 16
        async with AsyncClient(binary_address(server), timeout_s=10) as client:
            await asyncio.gather(*(client.infer("echo", {"input": SAMPLE}) for _ in range(16)))
        for _, writer in (slow_http, slow_binary):
            writer.close()
