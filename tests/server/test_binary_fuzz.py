"""Random and mutated frames thrown at a live server: it answers or closes, and goes on serving."""

import asyncio
import socket

import numpy as np
import pytest
from conftest import running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastinfer.client import Client
from fastinfer.protocol import FrameType, encode_frame, pack_tensors


def valid_frame(request_id: int = 1) -> bytes:
    descriptors, parts = pack_tensors({"input": np.ones((1, 16), np.float32)})
    envelope = {"model": "echo", "inputs": descriptors}
    return b"".join(bytes(part) for part in encode_frame(FrameType.REQUEST, request_id, envelope, parts))


VALID = valid_frame()


@st.composite
def mutated_frames(draw) -> bytes:
    frame = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(frame) - 1))
        frame[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(frame)))
    return bytes(frame[:cut]) if draw(st.booleans()) else bytes(frame)


@pytest.fixture
async def server(tmp_path):
    settings = {"shm_slot_bytes": 1 << 20, "shm_slots_per_worker": 8, "max_body_bytes": 1 << 20}
    async with running_server(tmp_path, models=("echo=echo:float32:16",), **settings) as server:
        yield server


def throw(port: int, data: bytes) -> None:
    """Send ``data``, half-close, and read whatever comes back until the server closes or pauses."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.5)
        try:
            while sock.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass


async def test_fuzzed_frames_never_break_the_server(server):
    port = server.binary.port

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(st.binary(max_size=200), mutated_frames(), st.lists(mutated_frames(), max_size=4).map(b"".join)))
    def fuzz(data: bytes) -> None:
        throw(port, data)

    await asyncio.to_thread(fuzz)

    def still_serving() -> None:
        with Client(f"tcp://127.0.0.1:{port}") as client:
            np.testing.assert_array_equal(client.infer("echo", {"input": np.ones((1, 16), np.float32)})["output"], 1)

    await asyncio.to_thread(still_serving)
    pool = server.supervisor.pool
    async with asyncio.timeout(10):
        while pool.free_count != pool.slot_count:
            await asyncio.sleep(0.05)
