"""Slots of shared memory that carry request and reply bytes between the front and a worker.

The front creates one segment per worker and hands out slots (fixed-size, 64-byte aligned
regions) to requests; the worker maps the same segment by name. Only slot numbers and byte counts
cross the control channel. The front owns the segment: it unlinks it on close, and Python's
resource tracker unlinks it should the front die without closing.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
from multiprocessing import shared_memory

ALIGNMENT = 64


def round_up(size: int, alignment: int = ALIGNMENT) -> int:
    return (size + alignment - 1) // alignment * alignment


class SlotsExhausted(Exception):
    """Every slot of the pool is in use."""


class SlotPool:
    """A shared-memory segment cut into ``slot_count`` slots of ``slot_bytes`` (front side)."""

    def __init__(self, slot_count: int, slot_bytes: int, name_prefix: str = "fastinfer"):
        self.slot_count = slot_count
        self.slot_bytes = round_up(slot_bytes)
        self._name_prefix = name_prefix
        self._shm: shared_memory.SharedMemory | None = None
        self._free: list[int] = []

    def create(self) -> None:
        name = f"{self._name_prefix}-{os.getpid()}-{os.urandom(4).hex()}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=self.slot_count * self.slot_bytes)
        self._free = list(range(self.slot_count - 1, -1, -1))

    @property
    def name(self) -> str:
        assert self._shm is not None, "create() first"
        return self._shm.name

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
        assert self._shm is not None, "create() first"
        start = slot * self.slot_bytes
        return self._shm.buf[start : start + self.slot_bytes]  # type: ignore[index]

    def close(self) -> None:
        """Unmap and unlink the segment. Views handed out must be released first."""
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:
            gc.collect()  # views caught in reference cycles
            with contextlib.suppress(BufferError):  # still alive: unmapped when the last view goes
                shm.close()
        shm.unlink()


class SlotMap:
    """The worker's mapping of a pool's segment, by name; never unlinks it."""

    def __init__(self, name: str, slot_count: int, slot_bytes: int):
        self.name = name
        self.slot_count = slot_count
        self.slot_bytes = slot_bytes
        self._mmap: mmap.mmap | None = None
        self._buf: memoryview | None = None

    def open(self) -> None:
        # Mapped by hand rather than through SharedMemory, whose resource tracker would unlink
        # the segment when this process exits.
        fd = os.open(f"/dev/shm/{self.name}", os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, self.slot_count * self.slot_bytes)
        finally:
            os.close(fd)
        self._buf = memoryview(self._mmap)

    def view(self, slot: int) -> memoryview:
        if self._buf is None or not 0 <= slot < self.slot_count:
            raise IndexError(f"no slot {slot}")
        start = slot * self.slot_bytes
        return self._buf[start : start + self.slot_bytes]
