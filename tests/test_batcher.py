"""Batching decisions with an injected clock and fake workers: no sleeps, no processes."""

import asyncio
import dataclasses
import math

import numpy as np
import pytest

from fastinfer.config import ModelLimits
from fastinfer.errors import BadRequest, DeadlineExceeded, Overloaded, WorkerDied
from fastinfer.server.batcher import Batcher, WorkerState
from fastinfer.shm import SlotPool
from fastinfer.signature import ModelSignature, TensorSpec

ECHO = ModelSignature("echo", (TensorSpec("x", "float32", (4,)),), (TensorSpec("y", "float32", (4,)),))


class FakeWorker:
    def __init__(self):
        self.state = WorkerState.READY
        self.sent = []  # (message, done)
        self.answered = set()  # indices into sent

    @property
    def in_flight(self):
        return len(self.sent) - len(self.answered)

    def send_batch(self, message, done):
        self.sent.append((message, done))

    def answer(self, index=-1, **reply):
        message, done = self.sent[index]
        self.answered.add(index % len(self.sent))
        done({"op": "done", "errors": [None] * message["rows"], **reply}, None)
        return message

    def fail(self, index, error):
        self.answered.add(index % len(self.sent))
        self.sent[index][1](None, error)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def pool():
    pool = SlotPool(slot_count=8, slot_bytes=4096)
    pool.create()
    yield pool
    pool.close()


def make(pool, workers, clock, **options):
    settings = {"batch_max_size": 4, "batch_max_delay_s": 0.0, "queue_max_size": 16, **options}
    batcher = Batcher(pool, workers, clock=clock, **settings)
    batcher.add_model(ECHO)
    return batcher


def put(row, value):
    view = row.payload_view()
    np.frombuffer(view, np.float32)[:] = value
    view.release()
    row.filled(16)


async def fill(row, value):
    """Fill a row as a request's read does, and let the loop turn (the batcher pumps then)."""
    put(row, value)
    await asyncio.sleep(0)


