"""The sans-IO codec: bytes in, events out (FrameDecoder); frames in, buffers out (encode_frame).

The decoder follows asyncio.BufferedProtocol: ``get_buffer()`` says where the next bytes must be
written, ``buffer_updated(n)`` says how many were, and returns the events they completed. A
frame's payload goes straight into memory the caller chose (a shared-memory slot), so the
kernel writes tensor bytes once; headers and envelopes go through a small buffer of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fastinfer.protocol.frames import (
    ALIGNMENT,
    DTYPES,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_ENVELOPE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_REQUEST_ID,
    SUPPORTED_VERSIONS,
    FrameError,
    FrameType,
    Message,
    ProtocolUsageError,
    StreamError,
    TensorDescriptor,
    aligned,
    parse_envelope,
)

# collections.abc.Buffer needs Python 3.12; a numpy array goes in as ``array.data``.
Buffer = bytes | bytearray | memoryview

READ_BUFFER_BYTES = 256 * 1024
# A payload tail shorter than this is read through the decoder's own buffer, so that one
# receive can bring it and the frames behind it; a longer one goes straight to its target.
DIRECT_READ_MIN_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class FrameHead:
    """A frame's header and envelope are in. If ``payload_length`` > 0 the decoder waits for
    set_payload_buffer() or discard_payload() (or allocates itself at the next get_buffer())."""

    frame_type: FrameType
    request_id: int
    flags: int
    envelope: dict[str, Any]
    message: Message
    payload_length: int


@dataclass(frozen=True, slots=True)
class PayloadComplete:
    """A frame is complete. ``payload`` views exactly its bytes; None if they were discarded."""

    head: FrameHead
    payload: memoryview | None

    @property
    def request_id(self) -> int:
        return self.head.request_id


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """A frame broke the specification but the stream is sound: the decoder skips its payload;
    a server answers ``error`` (code, message, status) with an ERROR frame for ``request_id``."""

    frame_type: int
    request_id: int
    error: FrameError


Event = FrameHead | PayloadComplete | FrameRejected


class _State(enum.Enum):
    HEADER = "header"
    ENVELOPE = "envelope"
    DECIDE = "decide"  # a FrameHead is out; its payload has no destination yet
    PAYLOAD = "payload"
    DISCARD = "discard"
    FAILED = "failed"


class FrameDecoder:
    """Turns a received byte stream into FrameHead / PayloadComplete / FrameRejected events.

    Rules of the state machine:
    - HEADER -> ENVELOPE once 24 header bytes are in. Bad magic, an unsupported version or a
      length over the limits raises StreamError (FAILED): nothing after can be framed. The
      limits are checked before any allocation.
    - ENVELOPE -> (FrameHead) DECIDE, or straight to HEADER with (FrameHead, PayloadComplete)
      when there is no payload. An envelope that is not msgpack, not a map, or breaks the
      specification gives FrameRejected and DISCARD of its payload: the connection goes on.
    - DECIDE -> PAYLOAD on set_payload_buffer() (or the decoder's own bytearray, allocated at
      the next get_buffer() or feed() if the caller did not decide), DISCARD on discard_payload().
    - PAYLOAD / DISCARD -> HEADER once payload_length bytes are in, with PayloadComplete.
    Bytes already received past a frame head are kept until the decision, then processed by
    the call that made it, which returns their events.
    """

    def __init__(
        self,
        *,
        max_envelope_bytes: int = MAX_ENVELOPE_BYTES,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        read_buffer_bytes: int = READ_BUFFER_BYTES,
    ):
        self.max_envelope_bytes = max_envelope_bytes
        self.max_payload_bytes = max_payload_bytes
        self._buffer = bytearray(max(read_buffer_bytes, HEADER_SIZE + max_envelope_bytes))
        self._view = memoryview(self._buffer)
        self._start = 0  # unprocessed bytes are self._buffer[_start:_end]
        self._end = 0
        self._state = _State.HEADER
        self._header: tuple[int, int, int, int, int] | None = None  # type, flags, id, envelope, payload
        self._head: FrameHead | None = None
        self._rejected = False
        self._target: memoryview | None = None
        self._filled = 0
        self._remaining = 0
        self._direct = False  # the last get_buffer() handed out the payload target
        self._pending: list[Event] = []  # events completed inside get_buffer()
        self._error: StreamError | None = None
        # A client sends the same envelope again and again (same model, same shapes): keep what
        # the last few decoded to. Envelopes and messages are never mutated after decoding.
        self._decoded: dict[tuple[int, int, int, bytes], tuple[dict[str, Any], Message]] = {}

    @property
    def undecided(self) -> FrameHead | None:
        """The FrameHead waiting for set_payload_buffer() or discard_payload(), if any.

        It is always the last event of the list that brought it; test ``event is
        decoder.undecided`` rather than the payload length, as an earlier head may have been
        given a buffer of the decoder's own already.
        """
        return self._head if self._state is _State.DECIDE else None

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is held: the peer may close here without truncation."""
        return self._state is _State.HEADER and self._start == self._end and not self._pending

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes must be written; never empty (BufferedProtocol.get_buffer)."""
        if self._state is _State.FAILED:
            return self._view  # the caller is closing; whatever still comes is dropped
        while self._state is _State.DECIDE and (not self._pending or self._end - self._start == len(self._buffer)):
            self._run_deferred(self._allocate)
        self._direct = False
        if self._state is _State.FAILED:
            return self._view
        if self._state is _State.PAYLOAD and self._start == self._end and self._remaining >= DIRECT_READ_MIN_BYTES:
            self._direct = True
            assert self._target is not None
            return self._target[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._end < max(HEADER_SIZE + self._envelope_need(), len(self._buffer) // 4):
            held = self._end - self._start
            self._view[:held] = self._view[self._start : self._end]
            self._start, self._end = 0, held
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written to the last get_buffer(): the events they completed, in order.

        Raises StreamError when the stream is broken beyond repair (its ``events`` holds what
        was completed before); after that the decoder only fails.
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._state is _State.FAILED:
            raise StreamError("the stream failed already; nothing more can be read from it")
        events, self._pending = self._pending, []
        if self._direct:
            self._direct = False
            self._filled += nbytes
            self._remaining -= nbytes
            if not self._remaining:
                events.append(self._payload_done())
        else:
            self._end += nbytes
        return self._process(events)

    def set_payload_buffer(self, buffer: Buffer) -> list[Event]:
        """Receive the pending frame's payload into ``buffer`` (writable, at least payload_length
        bytes; it is used from its start). Returns events from bytes already received."""
        view = memoryview(buffer)
        if view.readonly or not view.c_contiguous:
            raise ProtocolUsageError("a payload buffer must be writable and contiguous")
        view = view.cast("B") if view.nbytes else memoryview(bytearray())
        head = self._expect_decision()
        if view.nbytes < head.payload_length:
            raise ProtocolUsageError(f"the payload is {head.payload_length} bytes; the buffer has {view.nbytes}")
        return self._start_payload(view[: head.payload_length])

    def discard_payload(self) -> list[Event]:
        """Skip the pending frame's payload; its PayloadComplete will carry no bytes."""
        head = self._expect_decision()
        self._state, self._target, self._remaining = _State.DISCARD, None, head.payload_length
        return self._process([])

    def feed(self, data: Buffer) -> list[Event]:
        """Copy ``data`` through get_buffer()/buffer_updated() and return every event it completes.

        No decision is left pending: payloads go into bytearrays of the decoder's own. For tests
        and simple clients; a server uses get_buffer()/buffer_updated() to choose payload buffers.
        """
        source = memoryview(data).cast("B")
        events, self._pending = self._pending, []
        try:
            while source.nbytes:
                while self._state is _State.DECIDE:
                    events += self._allocate()
                target = self.get_buffer()
                count = min(target.nbytes, source.nbytes)
                target[:count] = source[:count]
                source = source[count:]
                events += self.buffer_updated(count)
            while self._state is _State.DECIDE:
                events += self._allocate()
        except StreamError as error:
            error.events[:0] = events
            raise
        return events

    def eof(self) -> None:
        """The peer closed its end; StreamError if that cut a frame short."""
        if self._state is not _State.FAILED and not self.at_frame_boundary:
            state, self._state = self._state, _State.FAILED
            raise StreamError(f"the stream ended inside a frame (while reading its {state.value})")

    def _expect_decision(self) -> FrameHead:
        if self._state is not _State.DECIDE or self._head is None:
            raise ProtocolUsageError("no frame is waiting for a payload decision")
        return self._head

    def _allocate(self) -> list[Event]:
        assert self._head is not None
        return self._start_payload(aligned_buffer(self._head.payload_length))

    def _start_payload(self, target: memoryview) -> list[Event]:
        self._state, self._target, self._filled, self._remaining = _State.PAYLOAD, target, 0, target.nbytes
        return self._process([])

    def _run_deferred(self, step: Any) -> None:
        # In get_buffer() a StreamError cannot be raised (asyncio would drop the connection
        # without letting us answer): keep it for the next buffer_updated().
        try:
            self._pending += step()
        except StreamError as error:
            error.events[:0] = self._pending
            self._pending, self._error = [], error
            self._state = _State.FAILED

    def _envelope_need(self) -> int:
        return self._header[3] if self._state is _State.ENVELOPE and self._header else 0

    def _payload_done(self) -> PayloadComplete:
        assert self._head is not None
        payload = self._target if self._state is _State.PAYLOAD else None
        event = PayloadComplete(self._head, payload)
        self._state, self._head, self._target = _State.HEADER, None, None
        return event

    def _process(self, events: list[Event]) -> list[Event]:
        try:
            while self._step(events):
                pass
        except StreamError as error:
            self._state = _State.FAILED
            error.events[:0] = events
            raise
        return events

    def _step(self, events: list[Event]) -> bool:
        """Advance by one state if the held bytes allow; False when more bytes are needed."""
        held = self._end - self._start
        if self._state is _State.HEADER:
            if held < HEADER_SIZE:
                return False
            self._header = self._parse_header(self._view[self._start : self._start + HEADER_SIZE])
            self._start += HEADER_SIZE
            self._state = _State.ENVELOPE
            return True
        if self._state is _State.ENVELOPE:
            assert self._header is not None
            envelope_length = self._header[3]
            if held < envelope_length:
                return False
            raw = self._view[self._start : self._start + envelope_length]
            self._start += envelope_length
            self._open_frame(raw, events)
            return True
        if self._state in (_State.PAYLOAD, _State.DISCARD):
            count = min(held, self._remaining)
            if self._target is not None and count:
                self._target[self._filled : self._filled + count] = self._view[self._start : self._start + count]
            self._start += count
            self._filled += count
            self._remaining -= count
            if self._remaining:
                return False
            if self._rejected:
                self._rejected = False
                self._state, self._head = _State.HEADER, None
            else:
                events.append(self._payload_done())
            return True
        return False  # DECIDE waits for the caller; FAILED for nothing

    def _parse_header(self, raw: memoryview) -> tuple[int, int, int, int, int]:
        magic, version, frame_type, flags, request_id, envelope_length, payload_length = HEADER.unpack(raw)
        if magic != MAGIC:
            raise StreamError(f"the stream does not start a frame here (magic {bytes(magic)!r}, not {MAGIC!r})")
        if version not in SUPPORTED_VERSIONS:
            raise StreamError(
                f"protocol version {version} is not supported; this peer speaks {list(SUPPORTED_VERSIONS)}",
                code="unsupported_version",
                status=505,
            )
        if envelope_length > self.max_envelope_bytes:
            raise StreamError(
                f"the envelope is {envelope_length} bytes; the limit is {self.max_envelope_bytes}",
                code="payload_too_large",
                status=413,
            )
        if payload_length > self.max_payload_bytes:
            raise StreamError(
                f"the payload is {payload_length} bytes; the limit is {self.max_payload_bytes}",
                code="payload_too_large",
                status=413,
            )
        return frame_type, flags, request_id, envelope_length, payload_length

    def _open_frame(self, raw: memoryview, events: list[Event]) -> None:
        assert self._header is not None
        frame_type, flags, request_id, _, payload_length = self._header
        try:
            if request_id == 0 and frame_type in _ANSWERED_FRAMES:
                raise FrameError("request id 0 is reserved for the connection; number requests from 1")
            key = (frame_type, flags, payload_length, bytes(raw))
            decoded = self._decoded.get(key)
            if decoded is None:
                decoded = _decode_envelope(frame_type, flags, raw, payload_length)
                if len(self._decoded) >= DECODED_ENVELOPES_KEPT:
                    self._decoded.clear()
                self._decoded[key] = decoded
            envelope, message = decoded
        except FrameError as error:
            error.request_id = request_id
            events.append(FrameRejected(frame_type, request_id, error))
            self._rejected = True
            self._state, self._target, self._filled, self._remaining = _State.DISCARD, None, 0, payload_length
            return
        self._head = FrameHead(_FRAME_TYPES[frame_type], request_id, flags, envelope, message, payload_length)
        events.append(self._head)
        if payload_length:
            self._state = _State.DECIDE
        else:
            self._state, self._target = _State.PAYLOAD, memoryview(b"")
            events.append(self._payload_done())


