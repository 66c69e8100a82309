"""The binary protocol listener: an ``asyncio.BufferedProtocol`` over the sans-IO codec.

A request's payload is received into an aligned buffer of its own, and its rows in shared memory
are reserved only once the last byte is in (then the bytes are copied into them once): a request
joins a batch complete, so a client that sends slowly, or stops, holds no slot and delays no
other client's batch (docs/protocol.md, "Limits").

Replies are written from views of the batch slot; a row is released only once the transport has
handed those bytes to the kernel (a write-buffer high-water mark of 0 tells us when).

Limits, as on the HTTP port: a frame must arrive whole within ``body_timeout_s`` of its first byte
(else its request fails with ``request_timeout`` and the connection closes, since the stream cannot
be framed past the missing bytes); a connection with nothing in flight and nothing arriving for
``header_timeout_s`` is closed; past ``max_connections`` open connections a new one gets an ERROR
``too_many_connections`` and is closed. With an inference token set, a connection must open with a
HELLO carrying it; anything else gets an ERROR ``unauthorized`` and the connection closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from fastinfer.config import Config
from fastinfer.errors import BadRequest, FastInferError, PayloadTooLarge, RequestTimeout, Unauthorized
from fastinfer.protocol import (
    DTYPES,
    HEADER,
    MAGIC,
    SUPPORTED_VERSIONS,
    FrameDecoder,
    FrameHead,
    FrameRejected,
    FrameType,
    Hello,
    PayloadComplete,
    Request,
    StreamError,
    aligned_buffer,
    encode_frame,
    error_envelope,
    pack_tensors,
)
from fastinfer.server.admission import check_version
from fastinfer.server.batcher import Row
from fastinfer.server.fronts.access import token_matches
from fastinfer.server.supervisor import Supervisor
from fastinfer.signature import ModelSignature, samples_of

log = logging.getLogger(__name__)

PROTOCOL_VERSION = SUPPORTED_VERSIONS[-1]

REMEMBERED_ENVELOPES = 64  # per connection (SeenEnvelope)
REFUSAL_LOG_EVERY_S = 10.0  # connections refused past the limit are logged at most this often
PAUSE_AFTER_REQUESTS = 256  # per connection: stop reading past this many requests in flight
JOIN_BELOW_BYTES = 64 << 10  # replies this small are copied into one write: a syscall costs more


@dataclass
class Receiving:
    """A request whose header is in and whose payload is on its way, into memory of its own."""

    request: Request
    signature: ModelSignature
    started: float


@dataclass
class ReplyTemplate:
    """A model's one-sample RESPONSE envelope, encoded once: its replies differ only in their
    request id and their bytes."""

    body: bytes
    outputs: tuple[int, ...]  # the indices of the outputs sent, in order
    paddings: tuple[bytes, ...]  # before each of them
    payload_length: int

    @classmethod
    def build(cls, signature: ModelSignature, request: Request) -> ReplyTemplate | None:
        """None where replies need the general path."""
        chosen = [
            (index, spec)
            for index, spec in enumerate(signature.outputs)
            if request.outputs is None or spec.name in request.outputs
        ]
        if sys.byteorder != "little":
            return None  # outputs are not sent as they are in memory
        arrays = {spec.name: np.zeros((1, *spec.shape), spec.dtype) for _, spec in chosen}
        descriptors, _ = pack_tensors(arrays)
        paddings, end = [], 0
        for descriptor in descriptors:
            paddings.append(bytes(descriptor["offset"] - end))
            end = descriptor["offset"] + descriptor["nbytes"]
        first = encode_frame(FrameType.RESPONSE, 0, {"model": request.model, "outputs": descriptors})[0]
        body = bytes(first[HEADER.size :])
        return cls(body, tuple(index for index, _ in chosen), tuple(paddings), end)

    def frame(self, request_id: int, outputs: list[np.ndarray]) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = [
            HEADER.pack(MAGIC, PROTOCOL_VERSION, FrameType.RESPONSE, 0, request_id, len(self.body), self.payload_length)
            + self.body
        ]
        for index, padding in zip(self.outputs, self.paddings, strict=True):
            if padding:
                parts.append(padding)
            parts.append(outputs[index].data.cast("B"))
        return parts


@dataclass
class SeenEnvelope:
    """What a connection learnt from a request envelope. The decoder hands the same Request object
    for the same envelope bytes, so its checks and its reply template are worked out once."""

    signature: ModelSignature
    request: Request
    batch: int

    @functools.cached_property
    def template(self) -> ReplyTemplate | None:
        return ReplyTemplate.build(self.signature, self.request)


@dataclass
class Answering:
    """A request whose rows are with the batcher; answered when the last row's result is in."""

    request_id: int
    rows: list[Row]
    request: Request
    started: float
    waiting: int


