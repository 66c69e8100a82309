"""The asyncio client: many concurrent requests pipelined on one connection.

Replies are matched to calls by request id, in whatever order the server sends them. The
connection is an asyncio.BufferedProtocol over the same decoder the server uses, so reply
tensors are received straight into the arrays' memory.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastinfer.client.binary import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    Address,
    RequestIds,
    classes_of,
    hello_frame,
    hello_of,
    outputs_of,
    request_frame,
    server_error,
)
from fastinfer.protocol import (
    MAX_PAYLOAD_BYTES,
    Event,
    FrameDecoder,
    FrameHead,
    FrameRejected,
    FrameType,
    Hello,
    PayloadComplete,
    StreamError,
    aligned_buffer,
    encode_frame,
)

Reply = tuple[FrameHead, "memoryview | None"]


class _Connection(asyncio.BufferedProtocol):
    """One connection: writes frames, and resolves each call's future when its reply is in."""

    def __init__(self, max_payload_bytes: int):
        self.decoder = FrameDecoder(max_payload_bytes=max_payload_bytes)
        self.waiting: dict[int, asyncio.Future[Reply]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.decoder.buffer_updated(nbytes)
        except StreamError as error:
            self._dispatch(error.events)
            self._fail(ConnectionError(f"the server broke the protocol: {error}"))
            return
        self._dispatch(events)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"the connection to the server was lost: {exc or 'closed'}"))
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send(self, parts: list[bytes | memoryview]) -> None:
        """Queue a whole frame at once (never half of one), then wait while the buffer is full."""
        if self.closed or self.transport is None:
            raise ConnectionError("the connection is closed")
        if sys.version_info >= (3, 12):
            self.transport.writelines(parts)  # sendmsg of the views
        else:
            for part in parts:  # 3.11's writelines joins the buffers into one
                self.transport.write(part)
        await self._writable.wait()

    async def close(self, timeout_s: float) -> None:
        self._fail(ConnectionError("the client closed the connection"))
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), timeout_s)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()

    def _dispatch(self, events: list[Event]) -> None:
        queue = deque(events)
        while queue:
            event = queue.popleft()
            if event is self.decoder.undecided:
                if event.request_id in self.waiting:
                    queue.extend(self.decoder.set_payload_buffer(aligned_buffer(event.payload_length)))
                else:
                    queue.extend(self.decoder.discard_payload())  # its call gave up already
            elif isinstance(event, FrameRejected):
                self._resolve(event.request_id, error=event.error)
            elif isinstance(event, PayloadComplete):
                if event.head.frame_type is FrameType.ERROR and event.request_id == 0:
                    self._fail(server_error(event.head))
                else:
                    self._resolve(event.request_id, reply=(event.head, event.payload))

    def _resolve(self, request_id: int, reply: Reply | None = None, error: Exception | None = None) -> None:
        future = self.waiting.pop(request_id, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(reply)  # type: ignore[arg-type]

    def _fail(self, error: Exception) -> None:
        """Fail every call in flight and close: nothing more can come on this connection."""
        self.closed = True
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)
        self._writable.set()
        if self.transport is not None:
            self.transport.close()


class AsyncClient:
    """An asyncio client of the binary protocol; calls may run concurrently on one connection.

    The connection opens at the first call (or ``connect()``) and is reused; once broken, the
    next call opens a new one. A call that times out leaves the connection open: its reply is
    dropped when it comes.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        token: str | None = None,
    ):
        self.address = Address.parse(address)
        self.timeout_s = timeout_s
        self.max_payload_bytes = max_payload_bytes
        self._token = token  # sent in the HELLO that opens each connection
        self._connection: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._ids = RequestIds()

    async def connect(self, *, timeout_s: float | None = None) -> None:
        """Open the connection now rather than at the first call."""
        await self._connect(time.monotonic() + self._timeout(timeout_s))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on named arrays; its outputs by name."""
        timeout_s = self._timeout(timeout_s)
        head, payload = await self._call(
            lambda rid: request_frame(rid, model, inputs=inputs, timeout_s=timeout_s, version=version, outputs=outputs),
            timeout_s,
        )
        return outputs_of(head, payload)

    async def classify(
        self,
        model: str,
        image: bytes | bytearray | memoryview,
        *,
        timeout_s: float | None = None,
        version: str | None = None,
    ) -> list[dict[str, Any]]:
        """Classify an encoded image (JPEG, PNG): ``[{"index", "class", "probability"}, ...]``."""
        timeout_s = self._timeout(timeout_s)
        head, _ = await self._call(
            lambda rid: request_frame(rid, model, image=image, timeout_s=timeout_s, version=version), timeout_s
        )
        return classes_of(head)

    async def ping(self, *, timeout_s: float | None = None) -> float:
        """Seconds one PING took to come back as a PONG."""
        start = time.monotonic()
        await self._call(lambda rid: encode_frame(FrameType.PING, rid), self._timeout(timeout_s))
        return time.monotonic() - start

    async def hello(self, *, timeout_s: float | None = None) -> Hello:
        """The server's HELLO: the versions it speaks, its name, its limits."""
        head, _ = await self._call(hello_frame, self._timeout(timeout_s))
        return hello_of(head)

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Close the connection; calls still in flight fail with ConnectionError."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close(timeout_s)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    async def _call(self, frame: Any, timeout_s: float) -> Reply:
        deadline = time.monotonic() + timeout_s
        connection = await self._connect(deadline)
        return await self._call_on(connection, frame, deadline)

    async def _call_on(self, connection: _Connection, frame: Any, deadline: float) -> Reply:
        request_id = self._ids.next(connection.waiting)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        connection.waiting[request_id] = future
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
                await connection.send(frame(request_id))
                return await future
        finally:
            if connection.waiting.get(request_id) is future:
                del connection.waiting[request_id]

    async def _connect(self, deadline: float) -> _Connection:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting, asyncio.timeout(max(0.0, deadline - time.monotonic())):
            if self._connection is None or self._connection.closed:
                connection = await self._open()
                if self._token is not None:
                    try:
                        head, _ = await self._call_on(connection, lambda rid: hello_frame(rid, self._token), deadline)
                        hello_of(head)
                    except BaseException:
                        await connection.close(1.0)
                        raise
                self._connection = connection
        return self._connection

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self.address
        factory = lambda: _Connection(self.max_payload_bytes)  # noqa: E731
        if address.family == socket.AF_UNIX:
            _, connection = await loop.create_unix_connection(factory, address.path)
        else:
            _, connection = await loop.create_connection(factory, address.host, address.port)
        return connection
