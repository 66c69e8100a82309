import contextlib
import os

import numpy as np
import pytest

from fastinfer.shm import ALIGNMENT, MEMFD_NAME, SlotMap, SlotPool, SlotsExhausted


def memfd_links() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [link for link in links if MEMFD_NAME in link]


def test_pool_and_map_share_bytes_and_leave_nothing_on_close():
    pool = SlotPool(slot_count=3, slot_bytes=1000)
    pool.create()
    try:
        assert pool.slot_bytes % ALIGNMENT == 0
        mapped = SlotMap(os.dup(pool.fd), pool.slot_count, pool.slot_bytes)  # as a worker inherits it
        mapped.open()
        slot = pool.acquire()
        view = pool.view(slot)
        view[:4] = b"abcd"
        assert bytes(mapped.view(slot)[:4]) == b"abcd"
        assert np.frombuffer(mapped.view(slot), np.uint8).ctypes.data % ALIGNMENT == 0
        view.release()
        pool.release(slot)
        mapped.close()
    finally:
        pool.close()
    assert not memfd_links()


def test_the_pool_has_no_name_to_open():
    """Nothing in /dev/shm: another process cannot map the slots (only a passed descriptor can)."""
    before = set(os.listdir("/dev/shm"))
    pool = SlotPool(slot_count=2, slot_bytes=64)
    pool.create()
    try:
        assert set(os.listdir("/dev/shm")) == before
        assert os.readlink(f"/proc/self/fd/{pool.fd}").startswith(f"/memfd:{MEMFD_NAME}")
        assert not os.get_inheritable(pool.fd)  # a child gets it only when it is passed on purpose
    finally:
        pool.close()


def test_a_map_refuses_memory_smaller_than_its_slots():
    pool = SlotPool(slot_count=2, slot_bytes=64)
    pool.create()
    try:
        with pytest.raises(ValueError, match="smaller"):
            SlotMap(os.dup(pool.fd), slot_count=3, slot_bytes=64).open()
    finally:
        pool.close()


def test_slots_run_out_and_come_back():
    pool = SlotPool(slot_count=2, slot_bytes=64)
    pool.create()
    try:
        a, b = pool.acquire(), pool.acquire()
        assert {a, b} == {0, 1}
        with pytest.raises(SlotsExhausted):
            pool.acquire()
        pool.release(a)
        assert pool.acquire() == a
        with pytest.raises(AssertionError):
            pool.release(2)
    finally:
        pool.close()
    assert not memfd_links()