class BinaryProtocol(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, supervisor: Supervisor, config: Config, connections: set[BinaryProtocol]):
        self.supervisor = supervisor
        self.config = config
        self._connections = connections
        self.decoder = FrameDecoder(max_payload_bytes=config.max_body_bytes)
        self.transport: asyncio.Transport | None = None
        self._receiving: dict[int, Receiving] = {}
        self.answering: set[int] = set()  # request ids
        self._out: list[bytes | memoryview] = []  # frames for this loop iteration's write
        self._flush_scheduled = False
        self._after_flush: list[Row] = []  # rows whose outputs _out holds views of
        self._after_drain: list[Row] = []  # rows whose outputs the transport still holds views of
        self._paused = False
        self._seen: dict[int, SeenEnvelope] = {}  # by id() of the decoder's Request
        self.authenticated = not config.inference_token
        self.loop = asyncio.get_running_loop()
        self.last_read_s = self.loop.time()
        self.frame_started_s: float | None = None  # when the partial frame now arriving began

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport.set_write_buffer_limits(high=0)  # pause_writing() whenever bytes are left buffered

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        for _ in self._receiving:
            self.supervisor.metrics.request_ended("binary")  # cut short: nobody is left to answer
        self._receiving.clear()
        self.decoder = FrameDecoder()
        self.transport = None  # answers still to come are dropped, their rows released
        self._out.clear()
        self._after_drain += self._after_flush
        self._after_flush = []
        self.resume_writing()

    def pause_writing(self) -> None:
        pass  # resume_writing() tells when buffered replies are out

    def resume_writing(self) -> None:
        rows, self._after_drain = self._after_drain, []
        for row in rows:
            row.release()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_read_s = now = self.loop.time()
        try:
            events = deque(self.decoder.buffer_updated(nbytes))
            while events:
                self._handle(events.popleft(), events)  # placing a payload may read on, into the next frame
        except StreamError as error:
            self._stream_broken(error)
            return
        if self.frame_started_s is None and not self.decoder.at_frame_boundary:
            self.frame_started_s = now

    # limits (checked by BinaryServer's sweep)

    @property
    def idle(self) -> bool:
        """Nothing in flight and no partial frame: the connection only holds its socket."""
        return not self.answering and not self._receiving and self.decoder.at_frame_boundary

    def check_limits(self, now: float) -> None:
        """Close the connection if its partial frame is overdue, or if it has idled too long."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.frame_started_s is not None and now - self.frame_started_s > self.config.body_timeout_s:
            error = RequestTimeout(f"the frame did not arrive whole within {self.config.body_timeout_s:g} s")
            for request_id, receiving in self._receiving.items():
                self._refuse(request_id, receiving.request, error, receiving.started)
            self._close_with(error)  # connection_lost ends what was receiving
        elif self.idle and now - self.last_read_s > self.config.header_timeout_s:
            self.close()  # as HTTP closes an idle keep-alive connection: nothing is owed to anyone

    def _close_with(self, error: FastInferError, **extra: Any) -> None:
        """Say why on request id 0 (the connection's), then close."""
        self._send(FrameType.ERROR, 0, error_envelope(error.code, error.message, error.status, **extra))
        self._flush()  # now: the connection closes before the loop would get to it
        if self.transport is not None:
            self.transport.close()

    def _stream_broken(self, error: StreamError) -> None:
        """The stream cannot be framed any more: answer what completed, say why on id 0, close."""
        try:
            for event in error.events:
                self._handle(event, deque())
        except StreamError:
            pass
        extra = {"versions": list(SUPPORTED_VERSIONS)} if error.code == "unsupported_version" else {}
        self._close_with(error, **extra)

    def eof_received(self) -> bool | None:
        return False  # close our side too; replies still in flight are dropped with the connection

    # frames

    def _handle(self, event: Any, events: deque) -> None:
        if self.transport is None or self.transport.is_closing():
            if event is self.decoder.undecided:
                self.decoder.discard_payload()  # the connection is closing: nothing more is read into rows
            return
        if isinstance(event, PayloadComplete | FrameRejected):
            self.frame_started_s = None  # a frame ended: the next one's time starts with its first byte
        if not self.authenticated and not self._authenticates(event):
            if event is self.decoder.undecided:
                self.decoder.discard_payload()  # nothing is read, or allocated, for a stranger
            return
        if isinstance(event, FrameHead) and event is self.decoder.undecided:
            events.extend(self._place_payload(event))
        elif isinstance(event, FrameHead) and event.frame_type == FrameType.REQUEST and not event.payload_length:
            self._refuse_empty(event)
        elif isinstance(event, FrameRejected):
            if event.request_id == 0:  # the connection's own id: the client cannot tell which call failed
                self._close_with(event.error)
            else:
                self._send_error(event.request_id, event.error)
        elif isinstance(event, PayloadComplete):
            self._complete(event)

    def _authenticates(self, event: Any) -> bool:
        """Before its token, a connection may send a HELLO that carries it, and nothing else."""
        if isinstance(event, PayloadComplete) and event.head.frame_type == FrameType.HELLO:
            hello = event.head.message
            given = hello.token if isinstance(hello, Hello) and hello.token is not None else ""
            if token_matches(given, self.config.inference_token):
                self.authenticated = True
                return True
        elif isinstance(event, FrameHead) and event.frame_type == FrameType.HELLO:
            return False  # its PayloadComplete follows at once (a HELLO has no payload)
        self._close_with(Unauthorized("this port needs a HELLO with the inference token first; that is not it"))
        return False

    def _refuse_empty(self, head: FrameHead) -> None:
        """A REQUEST without payload bytes: it names no tensor or image data, so it cannot run."""
        request = head.message
        assert isinstance(request, Request)
        try:
            self._checked(self.supervisor.signature(request.model), request)  # the reason, where there is one
            raise BadRequest("the image is empty" if request.image is not None else "the request carries no bytes")
        except FastInferError as error:
            self._refuse(head.request_id, request, error)

    def _complete(self, event: PayloadComplete) -> None:
        head = event.head
        if head.frame_type == FrameType.PING:
            self._send(FrameType.PONG, head.request_id, {})
        elif head.frame_type == FrameType.HELLO:
            hello = {
                "versions": list(SUPPORTED_VERSIONS),
                "agent": "fastinfer",
                "max_envelope_bytes": self.decoder.max_envelope_bytes,
                "max_payload_bytes": self.decoder.max_payload_bytes,
            }
            self._send(FrameType.HELLO, head.request_id, hello)
        elif head.frame_type == FrameType.REQUEST:
            self._request_received(head, event.payload)
        elif head.frame_type in (FrameType.RESPONSE, FrameType.PONG):
            self._send_error(head.request_id, BadRequest("a client does not send RESPONSE or PONG frames"))

    def _place_payload(self, head: FrameHead) -> list:
        """Check the request and receive its payload into memory of its own: its rows are reserved
        only once every byte is in, so a slow or stalled sender holds no slot and delays no batch."""
        if head.frame_type != FrameType.REQUEST or not isinstance(head.message, Request):
            return self.decoder.discard_payload()
        request = head.message
        try:
            signature = self.supervisor.signature(request.model)
            self._checked(signature, request)
        except FastInferError as error:
            self._refuse(head.request_id, request, error)
            return self.decoder.discard_payload()
        self.supervisor.metrics.request_started("binary")
        self._receiving[head.request_id] = Receiving(request, signature, time.perf_counter())
        # Pages are committed as bytes arrive: a sender that stops short costs what it sent.
        return self.decoder.set_payload_buffer(aligned_buffer(head.payload_length))

    def _reserve(self, signature: ModelSignature, request: Request) -> list[Row]:
        count = self._checked(signature, request)
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else self.config.request_timeout_s
        rows: list[Row] = []
        try:
            for _ in range(count):
                rows.append(self.supervisor.batcher.reserve(signature.name, timeout_s))
        except FastInferError:
            for row in rows:
                row.release()
            raise
        return rows

    def _checked(self, signature: ModelSignature, request: Request) -> int:
        """The request's batch size, once it is checked against the model; BadRequest if it does not fit."""
        check_version(signature.name, request.version)
        if signature.takes_images != (request.image is not None):
            kind = "an encoded image" if signature.takes_images else "tensors"
            raise BadRequest(f"model {signature.name} takes {kind}")
        return self._seen_envelope(signature, request).batch

    def _seen_envelope(self, signature: ModelSignature, request: Request) -> SeenEnvelope:
        seen = self._seen.get(id(request))
        if seen is None or seen.signature is not signature or seen.request is not request:
            batch = 1 if request.image is not None else _batch_of(signature, request)
            if len(self._seen) >= REMEMBERED_ENVELOPES:
                self._seen.clear()
            seen = self._seen[id(request)] = SeenEnvelope(signature, request, batch)
        return seen

    def _request_received(self, head: FrameHead, payload: memoryview | None) -> None:
        receiving = self._receiving.pop(head.request_id, None)
        if receiving is None:
            return  # refused when its header came; already answered
        request, started = receiving.request, receiving.started
        rows: list[Row] = []
        try:
            if payload is None:
                raise BadRequest("the request's payload was not received")
            rows = self._reserve(receiving.signature, request)
            _copy_into_rows(rows, request, payload)
            _mark_filled(rows, request)
        except FastInferError as error:
            for row in rows:
                row.release()
            self.supervisor.metrics.request_ended("binary")
            self._refuse(head.request_id, request, error, started)
            return
        answering = Answering(head.request_id, rows, request, started, waiting=len(rows))
        self.answering.add(head.request_id)
        for row in rows:
            row.when_done(functools.partial(self._row_done, answering))
        if len(self.answering) >= PAUSE_AFTER_REQUESTS and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _row_done(self, answering: Answering, _: Row) -> None:
        answering.waiting -= 1
        if answering.waiting == 0:
            self._answer(answering)

    def _answer(self, answering: Answering) -> None:
        """Send the reply from views of the batch slots; release the rows once it is written."""
        rows, request = answering.rows, answering.request
        code = "ok"
        held = False
        try:
            results = []
            for row in rows:
                if isinstance(row.outcome, FastInferError):
                    raise row.outcome
                assert row.outcome is not None
                results.append(row.outcome)
            signature = rows[0].batch.queue.signature
            one_plain = len(results) == 1 and results[0].classes is None
            template = self._seen_envelope(signature, request).template if one_plain else None
            if template is not None:
                held = self._queue(template.frame(answering.request_id, results[0].outputs))
            else:
                held = self._send(FrameType.RESPONSE, answering.request_id, *_envelope(signature, request, results))
            del results
        except FastInferError as error:
            code = error.code
            self._send_error(answering.request_id, error)
        finally:
            self.answering.discard(answering.request_id)
            if held:
                self._after_flush.extend(rows)
            else:
                for row in rows:
                    row.release()
            metrics = self.supervisor.metrics
            metrics.request_ended("binary")
            metrics.request_done(request.model, "binary", code, time.perf_counter() - answering.started)
            if self._paused and len(self.answering) <= PAUSE_AFTER_REQUESTS // 2 and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()

    def _send(self, frame_type: FrameType, request_id: int, envelope: dict | None, parts: Any = ()) -> bool:
        """Queue a frame for this loop iteration's write; True if it went as views that must stay valid."""
        return self._queue(encode_frame(frame_type, request_id, envelope, parts))

    def _queue(self, buffers: list[bytes | memoryview]) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        as_views = sum(len(b) for b in buffers) > JOIN_BELOW_BYTES
        if as_views:
            self._out.extend(buffers)
        else:
            self._out.append(b"".join(buffers))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return as_views

    def _flush(self) -> None:
        """One write for every reply that completed in this loop iteration: replies to pipelined
        requests of a batch share a syscall, which on loopback costs more than the Python around it."""
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0]) if len(out) == 1 else self.transport.writelines(out)
        del out
        rows, self._after_flush = self._after_flush, []
        if self.transport is not None and self.transport.get_write_buffer_size():
            self._after_drain.extend(rows)
        else:
            for row in rows:
                row.release()

    def _refuse(self, request_id: int, request: Request, error: FastInferError, started: float | None = None) -> None:
        """Answer a request with an error, and count it as HTTP counts its refusals."""
        self._send_error(request_id, error)
        if request.model in self.supervisor.model_paths:  # unknown names would grow the metrics without bound
            latency_s = time.perf_counter() - started if started is not None else 0.0
            self.supervisor.metrics.request_done(request.model, "binary", error.code, latency_s)

    def _send_error(self, request_id: int, error: FastInferError) -> None:
        self._send(FrameType.ERROR, request_id, error_envelope(error.code, error.message, error.status))