def aligned_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of writable memory starting at an address that is a multiple of ALIGNMENT."""
    block = np.empty(nbytes + ALIGNMENT - 1, np.uint8)
    start = -block.ctypes.data % ALIGNMENT
    return block[start : start + nbytes].data


DECODED_ENVELOPES_KEPT = 64
_FRAME_TYPES = {int(t): t for t in FrameType}
_ANSWERED_FRAMES = frozenset({FrameType.REQUEST, FrameType.HELLO, FrameType.PING})  # their replies echo the id


def _decode_envelope(
    frame_type: int, flags: int, raw: memoryview, payload_length: int
) -> tuple[dict[str, Any], Message]:
    if frame_type not in _FRAME_TYPES:
        raise FrameError(f"unknown frame type {frame_type}")
    if flags:
        raise FrameError(f"flags must be 0 in version 1, not {flags:#x}")
    if not raw.nbytes:
        envelope: Any = {}
    else:
        try:
            envelope = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as error:  # msgpack's error types vary by version and input
            raise FrameError(f"the envelope is not valid msgpack: {error}") from None
    return envelope, parse_envelope(frame_type, envelope, payload_length)


_PADDING = memoryview(bytes(ALIGNMENT))


def encode_frame(
    frame_type: FrameType,
    request_id: int,
    envelope: Mapping[str, Any] | None = None,
    payload_parts: Sequence[Buffer] = (),
    *,
    max_envelope_bytes: int = MAX_ENVELOPE_BYTES,
) -> list[bytes | memoryview]:
    """A frame as buffers for ``socket.sendmsg`` / ``transport.writelines``: header and envelope
    in one bytes object, then ``payload_parts`` as they are (their concatenation is the
    payload; see pack_tensors for aligned tensor layouts). No payload byte is copied."""
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolUsageError(f"request id {request_id} does not fit in 32 bits")
    body = msgpack.packb(dict(envelope or {}), use_bin_type=True)
    if len(body) > max_envelope_bytes:
        raise ProtocolUsageError(f"the envelope is {len(body)} bytes; the limit is {max_envelope_bytes}")
    parts: list[bytes | memoryview] = []
    payload_length = 0
    for part in payload_parts:
        view = memoryview(part)
        if not view.c_contiguous:
            raise ProtocolUsageError("payload parts must be contiguous")
        if view.nbytes:
            parts.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
            payload_length += view.nbytes
    header = HEADER.pack(MAGIC, SUPPORTED_VERSIONS[-1], frame_type, 0, request_id, len(body), payload_length)
    return [header + body, *parts]


def pack_tensors(arrays: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """Wire descriptors and payload parts for named arrays, each at a 64-byte aligned offset.

    Arrays that are C-contiguous and little-endian are sent from their own memory; others are
    copied once into that form.
    """
    descriptors: list[dict[str, Any]] = []
    parts: list[memoryview] = []
    offset = 0
    for name, value in arrays.items():
        array = np.asarray(value)
        dtype = dtype_name(array.dtype)
        array = np.asarray(array, dtype=DTYPES[dtype], order="C")
        start = aligned(offset)
        if start > offset:
            parts.append(_PADDING[: start - offset])
        if array.nbytes:
            parts.append(array.reshape(-1).view(np.uint8).data)
        descriptors.append(TensorDescriptor(name, dtype, array.shape, start, array.nbytes).to_wire())
        offset = start + array.nbytes
    return descriptors, parts


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; ProtocolUsageError if the protocol has none."""
    for name, wire in DTYPES.items():
        if wire.kind == dtype.kind and wire.itemsize == dtype.itemsize:
            return name
    raise ProtocolUsageError(f"dtype {dtype} cannot travel; known: {', '.join(DTYPES)}")


def unpack_tensors(specs: Sequence[TensorDescriptor], payload: Buffer) -> dict[str, np.ndarray]:
    """Arrays viewing ``payload`` (no copy) for validated descriptors; writable if it is."""
    view = memoryview(payload).cast("B")
    arrays = {}
    for spec in specs:
        dtype = DTYPES[spec.dtype]
        flat = np.frombuffer(view, dtype=dtype, count=spec.nbytes // dtype.itemsize, offset=spec.offset)
        arrays[spec.name] = flat.reshape(spec.shape)
    return arrays
