"""Slots of shared memory that carry request and reply bytes between the front and a worker.

The front creates one pool and hands out slots (fixed-size, 64-byte aligned regions) to requests;
the workers map the same memory. Only slot numbers and byte counts cross the control channel.

The pool has no name: it is an anonymous memory file (``memfd_create``), whose descriptor the
workers inherit when they are spawned. So no other process can open it (there is nothing in
/dev/shm to open), and nothing is left behind by any death, ``kill -9`` of every process
included: the memory goes when the last descriptor and mapping of it go.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os

ALIGNMENT = 64
MEMFD_NAME = "fastinfer-slots"  # shown in /proc/PID/fd and maps only; nothing can open it by name


def round_up(size: int, alignment: int = ALIGNMENT) -> int:
    return (size + alignment - 1) // alignment * alignment


class SlotsExhausted(Exception):
    """Every slot of the pool is in use."""


class SlotPool:
    """Anonymous shared memory cut into ``slot_count`` slots of ``slot_bytes`` (front side)."""

    def __init__(self, slot_count: int, slot_bytes: int):
        self.slot_count = slot_count
        self.slot_bytes = round_up(slot_bytes)
        self._fd = -1
        self._mmap: mmap.mmap | None = None
        self._buf: memoryview | None = None
        self._free: list[int] = []

    def create(self) -> None:
        size = self.slot_count * self.slot_bytes
        # Close-on-exec: a worker gets the descriptor only when it is passed to it by name (pass_fds).
        self._fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._mmap = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self._buf = memoryview(self._mmap)
        self._free = list(range(self.slot_count - 1, -1, -1))

    @property
    def fd(self) -> int:
        """The descriptor a worker maps the pool with (passed to it at spawn)."""
        assert self._fd >= 0, "create() first"
        return self._fd

    @property
    def free_count(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise SlotsExhausted
        return self._free.pop()

    def release(self, slot: int) -> None:
        assert 0 <= slot < self.slot_count and slot not in self._free, f"slot {slot} released twice"
        self._free.append(slot)

    def view(self, slot: int) -> memoryview:
        assert self._buf is not None, "create() first"
        start = slot * self.slot_bytes
        return self._buf[start : start + self.slot_bytes]

    def close(self) -> None:
        """Unmap the pool and close its descriptor. Views handed out must be released first."""
        if self._fd < 0:
            return
        _unmap(self._buf, self._mmap)
        self._buf = self._mmap = None
        os.close(self._fd)
        self._fd = -1


class SlotMap:
    """A worker's mapping of a pool, from the descriptor it inherited."""

    def __init__(self, fd: int, slot_count: int, slot_bytes: int):
        self.fd = fd
        self.slot_count = slot_count
        self.slot_bytes = slot_bytes
        self._mmap: mmap.mmap | None = None
        self._buf: memoryview | None = None

    def open(self) -> None:
        size = self.slot_count * self.slot_bytes
        try:
            if os.fstat(self.fd).st_size < size:
                raise ValueError(f"the slot memory is smaller than {self.slot_count} slots of {self.slot_bytes} bytes")
            self._mmap = mmap.mmap(self.fd, size)
        finally:
            os.close(self.fd)  # the mapping keeps the memory (and a descriptor of its own)
        self._buf = memoryview(self._mmap)

    def view(self, slot: int) -> memoryview:
        if self._buf is None or not 0 <= slot < self.slot_count:
            raise IndexError(f"no slot {slot}")
        start = slot * self.slot_bytes
        return self._buf[start : start + self.slot_bytes]

    def close(self) -> None:
        _unmap(self._buf, self._mmap)
        self._buf = self._mmap = None


def _unmap(buf: memoryview | None, mapping: mmap.mmap | None) -> None:
    if buf is not None:
        with contextlib.suppress(BufferError):  # exported to a live object: goes with it
            buf.release()
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:
        gc.collect()  # views caught in reference cycles
        with contextlib.suppress(BufferError):  # still alive: unmapped when the last view goes
            mapping.close()
