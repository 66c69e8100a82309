"""Both clients against a small echo server written with asyncio and the codec, on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import deque

import numpy as np
import pytest

from fastinfer.client import AsyncClient, Client, InferenceServerError
from fastinfer.protocol import (
    FrameDecoder,
    FrameError,
    FrameRejected,
    FrameType,
    PayloadComplete,
    Request,
    StreamError,
    encode_frame,
    error_envelope,
    pack_tensors,
    unpack_tensors,
)


class EchoServer:
    """Echoes inputs as outputs. Models: "missing" (model_not_found), "fatal" (an ERROR for the
    whole connection, then close), "garbled" (a reply with an unknown dtype); an input named
    "delay_s" holds seconds to wait before replying, so that replies can overtake each other."""

    def __init__(self) -> None:
        self.connections = 0
        self.open: set[EchoConnection] = set()
        self.reply_order: list[int] = []
        self.server: asyncio.Server | None = None

    async def start(self, path: str | None = None) -> str:
        loop = asyncio.get_running_loop()
        if path is not None:
            self.server = await loop.create_unix_server(lambda: EchoConnection(self), path)
            return f"unix://{path}"
        self.server = await loop.create_server(lambda: EchoConnection(self), "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for connection in list(self.open):
            connection.transport.close()
        await self.server.wait_closed()


class EchoConnection(asyncio.BufferedProtocol):
    def __init__(self, owner: EchoServer):
        self.owner = owner
        self.decoder = FrameDecoder()
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport):
        self.owner.connections += 1
        self.owner.open.add(self)
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        try:
            events = deque(self.decoder.buffer_updated(nbytes))
        except StreamError as error:
            self.send(FrameType.ERROR, 0, error_envelope(error.code, error.message, error.status))
            self.transport.close()
            return
        while events:
            event = events.popleft()
            if event is self.decoder.undecided:
                # As the real server does with a shared-memory slot: the payload goes where we say.
                events.extend(self.decoder.set_payload_buffer(np.empty(event.payload_length + 64, np.uint8).data))
            elif isinstance(event, FrameRejected):
                self.send(FrameType.ERROR, event.request_id, error_envelope(event.error.code, event.error.message))
            elif isinstance(event, PayloadComplete):
                task = asyncio.get_running_loop().create_task(self.answer(event))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc):
        self.owner.open.discard(self)
        for task in self.tasks:
            task.cancel()

    def send(self, frame_type, request_id, envelope=None, parts=()):
        if not self.transport.is_closing():
            self.transport.writelines(encode_frame(frame_type, request_id, envelope, parts))

    async def answer(self, event: PayloadComplete) -> None:
        head, rid = event.head, event.request_id
        if head.frame_type is FrameType.PING:
            return self.send(FrameType.PONG, rid)
        if head.frame_type is FrameType.HELLO:
            return self.send(FrameType.HELLO, rid, {"versions": [1], "agent": "echo", "max_payload_bytes": 1 << 20})
        request = head.message
        assert isinstance(request, Request)
        if request.model == "missing":
            return self.send(FrameType.ERROR, rid, error_envelope("model_not_found", f"no model {request.model!r}"))
        if request.model == "fatal":
            self.send(FrameType.ERROR, 0, error_envelope("internal_error", "the server gives up"))
            return self.transport.close()
        if request.image is not None:
            classes = [{"index": request.image.nbytes, "class": "bytes", "probability": 1.0}]
            return self.send(FrameType.RESPONSE, rid, {"model": request.model, "classes": classes})
        arrays = unpack_tensors(request.inputs, event.payload)
        if "delay_s" in arrays:
            await asyncio.sleep(float(arrays["delay_s"]))
        descriptors, parts = pack_tensors(arrays)
        if request.model == "garbled":
            descriptors[0]["dtype"] = "float8"
        self.owner.reply_order.append(rid)
        self.send(FrameType.RESPONSE, rid, {"model": request.model, "outputs": descriptors}, parts)


@contextlib.asynccontextmanager
async def echo_server(path: str | None = None):
    server = EchoServer()
    address = await server.start(path)
    try:
        yield server, address
    finally:
        await server.stop()


@pytest.fixture
def threaded_server():
    """The echo server on a loop of its own, for the blocking client."""
    loop = asyncio.new_event_loop()
    server = EchoServer()
    address = loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server, address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


INPUTS = {
    "x": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "mask": np.array([True, False]),
    "big": np.arange(300_000, dtype=np.int64),  # larger than socket buffers: sent in pieces
}


def assert_same(outputs, inputs):
    assert outputs.keys() == inputs.keys()
    for name, array in inputs.items():
        assert outputs[name].dtype == array.dtype
        np.testing.assert_array_equal(outputs[name], array)


def test_blocking_client_round_trips_and_reuses_its_connection(threaded_server):
    server, address = threaded_server
    with Client(address, timeout_s=10) as client:
        assert_same(client.infer("echo", INPUTS), INPUTS)
        assert_same(client.infer("echo", {"y": np.ones(3, np.uint8)}), {"y": np.ones(3, np.uint8)})
        assert client.classify("cats", b"\xff\xd8 a jpeg") == [{"index": 9, "class": "bytes", "probability": 1.0}]
        assert client.ping() > 0
        hello = client.hello()
        assert hello.agent == "echo" and hello.versions == (1,)
    assert server.connections == 1


def test_blocking_client_errors(threaded_server):
    server, address = threaded_server
    with Client(address, timeout_s=10) as client:
        with pytest.raises(InferenceServerError) as caught:
            client.infer("missing", {"x": np.zeros(1)})
        assert (caught.value.code, caught.value.status) == ("model_not_found", 404)
        with pytest.raises(FrameError):
            client.infer("garbled", {"x": np.zeros(1)})
        assert client.ping() > 0  # both errors left the connection usable
        assert server.connections == 1
        with pytest.raises(InferenceServerError) as caught:
            client.infer("fatal", {"x": np.zeros(1)})
        assert caught.value.code == "internal_error"
        assert_same(client.infer("echo", {"x": np.zeros(1)}), {"x": np.zeros(1)})  # on a new connection
    assert server.connections == 2


def test_blocking_client_timeout_keeps_the_connection(threaded_server):
    server, address = threaded_server
    with Client(address, timeout_s=10) as client:
        with pytest.raises(TimeoutError):
            client.infer("echo", {"delay_s": np.float64(0.5)}, timeout_s=0.1)
        # The late reply comes first on the stream and is skipped by its request id.
        assert_same(client.infer("echo", {"x": np.ones(2)}), {"x": np.ones(2)})
    assert server.connections == 1


def test_blocking_client_refused_connection():
    with pytest.raises(OSError), Client("tcp://127.0.0.1:1", timeout_s=2) as client:
        client.ping()
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:8090")


async def test_async_client_round_trips():
    async with echo_server() as (server, address), AsyncClient(address, timeout_s=10) as client:
        assert_same(await client.infer("echo", INPUTS), INPUTS)
        assert await client.classify("cats", b"abc") == [{"index": 3, "class": "bytes", "probability": 1.0}]
        assert await client.ping() > 0
        assert (await client.hello()).max_payload_bytes == 1 << 20
        assert server.connections == 1


async def test_async_client_over_a_unix_socket(tmp_path):
    async with echo_server(str(tmp_path / "f.sock")) as (_, address), AsyncClient(address) as client:
        assert address.startswith("unix://")
        assert_same(await client.infer("echo", INPUTS), INPUTS)


async def test_async_client_pipelines_on_one_connection():
    rng = random.Random(3)
    async with echo_server() as (server, address), AsyncClient(address, timeout_s=10) as client:
        calls = [
            client.infer("echo", {"i": np.full((4, 4), i, np.int32), "delay_s": np.float64(rng.uniform(0, 0.2))})
            for i in range(50)
        ]
        results = await asyncio.gather(*calls)
        for i, outputs in enumerate(results):
            np.testing.assert_array_equal(outputs["i"], np.full((4, 4), i, np.int32))
        assert server.connections == 1
        assert len(server.reply_order) == 50 and server.reply_order != sorted(server.reply_order)


async def test_async_client_errors():
    async with echo_server() as (server, address), AsyncClient(address, timeout_s=10) as client:
        with pytest.raises(InferenceServerError) as caught:
            await client.infer("missing", {"x": np.zeros(1)})
        assert (caught.value.code, caught.value.message, caught.value.status) == (
            "model_not_found",
            "no model 'missing'",
            404,
        )
        with pytest.raises(FrameError):
            await client.infer("garbled", {"x": np.zeros(1)})
        assert await client.ping() > 0
        # A fatal error fails every call in flight on the connection, then the client reconnects.
        slow = asyncio.ensure_future(client.infer("echo", {"delay_s": np.float64(5)}))
        await asyncio.sleep(0.05)
        with pytest.raises(InferenceServerError):
            await client.infer("fatal", {"x": np.zeros(1)})
        with pytest.raises(InferenceServerError):
            await slow
        assert await client.ping() > 0
        assert server.connections == 2


async def test_async_client_timeout_keeps_the_connection():
    async with echo_server() as (server, address), AsyncClient(address, timeout_s=10) as client:
        with pytest.raises(TimeoutError):
            await client.infer("echo", {"delay_s": np.float64(0.3)}, timeout_s=0.05)
        await asyncio.sleep(0.4)  # the late reply arrives and is dropped
        assert_same(await client.infer("echo", INPUTS), INPUTS)
        assert server.connections == 1


async def test_async_client_close_fails_calls_in_flight():
    async with echo_server() as (_, address):
        client = AsyncClient(address, timeout_s=10)
        slow = asyncio.ensure_future(client.infer("echo", {"delay_s": np.float64(5)}))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(ConnectionError):
            await slow


async def test_server_closing_fails_calls_in_flight():
    server = EchoServer()
    address = await server.start()
    client = AsyncClient(address, timeout_s=10)
    try:
        slow = asyncio.ensure_future(client.infer("echo", {"delay_s": np.float64(5)}))
        await asyncio.sleep(0.05)
        await server.stop()
        with pytest.raises(ConnectionError):
            await slow
    finally:
        await client.close()