async def test_an_idle_worker_takes_a_partial_batch_at_once(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    row = batcher.reserve("echo", 10)
    assert worker.sent == [], "a row still filling holds its batch"
    await fill(row, 1.0)
    assert [m["rows"] for m, _ in worker.sent] == [1]


async def test_rows_filled_in_one_loop_iteration_go_in_one_batch(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    for value in (1.0, 2.0, 3.0):  # three pipelined requests, decoded from one read
        put(batcher.reserve("echo", 10), value)
    assert worker.sent == []
    await asyncio.sleep(0)
    assert [m["rows"] for m, _ in worker.sent] == [3]


async def test_a_busy_worker_lets_rows_pile_up_into_the_next_batch(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    await fill(batcher.reserve("echo", 10), 1.0)
    for value in (2.0, 3.0, 4.0):
        await fill(batcher.reserve("echo", 10), value)
    assert [m["rows"] for m, _ in worker.sent] == [1], "partial batches wait while the worker is busy"
    worker.answer(0)
    await asyncio.sleep(0)
    assert [m["rows"] for m, _ in worker.sent] == [1, 3]


async def test_full_batches_go_to_a_busy_worker_up_to_the_pipeline_depth(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, pipeline_depth=2)
    rows = [batcher.reserve("echo", 10) for _ in range(12)]
    for row in rows:
        await fill(row, 0.0)
    assert [m["rows"] for m, _ in worker.sent] == [4, 4], "the third full batch waits for a free place"
    assert batcher.queue_depth("echo") == 4


async def test_a_busy_worker_takes_a_batch_that_fills_the_largest_compiled_size(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    batcher.add_model(ModelSignature("one", ECHO.inputs, ECHO.outputs, batch_sizes=(1,)))
    for _ in range(6):
        await fill(batcher.reserve("one", 10), 0.0)
    assert [m["rows"] for m, _ in worker.sent] == [1, 1], "one row fills a run of batch 1: no need to wait"
    worker.answer(0)
    await asyncio.sleep(0)
    assert [m["rows"] for m, _ in worker.sent] == [1, 1, 4], "meanwhile rows piled up, to run one after another"


async def test_a_batch_holds_at_most_batch_max_runs_runs(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, batch_max_runs=2, pipeline_depth=1)
    batcher.add_model(ModelSignature("one", ECHO.inputs, ECHO.outputs, batch_sizes=(1,)))
    assert batcher.queues["echo"].max_batch == 4, "compiled for any size: one run, up to batch_max_size"
    for _ in range(4):
        await fill(batcher.reserve("one", 10), 0.0)
    worker.answer(0)
    await asyncio.sleep(0)
    assert [m["rows"] for m, _ in worker.sent] == [1, 2]


async def test_requests_that_arrive_together_are_shared_among_free_workers(pool):
    workers, clock = [FakeWorker(), FakeWorker()], Clock()
    batcher = make(pool, workers, clock)
    batcher.add_model(ModelSignature("one", ECHO.inputs, ECHO.outputs, batch_sizes=(1,)))
    for _ in range(6):  # room for four batches: two workers, two in flight each
        put(batcher.reserve("one", 10), 0.0)
    await asyncio.sleep(0)
    assert [[m["rows"] for m, _ in w.sent] for w in workers] == [[1, 1], [1, 3]]


async def test_the_delay_holds_a_partial_batch_for_an_idle_worker(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, batch_max_delay_s=0.010)
    await fill(batcher.reserve("echo", 10), 1.0)
    assert worker.sent == []
    clock.now += 0.009
    batcher.pump()
    assert worker.sent == []
    clock.now += 0.001
    batcher.pump()
    assert [m["rows"] for m, _ in worker.sent] == [1]


async def test_a_full_batch_does_not_wait_for_the_delay(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, batch_max_delay_s=1.0)
    for _ in range(4):
        await fill(batcher.reserve("echo", 10), 0.0)
    assert [m["rows"] for m, _ in worker.sent] == [4]


async def test_results_reach_each_row_and_slots_come_back(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    await fill(batcher.reserve("echo", 10), 0.0)  # occupies the worker
    rows = [batcher.reserve("echo", 10) for _ in range(3)]
    for value, row in enumerate(rows):
        await fill(row, float(value))
    worker.answer(0)
    await asyncio.sleep(0)
    message, _ = worker.sent[1]
    # The worker's job, done by hand: copy inputs to outputs in the slot.
    layout = batcher.queues["echo"].layout
    view = pool.view(message["slot"])
    layout.output_array(view, 0, 3)[:] = layout.input_array(view, 0, 3) * 10
    del view
    worker.answer(1)
    for value, row in enumerate(rows):
        result = await row.result()
        np.testing.assert_array_equal(result.outputs[0], [value * 10.0] * 4)
        del result
        row.release()
    assert pool.free_count == pool.slot_count - 1  # the first batch's row is still held


async def test_a_wrong_size_voids_the_row_and_the_batch_goes_on(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    bad = batcher.reserve("echo", 10)
    good = batcher.reserve("echo", 10)
    with pytest.raises(BadRequest, match="16 bytes; the body has 12"):
        bad.filled(12)
    bad.release()
    await fill(good, 1.0)
    assert [m["rows"] for m, _ in worker.sent] == [2]


async def test_a_batch_of_abandoned_rows_is_dropped_and_frees_its_slot(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    rows = [batcher.reserve("echo", 10) for _ in range(2)]
    for row in rows:
        row.release()
    await asyncio.sleep(0)
    assert worker.sent == []
    assert pool.free_count == pool.slot_count
    assert batcher.queue_depth("echo") == 0


async def test_overload_is_refused_at_once(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, queue_max_size=3)
    for _ in range(3):
        batcher.reserve("echo", 10)
    with pytest.raises(Overloaded):
        batcher.reserve("echo", 10)


async def test_running_out_of_slots_is_overload(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, batch_max_size=1, queue_max_size=100)
    for _ in range(pool.slot_count):
        batcher.reserve("echo", 10)
    with pytest.raises(Overloaded, match="slot"):
        batcher.reserve("echo", 10)


async def test_a_dead_worker_fails_its_batch(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    row = batcher.reserve("echo", 10)
    await fill(row, 1.0)
    worker.fail(0, WorkerDied("gone"))
    with pytest.raises(WorkerDied):
        await row.result()
    row.release()
    assert pool.free_count == pool.slot_count


async def test_the_rows_of_a_failed_batch_each_raise_an_error_of_their_own(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock)
    rows = [batcher.reserve("echo", 10) for _ in range(2)]
    for row in rows:
        put(row, 1.0)
    await asyncio.sleep(0)
    assert worker.sent[0][0]["rows"] == 2  # filled in one loop iteration: one batch
    worker.fail(0, WorkerDied("gone"))
    raised = []
    for row in rows:
        with pytest.raises(WorkerDied, match="gone") as caught:
            await row.result()
        raised.append(caught.value)
        row.release()
    first, second = raised
    assert first is not second  # a shared one would carry both requests' frames in its traceback
    assert (first.code, first.status) == (second.code, second.status) == ("worker_died", 502)
    assert pool.free_count == pool.slot_count


async def test_the_deadline_ends_the_wait(pool):
    worker, clock = FakeWorker(), Clock()
    worker.state = WorkerState.STARTING  # no worker takes anything
    batcher = make(pool, [worker], clock)
    row = batcher.reserve("echo", 0.01)
    await fill(row, 1.0)
    with pytest.raises(DeadlineExceeded):
        await row.result()
    row.release()
    await asyncio.sleep(0)
    assert pool.free_count == pool.slot_count, "the expired row's batch is dropped"


async def test_least_loaded_worker_gets_the_batch(pool):
    busy, idle, clock = FakeWorker(), FakeWorker(), Clock()
    batcher = make(pool, [busy, idle], clock)
    await fill(batcher.reserve("echo", 10), 1.0)
    await fill(batcher.reserve("echo", 10), 2.0)
    assert len(busy.sent) == 1 and len(idle.sent) == 1


class TickingClock(Clock):
    """A clock that moves on at every reading, as a real one may between two readings."""

    def __init__(self, step_s):
        super().__init__()
        self.step_s = step_s

    def __call__(self):
        self.now += self.step_s
        return self.now


async def test_a_partial_batch_is_never_left_without_a_timer_or_a_worker(pool):
    # Reading the clock twice in one decision once left a batch neither due nor timed: it waited
    # until the next request came (found with a 2 ms delay on GPU workers).
    for step in range(1, 25):
        worker, clock = FakeWorker(), TickingClock(step * 0.0001)
        batcher = make(pool, [worker], clock, batch_max_delay_s=0.002)
        row = batcher.reserve("echo", 10)
        await fill(row, 1.0)
        queue = batcher.queues["echo"]
        assert worker.sent or queue.timer is not None
        if worker.sent:
            worker.answer()
            await asyncio.sleep(0)
        else:
            queue.timer.cancel()
        row.release()
        batcher.fail_all(BadRequest("test over"))
        assert pool.free_count == pool.slot_count


async def test_each_batch_is_counted_with_its_size_and_times(pool):
    worker, clock, batches = FakeWorker(), Clock(), []
    batcher = make(pool, [worker], clock, on_batch=lambda *observed: batches.append(observed))
    rows = [batcher.reserve("echo", 10) for _ in range(3)]
    for row in rows:
        row.when_done(lambda done: done.release())  # as a reply written at once does
        put(row, 1.0)
    clock.now += 0.002
    await asyncio.sleep(0)
    clock.now += 0.005
    worker.answer(0)
    assert batches == [("echo", 3, pytest.approx(0.002), pytest.approx(0.005))]


async def test_a_busy_model_does_not_starve_another(pool):
    """A model whose client keeps full batches coming once kept every batch of another model
    waiting: a busy worker took only batches that filled a run, and the other's never did."""
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, pipeline_depth=2)
    batcher.add_model(ModelSignature("fast", ECHO.inputs, ECHO.outputs))
    for _ in range(8):  # two full batches of echo: the worker's pipeline is full
        await fill(batcher.reserve("echo", 10), 0.0)
    await fill(batcher.reserve("fast", 10), 1.0)  # one request of another model, a partial batch
    for _ in range(4):  # and echo's client sends the next full batch already
        await fill(batcher.reserve("echo", 10), 0.0)
    assert [m["model"] for m, _ in worker.sent] == ["echo", "echo"]
    worker.answer(0)
    await asyncio.sleep(0)
    assert [m["model"] for m, _ in worker.sent][2] == "fast", "the other model's turn comes next"
    worker.answer(1)
    await asyncio.sleep(0)
    assert [m["model"] for m, _ in worker.sent][3] == "echo"


async def test_models_take_turns(pool):
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, pipeline_depth=1)
    batcher.add_model(ModelSignature("other", ECHO.inputs, ECHO.outputs))
    for _ in range(3):
        for model in ("echo", "other"):
            for _ in range(4):
                await fill(batcher.reserve(model, 10), 0.0)
    for _ in range(5):
        worker.answer(-1)
        await asyncio.sleep(0)
    assert [m["model"] for m, _ in worker.sent] == ["echo", "other"] * 3


async def test_a_request_that_would_wait_past_its_limit_is_refused_at_once(pool):
    """Admission by waiting time: the queue's drain rate is measured from the worker's batches."""
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker], clock, pipeline_depth=1, queue_max_delay_s=2.5, queue_max_size=1000)
    await fill(batcher.reserve("echo", 60), 0.0)
    clock.now += 1.0  # the worker takes a second per row
    worker.answer(0)
    await asyncio.sleep(0)
    assert batcher.queues["echo"].row_cost_s == pytest.approx(1.0)
    await fill(batcher.reserve("echo", 60), 0.0)  # taken at once: the worker is idle
    rows = [batcher.reserve("echo", 60) for _ in range(3)]  # 3 rows waiting: 3 s of work ahead
    for row in rows:
        await fill(row, 0.0)
    with pytest.raises(Overloaded) as refused:
        batcher.reserve("echo", 60)
    assert refused.value.retry_after_s >= 1 and "would wait" in refused.value.message
    queue = batcher.queues["echo"]
    queue.limits = dataclasses.replace(queue.limits, queue_max_delay_s=math.inf)
    await fill(batcher.reserve("echo", 60), 0.0)  # 3 s ahead, within its deadline of 60 s
    with pytest.raises(Overloaded):  # 4 s ahead, past its deadline of 2 s
        batcher.reserve("echo", 2)


async def test_each_model_batches_and_queues_within_its_own_limits(pool):
    """Per-model limits (as Triton's per-model config): one model's small batches, short queue and
    batching delay leave the server-wide limits of another model as they are."""
    worker, clock = FakeWorker(), Clock()
    batcher = make(pool, [worker, FakeWorker()], clock, queue_max_size=16)
    small = ModelSignature("small", ECHO.inputs, ECHO.outputs)
    batcher.add_model(
        small, ModelLimits(batch_max_size=2, batch_max_delay_s=0.5, queue_max_size=3, queue_max_delay_s=1)
    )
    assert (batcher.queues["small"].max_batch, batcher.queues["echo"].max_batch) == (2, 4)
    rows = [batcher.reserve("small", 10) for _ in range(3)]
    with pytest.raises(Overloaded, match="3 requests are already waiting for small"):
        batcher.reserve("small", 10)
    for _ in range(5):
        batcher.reserve("echo", 10)  # echo's queue is its own, and longer
    await fill(rows[0], 0.0)
    assert worker.sent == [], "small's partial batch waits its own delay for more rows"
    await fill(rows[1], 0.0)
    assert [(m["model"], m["rows"]) for m, _ in worker.sent] == [("small", 2)], "a full batch of two goes at once"