def _envelope(signature: ModelSignature, request: Request, results: list) -> tuple[dict[str, Any], list]:
    """The RESPONSE envelope and payload parts of a request with several samples, or classes."""
    envelope: dict[str, Any] = {"model": request.model}
    if results[0].classes is not None:
        envelope["classes"] = results[0].classes
    wanted = set(request.outputs) if request.outputs is not None else None
    outputs = {}
    for index, spec in enumerate(signature.outputs):
        if wanted is None or spec.name in wanted:
            if len(results) == 1:
                outputs[spec.name] = results[0].outputs[index][np.newaxis]
            else:
                outputs[spec.name] = np.stack([r.outputs[index] for r in results])
    descriptors, parts = pack_tensors(outputs)
    envelope["outputs"] = descriptors
    return envelope, parts


def _batch_of(signature: ModelSignature, request: Request) -> int:
    """The request's batch size, once its tensors are checked against the model's inputs."""
    return samples_of(signature.inputs, [(t.name, DTYPES[t.dtype], t.shape) for t in request.inputs])


def _copy_into_rows(rows: list[Row], request: Request, payload: memoryview) -> None:
    """Copy each sample of a payload received outside shared memory into its row."""
    if request.image is not None:
        image = request.image
        target = rows[0].payload_view()
        try:
            if image.nbytes > len(target):
                raise PayloadTooLarge(f"the image is {image.nbytes} bytes; a slot holds {len(target)}")
            target[: image.nbytes] = payload[image.offset : image.offset + image.nbytes]
        finally:
            target.release()
        return
    for index, tensor in enumerate(request.inputs):
        sample_bytes = tensor.nbytes // len(rows)
        for number, row in enumerate(rows):
            start = tensor.offset + number * sample_bytes
            target = row.input_view(index)
            target[:] = payload[start : start + sample_bytes]
            target.release()


