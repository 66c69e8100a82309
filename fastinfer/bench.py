"""``fastinfer bench``: a closed-loop load generator for the HTTP API and the binary protocol.

``concurrency`` connections each send a request, wait for its answer, and send the next, for
``duration_s`` after a warm-up that is not counted; it prints throughput and latency
percentiles. The clients are lean on purpose (requests encoded once, replies parsed only as far
as needed) so that on a small machine the load generator costs little next to the server it
measures, as wrk does for HTTP. It imports no server code.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from fastinfer.protocol import HEADER, FrameType, encode_frame, pack_tensors

WARM_UP_S = 1.0
REQUEST_ID_OFFSET = 8  # in the binary frame header (docs/protocol.md)


@dataclass
class BenchResult:
    protocol: str
    model: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    def line(self) -> str:
        return (
            f"{self.protocol:>6} {self.model:<20} c={self.concurrency:<4} {self.throughput_rps:10.1f} req/s  "
            f"p50 {self.p50_ms:8.3f} ms  p90 {self.p90_ms:8.3f} ms  p99 {self.p99_ms:8.3f} ms  "
            f"({self.requests} ok, {self.errors} errors)"
        )


class _Recorder:
    """Latencies of answers that arrive inside the measured window."""

    def __init__(self, start_s: float, stop_s: float):
        self.start_s = start_s
        self.stop_s = stop_s
        self.latencies: list[float] = []
        self.errors = 0

    def record(self, sent_s: float, ok: bool) -> bool:
        """Count one answer; False once the window is over (stop sending)."""
        now = time.perf_counter()
        if sent_s >= self.start_s:
            if ok:
                self.latencies.append(now - sent_s)
            else:
                self.errors += 1
        return now < self.stop_s


class _Connection(asyncio.Protocol):
    """Closed-loop clients on one connection: ``depth`` requests in flight; each answer sends the next."""

    def __init__(self, request: bytes, recorder: _Recorder, done: asyncio.Future, depth: int = 1):
        self.request = request
        self.recorder = recorder
        self.done = done
        self.depth = depth
        self.buffer = bytearray()
        self.sent_s: dict[int, float] = {}  # request id -> when it was sent
        self.next_id = 0
        self.keep_alive = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.writelines([part for _ in range(self.depth) for part in self._next()])  # type: ignore[attr-defined]

    def _next(self) -> list[bytes | memoryview]:
        self.next_id += 1
        self.sent_s[self.next_id] = time.perf_counter()
        return self.numbered(self.next_id)

    def numbered(self, request_id: int) -> list[bytes | memoryview]:
        """The request's bytes, as parts written without copying the payload."""
        return [self.request]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        assert self.transport is not None
        following: list[bytes | memoryview] = []  # one write for the requests these replies let go
        while (reply := self.take_reply()) is not None:
            ok, request_id = reply
            if not self.recorder.record(self.sent_s.pop(request_id), ok) or not self.keep_alive:
                self.transport.writelines(following)
                self.transport.close()  # the client loop reconnects if the window is not over
                return
            following += self._next()
        if following:
            self.transport.writelines(following)

    def take_reply(self) -> tuple[bool, int] | None:
        """Remove one complete reply from the buffer: (succeeded, request id); None if incomplete."""
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _BinaryConnection(_Connection):
    def __init__(self, request: bytes, recorder: _Recorder, done: asyncio.Future, depth: int = 1):
        super().__init__(request, recorder, done, depth)
        self.header = bytearray(request[: HEADER.size])
        self.rest = memoryview(request)[HEADER.size :]

    def numbered(self, request_id: int) -> list[bytes | memoryview]:
        struct.pack_into("<I", self.header, REQUEST_ID_OFFSET, request_id)
        return [bytes(self.header), self.rest]

    def take_reply(self) -> tuple[bool, int] | None:
        if len(self.buffer) < HEADER.size:
            return None
        _, _, frame_type, _, request_id, envelope_length, payload_length = HEADER.unpack_from(self.buffer)
        end = HEADER.size + envelope_length + payload_length
        if len(self.buffer) < end:
            return None
        del self.buffer[:end]
        return frame_type == FrameType.RESPONSE, request_id


