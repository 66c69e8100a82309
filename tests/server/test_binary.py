"""The binary protocol against a live server: real sockets, worker processes, shared memory."""

import asyncio
import socket
import struct

import numpy as np
import pytest
from conftest import running_server

from fastinfer.client import AsyncClient, Client, InferenceServerError
from fastinfer.protocol import HEADER, MAGIC, FrameDecoder, FrameType, encode_frame


@pytest.fixture
async def server(tmp_path):
    async with running_server(
        tmp_path,
        models=("echo=echo:float32:16", "pair=echo:int64:2", "slow=echo:float32:4:0.5"),
        binary_socket=str(tmp_path / "binary.sock"),
        shm_slot_bytes=1 << 20,
        shm_slots_per_worker=16,
        max_body_bytes=1 << 20,
    ) as server:
        yield server


def address(server):
    return f"tcp://127.0.0.1:{server.binary.port}"


async def test_async_client_round_trip_and_pipelining(server):
    async with AsyncClient(address(server)) as client:
        results = await asyncio.gather(
            *(client.infer("echo", {"input": np.full((1, 16), i, np.float32)}) for i in range(64))
        )
        for i, outputs in enumerate(results):
            np.testing.assert_array_equal(outputs["output"], np.full((1, 16), i, np.float32))
        assert await client.ping() > 0


async def test_blocking_client_over_tcp_and_unix_socket(server):
    def use(where):
        with Client(where) as client:
            data = np.arange(2, dtype=np.int64).reshape(1, 2)
            np.testing.assert_array_equal(client.infer("pair", {"input": data})["output"], data)

    for where in (address(server), f"unix://{server.config.binary_socket}"):
        await asyncio.to_thread(use, where)


async def test_several_samples_in_one_request(server):
    async with AsyncClient(address(server)) as client:
        batch = np.arange(5 * 16, dtype=np.float32).reshape(5, 16)
        outputs = await client.infer("echo", {"input": batch})
        np.testing.assert_array_equal(outputs["output"], batch)


@pytest.mark.parametrize(
    "model, inputs, code",
    [
        ("nope", {"input": np.zeros((1, 16), np.float32)}, "model_not_found"),
        ("echo", {"input": np.zeros((1, 15), np.float32)}, "bad_request"),
        ("echo", {"input": np.zeros((1, 16), np.float64)}, "bad_request"),
        ("echo", {"other": np.zeros((1, 16), np.float32)}, "bad_request"),
    ],
    ids=["unknown-model", "wrong-shape", "wrong-dtype", "wrong-name"],
)
async def test_bad_requests_get_error_frames_and_the_connection_goes_on(server, model, inputs, code):
    async with AsyncClient(address(server)) as client:
        with pytest.raises(InferenceServerError) as caught:
            await client.infer(model, inputs)
        assert caught.value.code == code
        outputs = await client.infer("echo", {"input": np.ones((1, 16), np.float32)})
        np.testing.assert_array_equal(outputs["output"], np.ones((1, 16)))
    assert server.supervisor.pool.free_count == server.supervisor.pool.slot_count


async def test_deadline_in_the_frame(server):
    await asyncio.to_thread(deadline_in_the_frame, server)


def deadline_in_the_frame(server):
    envelope = {
        "model": "slow",
        "timeout_ms": 100,
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 4], "offset": 0, "nbytes": 16}],
    }
    with raw_connection(server) as sock:
        sock.sendall(b"".join(bytes(part) for part in encode_frame(FrameType.REQUEST, 3, envelope, [bytes(16)])))
        (frame,) = read_frames(sock, 1)
    assert frame.head.frame_type == FrameType.ERROR and frame.head.request_id == 3
    assert frame.head.envelope["code"] == "deadline_exceeded" and frame.head.envelope["status"] == 504


def raw_connection(server):
    sock = socket.create_connection(("127.0.0.1", server.binary.port), timeout=10)
    return sock


def read_frames(sock, count):
    decoder = FrameDecoder()
    events = []
    while len([e for e in events if type(e).__name__ == "PayloadComplete"]) < count:
        data = sock.recv(65536)
        if not data:
            break
        events += decoder.feed(data)
    return [e for e in events if type(e).__name__ == "PayloadComplete"]


async def test_a_wrong_magic_gets_an_error_and_a_close(server):
    await asyncio.to_thread(wrong_magic, server)


def wrong_magic(server):
    with raw_connection(server) as sock:
        sock.sendall(b"NOPE" + bytes(HEADER.size - 4))
        (frame,) = read_frames(sock, 1)
        assert frame.head.frame_type == FrameType.ERROR and frame.head.request_id == 0
        assert frame.head.envelope["code"] == "protocol_error"
        assert sock.recv(1) == b"", "the server closed the connection"


async def test_an_absurd_length_is_refused_before_allocating(server):
    await asyncio.to_thread(absurd_length, server)


def absurd_length(server):
    with raw_connection(server) as sock:
        header = HEADER.pack(MAGIC, 1, FrameType.REQUEST, 0, 1, 10, 1 << 60)
        sock.sendall(header)
        (frame,) = read_frames(sock, 1)
        assert frame.head.envelope["code"] == "payload_too_large"


async def test_a_client_gone_mid_payload_leaks_nothing(server):
    await asyncio.to_thread(gone_mid_payload, server)
    pool = server.supervisor.pool
    async with asyncio.timeout(5):
        while pool.free_count != pool.slot_count:
            await asyncio.sleep(0.01)


def gone_mid_payload(server):
    with raw_connection(server) as sock:
        envelope = {
            "model": "echo",
            "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 16], "offset": 0, "nbytes": 64}],
        }
        frame = b"".join(bytes(part) for part in encode_frame(FrameType.REQUEST, 1, envelope, [bytes(64)]))
        sock.sendall(frame[:-10])  # the payload's last bytes never come
    with Client(address(server)) as client:
        client.ping()
        np.testing.assert_array_equal(client.infer("echo", {"input": np.ones((1, 16), np.float32)})["output"], 1)


async def test_ping_and_hello(server):
    await asyncio.to_thread(ping_and_hello, server)


def ping_and_hello(server):
    with raw_connection(server) as sock:
        sock.sendall(b"".join(bytes(p) for p in encode_frame(FrameType.HELLO, 7, {"versions": [1]})))
        sock.sendall(b"".join(bytes(p) for p in encode_frame(FrameType.PING, 8, {})))
        frames = read_frames(sock, 2)
        assert {f.head.frame_type for f in frames} == {FrameType.HELLO, FrameType.PONG}
        hello = next(f for f in frames if f.head.frame_type == FrameType.HELLO)
        assert hello.head.request_id == 7 and hello.head.envelope["versions"] == [1]


def test_header_layout_is_as_documented():
    assert HEADER.size == 24 and struct.calcsize("<4sBBHIIQ") == 24
