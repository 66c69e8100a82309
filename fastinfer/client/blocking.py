"""The blocking client: one socket, one request at a time, reused across calls."""

from __future__ import annotations

import select
import socket
import threading
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
    FrameDecoder,
    FrameError,
    FrameHead,
    FrameRejected,
    FrameType,
    Hello,
    PayloadComplete,
    StreamError,
    aligned_buffer,
    encode_frame,
)

IOV_MAX = 1024


class Client:
    """A blocking client of the binary protocol.

    The connection opens at the first call and stays open across calls; after a broken
    connection the next call opens a new one. A reply that comes after its call timed out is
    recognized by its request id and dropped. Thread-safe: calls are serialized.
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
        self._sock: socket.socket | None = None
        self._decoder: FrameDecoder | None = None
        self._ids = RequestIds()
        self._lock = threading.Lock()

    def infer(
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
        head, payload = self._call(
            lambda rid: request_frame(rid, model, inputs=inputs, timeout_s=timeout_s, version=version, outputs=outputs),
            timeout_s,
        )
        return outputs_of(head, payload)

    def classify(
        self,
        model: str,
        image: bytes | bytearray | memoryview,
        *,
        timeout_s: float | None = None,
        version: str | None = None,
    ) -> list[dict[str, Any]]:
        """Classify an encoded image (JPEG, PNG): ``[{"index", "class", "probability"}, ...]``."""
        timeout_s = self._timeout(timeout_s)
        head, _ = self._call(
            lambda rid: request_frame(rid, model, image=image, timeout_s=timeout_s, version=version), timeout_s
        )
        return classes_of(head)

    def ping(self, *, timeout_s: float | None = None) -> float:
        """Seconds one PING took to come back as a PONG."""
        start = time.monotonic()
        self._call(lambda rid: encode_frame(FrameType.PING, rid), self._timeout(timeout_s))
        return time.monotonic() - start

    def hello(self, *, timeout_s: float | None = None) -> Hello:
        """The server's HELLO: the versions it speaks, its name, its limits."""
        head, _ = self._call(hello_frame, self._timeout(timeout_s))
        return hello_of(head)

    def close(self) -> None:
        """Close the connection (the next call would open a new one)."""
        with self._lock:
            self._disconnect()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def _call(self, frame: Any, timeout_s: float) -> tuple[FrameHead, memoryview | None]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            sock, decoder = self._connect(deadline)
            request_id = self._ids.next(set())
            try:
                _send_all(sock, frame(request_id), deadline)
            except BaseException:
                self._disconnect()  # a frame may be half sent: the stream is unusable
                raise
            try:
                return self._receive(sock, decoder, request_id, deadline)
            except (TimeoutError, FrameError):
                raise  # the stream is sound: a late reply will be skipped by its id
            except BaseException:
                self._disconnect()
                raise

    def _receive(
        self, sock: socket.socket, decoder: FrameDecoder, request_id: int, deadline: float
    ) -> tuple[FrameHead, memoryview | None]:
        while True:
            sock.settimeout(_remaining(deadline))
            buffer = decoder.get_buffer()
            count = sock.recv_into(buffer)
            if not count:
                decoder.eof()
                raise ConnectionError("the server closed the connection")
            try:
                events = deque(decoder.buffer_updated(count))
            except StreamError as error:
                raise ConnectionError(f"the server broke the protocol: {error}") from error
            reply = None
            while events:
                event = events.popleft()
                if event is decoder.undecided:
                    if event.request_id == request_id:
                        events.extend(decoder.set_payload_buffer(aligned_buffer(event.payload_length)))
                    else:
                        events.extend(decoder.discard_payload())  # a reply that came too late
                elif isinstance(event, FrameRejected) and event.request_id == request_id:
                    raise event.error
                elif isinstance(event, PayloadComplete):
                    if event.head.frame_type is FrameType.ERROR and event.request_id == 0:
                        raise server_error(event.head)
                    if event.request_id == request_id:
                        reply = event.head, event.payload
            if reply is not None:
                return reply

    def _connect(self, deadline: float) -> tuple[socket.socket, FrameDecoder]:
        if self._sock is not None and _closed_by_peer(self._sock):
            self._disconnect()  # the server closed it while idle: open a new one
        if self._sock is None or self._decoder is None:
            sock = socket.socket(self.address.family, socket.SOCK_STREAM)
            try:
                sock.settimeout(_remaining(deadline))
                if self.address.family == socket.AF_UNIX:
                    sock.connect(self.address.path)
                else:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.connect((self.address.host, self.address.port))
            except BaseException:
                sock.close()
                raise
            decoder = FrameDecoder(max_payload_bytes=self.max_payload_bytes)
            if self._token is not None:
                self._authenticate(sock, decoder, deadline)
            self._sock, self._decoder = sock, decoder
        return self._sock, self._decoder

    def _authenticate(self, sock: socket.socket, decoder: FrameDecoder, deadline: float) -> None:
        request_id = self._ids.next(set())
        try:
            _send_all(sock, hello_frame(request_id, self._token), deadline)
            head, _ = self._receive(sock, decoder, request_id, deadline)
            hello_of(head)
        except BaseException:
            sock.close()
            raise

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._decoder = None


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed this idle connection (it is readable, and at its end)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the call timed out")
    return remaining


def _send_all(sock: socket.socket, parts: list[bytes | memoryview], deadline: float) -> None:
    """Send buffers with sendmsg, as they are: tensor bytes are never joined into one object."""
    views = deque(memoryview(part) for part in parts)
    while views:
        sock.settimeout(_remaining(deadline))
        sent = sock.sendmsg(list(views)[:IOV_MAX])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views.popleft().nbytes
            else:
                views[0] = views[0][sent:]
                sent = 0
