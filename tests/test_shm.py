import os

import numpy as np
import pytest

from fastinfer.shm import ALIGNMENT, SlotMap, SlotPool, SlotsExhausted


def test_pool_and_map_share_bytes_and_unlink_on_close():
    pool = SlotPool(slot_count=3, slot_bytes=1000)
    pool.create()
    try:
        assert pool.slot_bytes % ALIGNMENT == 0
        mapped = SlotMap(pool.name, pool.slot_count, pool.slot_bytes)
        mapped.open()
        slot = pool.acquire()
        view = pool.view(slot)
        view[:4] = b"abcd"
        assert bytes(mapped.view(slot)[:4]) == b"abcd"
        assert np.frombuffer(mapped.view(slot), np.uint8).ctypes.data % ALIGNMENT == 0
        view.release()
        pool.release(slot)
    finally:
        pool.close()
    assert not os.path.exists(f"/dev/shm/{pool._shm and pool.name}")


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
        name = pool.name
        pool.close()
    assert not os.path.exists(f"/dev/shm/{name}")
