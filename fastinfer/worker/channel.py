"""The control channel between the front and a worker: small msgpack messages, length-prefixed.

Tensor and image bytes never travel here; they sit in shared-memory slots, and messages carry
only slot numbers, byte counts and metadata. A conversation::

    front  -> worker   INIT (settings)            worker -> front   READY (signatures) or FAILED
    front  -> worker   RUN (a batch)              worker -> front   DONE (its outcome), in order
                                                  worker -> front   BEAT, every heartbeat period
    front  -> worker   STOP: exit after the batches already sent
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

import msgpack

HEADER = struct.Struct("<I")
MAX_MESSAGE_BYTES = 16 << 20
RECV_BYTES = 1 << 16


class Op(StrEnum):
    """What a message is (its ``op``); a ``StrEnum``, so that msgpack carries the plain word."""

    INIT = "init"
    READY = "ready"
    FAILED = "failed"
    RUN = "run"
    DONE = "done"
    BEAT = "beat"
    STOP = "stop"


class Run(TypedDict):
    """A batch to run: ``rows`` rows laid out in ``slot``; an image request's bytes in its own slot."""

    op: Op
    id: int
    model: str
    slot: int
    rows: int
    images: list[list[int] | None]  # per row: [image slot, byte count], or None for a tensor row


class Done(TypedDict):
    """A batch's outcome: outputs are in its slot; per-row errors, or one error for the batch."""

    op: Op
    id: int
    errors: NotRequired[list[dict | None]]
    classes: NotRequired[list[list[dict]] | None]
    error: NotRequired[dict]


class Ready(TypedDict):
    op: Op
    pid: int
    models: dict[str, dict]  # name -> ModelSignature.to_dict()


def encode(message: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    return msgpack.unpackb(body, raw=False)


class BlockingChannel:
    """The worker's end: blocking receives; sends from any thread (the heartbeat has its own)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray()

    def send(self, message: Mapping[str, Any]) -> None:
        data = encode(message)
        with self._send_lock:
            self._sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the front has closed its end."""
        while True:
            if len(self._buffer) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buffer)
                if length > MAX_MESSAGE_BYTES:
                    raise ValueError(f"control message of {length} bytes is over the limit")
                end = HEADER.size + length
                if len(self._buffer) >= end:
                    message = decode(self._buffer[HEADER.size : end])
                    del self._buffer[:end]
                    return message
            chunk = self._sock.recv(RECV_BYTES)  # one call usually brings a whole message, or several
            if not chunk:
                return None
            self._buffer += chunk


class ChannelProtocol(asyncio.Protocol):
    """The front's end: parses messages as bytes arrive and hands each to ``on_message``."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[], None]):
        self._on_message = on_message
        self._on_lost = on_lost
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + length
            if length > MAX_MESSAGE_BYTES:
                self.close()
                return
            if len(buffer) < end:
                break
            self._on_message(decode(buffer[start + HEADER.size : end]))
            start = end
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()

    def send(self, message: Mapping[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