def _mark_filled(rows: list[Row], request: Request) -> None:
    if request.image is not None:
        rows[0].filled(request.image.nbytes)
        return
    sample_total = sum(t.nbytes for t in request.inputs) // len(rows)
    for row in rows:
        row.filled(sample_total)


class BinaryServer:
    """The TCP listener (and the Unix-socket one, when configured) and their connections."""

    def __init__(self, supervisor: Supervisor, config: Config):
        self.supervisor = supervisor
        self.config = config
        self.connections: set[BinaryProtocol] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self.refused = 0  # connections refused past max_connections
        self._refusal_logged_s = -REFUSAL_LOG_EVERY_S

    def _connect(self) -> asyncio.BufferedProtocol:
        if len(self.connections) >= self.config.max_connections:
            return self._refuse()
        protocol = BinaryProtocol(self.supervisor, self.config, self.connections)
        self.connections.add(protocol)
        return protocol

    def _refuse(self) -> asyncio.BufferedProtocol:
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged_s >= REFUSAL_LOG_EVERY_S:
            self._refusal_logged_s = now
            log.warning(
                "binary port: %d connections open, the limit (max_connections); refusing new ones (%d so far)",
                len(self.connections),
                self.refused,
            )
        return RefusedConnection()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` (a listening socket, e.g. passed by systemd), else on the configured port."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._servers.append(await loop.create_server(self._connect, sock=sock))
        else:
            self._servers.append(await loop.create_server(self._connect, self.config.host, self.config.binary_port))
        if self.config.binary_socket:
            self._servers.append(await loop.create_unix_server(self._connect, self.config.binary_socket))
        self._sweep()

    def _sweep(self) -> None:
        """Apply the time limits to every connection; one timer for all of them, a few times a timeout."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection in list(self.connections):
            connection.check_limits(now)
        shortest = min(self.config.header_timeout_s, self.config.body_timeout_s)
        self._sweeper = loop.call_later(min(1.0, max(0.05, shortest / 4)), self._sweep)

    @property
    def port(self) -> int:
        return cast(asyncio.Server, self._servers[0]).sockets[0].getsockname()[1]

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, give requests in flight ``timeout_s`` to be answered, then close."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + timeout_s
        while any(c.answering for c in self.connections) and loop.time() < deadline_s:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.close()
        for server in self._servers:
            await server.wait_closed()


class RefusedConnection(asyncio.BufferedProtocol):
    """A connection past the limit: one ERROR on id 0, then closed; nothing it sends is read."""

    _SCRATCH = bytearray(4096)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        error = error_envelope("too_many_connections", "the server has too many open connections; retry later", 503)
        transport = cast(asyncio.Transport, transport)
        transport.writelines(encode_frame(FrameType.ERROR, 0, error))
        transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._SCRATCH)

    def buffer_updated(self, nbytes: int) -> None:
        pass