class _HttpConnection(_Connection):
    def take_reply(self) -> tuple[bool, int] | None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        length = 0
        for line in bytes(self.buffer[:head_end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self.keep_alive = False  # as gunicorn's sync workers answer
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return None
        ok = self.buffer.startswith(b"HTTP/1.1 200")
        del self.buffer[:end]
        return ok, min(self.sent_s)  # one request in flight: answers come in order


def _request_bytes(scheme: str, host: str, model: str, body: bytes, array: np.ndarray | None, input_name: str) -> bytes:
    if scheme == "http":
        head = (
            f"POST /predictions/{model} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body
    envelope: dict[str, Any]
    if array is None:
        envelope = {"model": model, "image": {"offset": 0, "nbytes": len(body)}}
        parts: list = [body]
    else:
        descriptors, parts = pack_tensors({input_name: array})
        envelope = {"model": model, "inputs": descriptors}
    return b"".join(bytes(part) for part in encode_frame(FrameType.REQUEST, 1, envelope, parts))


async def bench(
    url: str,
    model: str,
    *,
    concurrency: int = 1,
    duration_s: float = 5.0,
    shape: tuple[int, ...] = (1, 16),
    dtype: str = "float32",
    image: Path | None = None,
    input_name: str = "input",
    pipeline: int = 1,
) -> BenchResult:
    """Measure ``model`` at ``url`` (``http://host:port``, ``tcp://host:port`` or ``unix:///path``).

    ``pipeline`` (binary protocol only) puts that many of the ``concurrency`` requests in flight on
    each connection, as the asyncio client does; HTTP keeps one per connection."""
    parsed = urlparse(url)
    scheme = "http" if parsed.scheme == "http" else "binary"
    if image is not None:
        body, array = image.read_bytes(), None
    else:
        array = np.random.default_rng(0).random(shape).astype(dtype)
        body = array.tobytes()
    request = _request_bytes(scheme, parsed.netloc, model, body, array, input_name)
    start_s = time.perf_counter() + WARM_UP_S
    recorder = _Recorder(start_s, start_s + duration_s)
    connection_class: type[_Connection] = _HttpConnection if scheme == "http" else _BinaryConnection
    loop = asyncio.get_running_loop()
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 8090

    depth = max(1, pipeline) if scheme == "binary" else 1

    async def client(depth: int) -> None:
        while time.perf_counter() < recorder.stop_s:
            done: asyncio.Future = loop.create_future()

            def connection(done: asyncio.Future = done) -> _Connection:
                return connection_class(request, recorder, done, depth)

            if parsed.scheme == "unix":
                await loop.create_unix_connection(connection, parsed.path)
            else:
                await loop.create_connection(connection, host, port)
            await done

    connections = math.ceil(concurrency / depth)
    depths = [concurrency // connections + (i < concurrency % connections) for i in range(connections)]
    await asyncio.gather(*(client(d) for d in depths))

    latencies_ms = np.array(recorder.latencies) * 1000 if recorder.latencies else np.array([np.nan])
    return BenchResult(
        protocol=scheme,
        model=model,
        concurrency=concurrency,
        requests=len(recorder.latencies),
        errors=recorder.errors,
        duration_s=duration_s,
        throughput_rps=len(recorder.latencies) / duration_s,
        p50_ms=float(np.percentile(latencies_ms, 50)),
        p90_ms=float(np.percentile(latencies_ms, 90)),
        p99_ms=float(np.percentile(latencies_ms, 99)),
    )


def run(args) -> int:
    """Entry point of ``fastinfer bench``."""
    import uvloop

    shape = tuple(int(d) for d in args.shape.split(","))
    result = uvloop.run(
        bench(
            args.url,
            args.model,
            concurrency=args.concurrency,
            duration_s=args.duration_s,
            shape=shape,
            dtype=args.dtype,
            image=Path(args.image) if args.image else None,
            input_name=args.input_name,
            pipeline=args.pipeline,
        )
    )
    print(json.dumps(asdict(result)) if args.json else result.line())
    return 0 if result.requests else 1
