"""The control channel between the front and a worker: small msgpack messages, length-prefixed.

Tensor and image bytes never travel here; they sit in shared-memory slots, and messages carry
only slot numbers, byte counts and metadata.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import msgpack

HEADER = struct.Struct("<I")
MAX_MESSAGE_BYTES = 16 << 20


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    return msgpack.unpackb(body, raw=False)


class BlockingChannel:
    """The worker's end: blocking receives; sends from any thread (the heartbeat has its own)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self._send_lock:
            self._sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the front has closed its end."""
        header = self._recv_exactly(HEADER.size)
        if header is None:
            return None
        (length,) = HEADER.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            raise ValueError(f"control message of {length} bytes is over the limit")
        body = self._recv_exactly(length)
        if body is None:
            return None
        return decode(body)

    def _recv_exactly(self, count: int) -> bytes | None:
        buffer = bytearray(count)
        view = memoryview(buffer)
        received = 0
        while received < count:
            n = self._sock.recv_into(view[received:])
            if n == 0:
                return None
            received += n
        return bytes(buffer)
