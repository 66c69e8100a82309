"""Dynamic batching: requests join batches laid out in shared memory; free workers take them.

Rules (after Triton's dynamic batcher, with one addition for latency):
- A request reserves a row of its model's *open* batch as soon as its header is parsed, and its
  payload is received straight into that row (tensor models) or into an image slot of its own
  (image models, decoded by the worker into the row). A row is FILLING until its payload is in
  (READY), or until it is given up (VOID: a padding row whose result nobody reads).
- A batch *fills a run* when it is full, or, for a model compiled for fixed batch sizes, when it
  holds as many rows as the largest size: more rows would not run faster (they run as several
  runs of the compiled code, which spares messages and wake-ups, not compute). Such a batch holds
  at most ``batch_max_runs`` runs: its requests are answered together, after the last run.
- The open batch closes when it is full or when a worker takes it; also when it fills a run while
  the workers have room for more batches than are waiting, so that requests arriving together
  are shared among free workers rather than run one after another by one of them.
- A worker takes a batch whose rows are all READY or VOID when the batch fills a run, or when the
  worker has nothing in flight and the batch has waited ``max_delay_s`` since its first row
  (0: at once — a worker with nothing to do takes what is waiting; while it is busy, rows pile up
  into the next batch). "At once" is once the loop has handled the reads at hand, so requests
  that arrive together (pipelined on a connection, or on several) go in one batch. A busy
  worker takes batches that fill a run, up to ``pipeline_depth`` in flight, so it never waits
  for the front between batches.
- Models take turns (round robin): a worker that may take a batch takes the next model's in turn
  that has one ready. A busy worker, which takes only batches that fill a run, also takes a
  partial batch that is due when other models keep it busy with full ones: so a model with work
  waiting gets a worker within one batch of each other model, whatever they send.
- Each model has its own limits (``ModelLimits``: the server-wide batch and queue settings, except
  those the model sets itself), as Triton's per-model config.
- Past ``queue_max_size`` rows waiting, or with no free slot, a request is refused at once; so is
  one that, at the rate its model's queue drains (measured), would wait longer than
  ``queue_max_delay_s`` or its own deadline before its batch could start: ``Overloaded`` with the
  seconds after which a retry could be admitted.
- A batch's slots return to the pool once the worker has answered (or died) and every request of
  the batch has released its row: replies are written from views of the slot.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Protocol

import numpy as np

from fastinfer.config import ModelLimits
from fastinfer.errors import BadRequest, DeadlineExceeded, FastInferError, Overloaded
from fastinfer.shm import SlotPool, SlotsExhausted
from fastinfer.signature import BatchLayout, ModelSignature


class RowState(Enum):
    """A row's payload: on its way (FILLING), in (READY), or given up (VOID)."""

    FILLING = "filling"
    READY = "ready"
    VOID = "void"


class BatchState(Enum):
    """A batch: taking rows (OPEN), closed to more (SEALED), with its worker (SENT), answered (DONE)."""

    OPEN = "open"
    SEALED = "sealed"
    SENT = "sent"
    DONE = "done"


class WorkerState(StrEnum):
    """A worker handle's life: STOPPED -> STARTING -> READY -> DEAD (-> STARTING ...), or FAILED.

    A ``StrEnum``, as health reports show it: the JSON keeps the plain words.
    """

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    FAILED = "failed"


BatchDone = Callable[[dict[str, Any] | None, FastInferError | None], None]  # (reply, None) or (None, error)


class Worker(Protocol):
    @property
    def state(self) -> WorkerState: ...

    @property
    def in_flight(self) -> int: ...

    def send_batch(self, message: dict[str, Any], done: BatchDone) -> None: ...


@dataclass
class RowResult:
    """One request's outputs: views of its batch's slot, valid until the row is released."""

    outputs: list[np.ndarray]
    classes: list[dict] | None


class Row:
    """One request's place in a batch. Its outcome (a RowResult or an error) is told at once to a
    listener (``when_done``), or awaited (``result``): no future per row unless someone awaits."""

    def __init__(self, batch: Batch, index: int, deadline_s: float, image_slot: int | None):
        self.batch = batch
        self.index = index
        self.deadline_s = deadline_s
        self.image_slot = image_slot
        self.state = RowState.FILLING
        self.nbytes = 0
        self.released = False
        self.outcome: RowResult | FastInferError | None = None
        self._listener: Callable[[Row], None] | None = None
        self._waiter: asyncio.Future | None = None

    def settle(self, outcome: RowResult | FastInferError) -> None:
        """Set the outcome (the first one counts) and tell whoever waits for it."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self._listener is not None:
            self._listener(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def when_done(self, listener: Callable[[Row], None]) -> None:
        """Call ``listener(row)`` as soon as the outcome is known (now, if it is)."""
        if self.outcome is not None:
            listener(self)
        else:
            self._listener = listener

    async def result(self) -> RowResult:
        """Wait for this request's outputs; DeadlineExceeded once its deadline passes."""
        if self.outcome is None:
            self._waiter = self.batch.queue.batcher.loop.create_future()
            await self._waiter
        if isinstance(self.outcome, FastInferError):
            raise self.outcome
        assert self.outcome is not None
        return self.outcome

    def expire(self) -> None:
        if self.outcome is None:
            self.settle(DeadlineExceeded("the request's deadline passed before its result was ready"))
            self._give_up()

    def payload_view(self) -> memoryview:
        """Where the request's payload goes: its tensor row, or its image slot."""
        batch = self.batch
        if self.image_slot is not None:
            return batch.queue.batcher.pool.view(self.image_slot)
        return batch.queue.layout.input_row(batch.view, 0, self.index)

    def input_view(self, index: int) -> memoryview:
        """The row of input ``index`` (for requests that carry several tensors)."""
        return self.batch.queue.layout.input_row(self.batch.view, index, self.index)

    def filled(self, nbytes: int) -> None:
        """The payload is in; for a tensor model, it must be exactly one sample."""
        queue = self.batch.queue
        if self.image_slot is None and nbytes != queue.sample_bytes:
            self._give_up()
            spec = queue.signature.inputs[0]
            raise BadRequest(
                f"input {spec.name!r} is {spec.dtype} {list(spec.shape)}, {queue.sample_bytes} bytes; "
                f"the body has {nbytes}"
            )
        self.nbytes = nbytes
        if self.state is RowState.FILLING:
            self.state = RowState.READY
            batch = self.batch
            batch.filling -= 1
            if batch.full and batch.complete:
                queue.batcher.pump()  # nothing more can join it: a worker may start now
            else:
                queue.batcher.pump_soon()

    def release(self) -> None:
        """The request is done with its row (answered, failed or abandoned)."""
        if self.released:
            return
        self.released = True
        self._give_up()
        self.batch.row_released()

    def _give_up(self) -> None:
        if self.batch.state in (BatchState.OPEN, BatchState.SEALED) and self.state is not RowState.VOID:
            if self.state is RowState.FILLING:
                self.batch.filling -= 1
            self.state = RowState.VOID
            self.batch.queue.batcher.pump_soon()


class Batch:
    def __init__(self, queue: ModelQueue, batch_id: int, slot: int, opened_s: float):
        self.queue = queue
        self.id = batch_id
        self.slot = slot
        self.view = queue.batcher.pool.view(slot)
        self.opened_s = opened_s
        self.sent_s = 0.0
        self.rows: list[Row] = []
        self.filling = 0  # rows whose payload is still on its way
        self.state = BatchState.OPEN
        self._released = 0
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._timer_at_s = math.inf

    def add_row(self, row: Row) -> None:
        self.rows.append(row)
        self.filling += 1
        if row.deadline_s < self._timer_at_s:
            self._arm_deadline(row.deadline_s)

    def _arm_deadline(self, at_s: float) -> None:
        """One timer per batch, for its earliest deadline (a timer per row costs more than the row)."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        batcher = self.queue.batcher
        self._timer_at_s = at_s
        self._deadline_timer = batcher.loop.call_later(max(0.0, at_s - batcher.now()), self._deadline_passed)

    def _deadline_passed(self) -> None:
        passed_s, self._deadline_timer, self._timer_at_s = self._timer_at_s, None, math.inf
        later = []
        for row in list(self.rows):
            if row.outcome is None and not row.released:
                if row.deadline_s <= passed_s:
                    row.expire()
                else:
                    later.append(row.deadline_s)
        if later and self.state is not BatchState.DONE:
            self._arm_deadline(min(later))

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.queue.max_batch

    @property
    def fills_a_run(self) -> bool:
        return len(self.rows) >= self.queue.run_rows

    @property
    def complete(self) -> bool:
        return self.filling == 0

    def message(self) -> dict[str, Any]:
        images = [
            [row.image_slot, row.nbytes] if row.state is RowState.READY and row.image_slot is not None else None
            for row in self.rows
        ]
        return {"model": self.queue.signature.name, "slot": self.slot, "rows": len(self.rows), "images": images}

    def finish(self, reply: dict | None, error: FastInferError | None) -> None:
        """Settle each live row with its result or error; free the slots once all rows are released."""
        self.state = BatchState.DONE
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        batch_error = error or (FastInferError.from_dict(reply["error"]) if reply and "error" in reply else None)
        outputs_by_row: list[np.ndarray] = []
        if batch_error is None and reply is not None:
            layout, count = self.queue.layout, len(self.rows)
            outputs_by_row = [layout.output_array(self.view, i, count) for i in range(len(layout.output_offsets))]
        outcomes: list[tuple[Row, RowResult | FastInferError]] = []
        for row in self.rows:
            if row.outcome is not None or row.state is RowState.VOID:
                continue
            if batch_error is not None:
                # Each row its own copy: one error raised by several requests would gather all
                # their frames in its one traceback, alive as long as any of them holds it.
                outcomes.append((row, copy.copy(batch_error)))
                continue
            assert reply is not None
            row_error = reply["errors"][row.index] if reply.get("errors") else None
            if row_error:
                outcomes.append((row, FastInferError.from_dict(row_error)))
                continue
            classes = reply["classes"][row.index] if reply.get("classes") else None
            outcomes.append((row, RowResult([output[row.index] for output in outputs_by_row], classes)))
        del outputs_by_row
        for row, outcome in outcomes:  # listeners may release their rows, and so free the batch
            row.settle(outcome)
        self._free_if_done()

    def row_released(self) -> None:
        self._released += 1
        self._free_if_done()

    def _free_if_done(self) -> None:
        if self.state is not BatchState.DONE or self._released < len(self.rows) or self.view is None:
            return
        self.view.release()
        self.view = None  # type: ignore[assignment]
        pool = self.queue.batcher.pool
        pool.release(self.slot)
        for row in self.rows:
            if row.image_slot is not None:
                pool.release(row.image_slot)
        self.rows = []  # rows point at their batch: break the cycle so their views go with them


class ModelQueue:
    """The batches of one model that no worker has taken yet."""

    def __init__(
        self, batcher: Batcher, signature: ModelSignature, limits: ModelLimits, layout: BatchLayout, max_batch: int
    ):
        self.batcher = batcher
        self.signature = signature
        self.limits = limits
        self.layout = layout
        self.max_batch = max_batch
        sizes = signature.batch_sizes
        self.run_rows = min(max_batch, max(sizes)) if sizes else max_batch  # rows that fill a run
        self.sample_bytes = sum(spec.nbytes for spec in signature.inputs)
        self.batches: list[Batch] = []  # oldest first; only the last may be open
        self.waiting_rows = 0
        self.timer: asyncio.TimerHandle | None = None
        self.row_cost_s = 0.0  # a worker's seconds per row of this model, measured (0: not yet)

    @property
    def open_batch(self) -> Batch | None:
        if self.batches and self.batches[-1].state is BatchState.OPEN:
            return self.batches[-1]
        return None


class Batcher:
    """Per-model queues of batches in one slot pool, drained by the workers."""

    def __init__(
        self,
        pool: SlotPool,
        workers: Sequence[Worker],
        *,
        batch_max_size: int,
        batch_max_delay_s: float,
        queue_max_size: int,
        batch_max_runs: int | None = None,
        queue_max_delay_s: float = math.inf,
        pipeline_depth: int = 2,
        clock: Callable[[], float] | None = None,
        on_batch: Callable[[str, int, float, float], None] | None = None,
    ):
        self.pool = pool
        self.workers = workers
        self.batch_max_size = batch_max_size
        self.batch_max_delay_s = batch_max_delay_s
        self.queue_max_size = queue_max_size
        self.batch_max_runs = batch_max_runs
        self.queue_max_delay_s = queue_max_delay_s
        self.pipeline_depth = pipeline_depth
        self._clock = clock
        self._on_batch = on_batch
        self.queues: dict[str, ModelQueue] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._turn = 0  # the index of the model whose batch goes first next time (round robin)
        self._busy_until: dict[int, float] = {}  # by id() of a worker: when its last batch ended

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:  # looked up once: get_running_loop() costs a getpid() syscall
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self._clock() if self._clock else self.loop.time()

    def add_model(self, signature: ModelSignature, limits: ModelLimits | None = None) -> None:
        """Queue ``signature``'s requests, within ``limits`` (the batcher's own when None)."""
        if signature.name in self.queues:
            return
        if limits is None:
            limits = ModelLimits(
                self.batch_max_size, self.batch_max_delay_s, self.queue_max_size, self.queue_max_delay_s
            )
        layout = BatchLayout.for_slot(signature, limits.batch_max_size, self.pool.slot_bytes)
        max_batch = min(limits.batch_max_size, layout.max_batch)
        if signature.batch_sizes and self.batch_max_runs:
            max_batch = min(max_batch, self.batch_max_runs * max(signature.batch_sizes))
        self.queues[signature.name] = ModelQueue(self, signature, limits, layout, max_batch)

    def queue_depth(self, model: str) -> int:
        return self.queues[model].waiting_rows

    def reserve(self, model: str, timeout_s: float) -> Row:
        """A row in ``model``'s open batch (opening one if needed), due within ``timeout_s``;
        raise Overloaded if the queue or the shared memory is full."""
        queue = self.queues[model]
        if queue.waiting_rows >= queue.limits.queue_max_size:
            raise Overloaded(f"{queue.waiting_rows} requests are already waiting for {model}; retry later")
        wait_s = self.expected_wait_s(queue)
        limit_s = min(queue.limits.queue_max_delay_s, timeout_s)
        if wait_s > limit_s:
            raise Overloaded(
                f"a request for {model} would wait about {wait_s:.1f} s in its queue, past its limit of "
                f"{limit_s:g} s; retry later",
                retry_after_s=wait_s - limit_s,
            )
        batch = queue.open_batch
        if batch is not None and batch.fills_a_run and self._room_for_another_batch():
            batch.state = BatchState.SEALED
            batch = None
        now = self.now()
        image_slot = None
        try:
            if batch is None:
                batch = Batch(queue, next(self._ids), self.pool.acquire(), now)
                queue.batches.append(batch)
            if queue.signature.takes_images:
                image_slot = self.pool.acquire()
        except SlotsExhausted:
            raise Overloaded(
                "the server's shared memory is full of requests (every slot is in use); retry later"
            ) from None
        row = Row(batch, len(batch.rows), now + timeout_s, image_slot)
        batch.add_row(row)
        queue.waiting_rows += 1
        if batch.full:
            batch.state = BatchState.SEALED
        return row

    def expected_wait_s(self, queue: ModelQueue) -> float:
        """How long a new request of the queue's model would wait for its batch to start: the rows
        ahead of it at the measured rate, shared by the ready workers (0 while nothing is measured)."""
        ready = sum(1 for w in self.workers if w.state is WorkerState.READY)
        if not ready or not queue.row_cost_s:
            return 0.0
        return queue.waiting_rows * queue.row_cost_s / ready

    def _room_for_another_batch(self) -> bool:
        room = sum(self.pipeline_depth - w.in_flight for w in self.workers if w.state is WorkerState.READY)
        return room > sum(len(queue.batches) for queue in self.queues.values())

    def _due_s(self, batch: Batch) -> float:
        """When a partial batch has waited long enough for an idle worker."""
        return batch.opened_s + batch.queue.limits.batch_max_delay_s

    def _arm_timer(self, queue: ModelQueue, at_s: float) -> None:
        if queue.timer is not None:
            queue.timer.cancel()
        queue.timer = self.loop.call_later(max(0.0, at_s - self.now()), self._timer_fired, queue)

    def _timer_fired(self, queue: ModelQueue) -> None:
        queue.timer = None
        self.pump()

    def pump_soon(self) -> None:
        """Pump after the callbacks of this loop iteration (the other reads at hand)."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self.loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self.pump()

    def pump(self) -> None:
        """Give batches to every worker that can take one, by the rules at the top of this module."""
        if not any(queue.batches for queue in self.queues.values()):
            return  # nothing waits (as after most answers at low load)
        # One reading of the clock for the whole decision: a batch not yet due gets a timer, and
        # one that is due is taken; read twice, the clock could move between and leave neither.
        now = self.now()
        for queue in self.queues.values():
            self._drop_void(queue)
        for worker in sorted(self.workers, key=lambda w: w.in_flight):
            while worker.state is WorkerState.READY and worker.in_flight < self.pipeline_depth:
                batch = self._take(worker, now)
                if batch is None:
                    break
                self._send(worker, batch)
        for queue in self.queues.values():
            if queue.limits.batch_max_delay_s > 0 and queue.batches and queue.timer is None:
                due_s = self._due_s(queue.batches[0])
                if due_s > now:
                    self._arm_timer(queue, due_s)

    def _take(self, worker: Worker, now: float) -> Batch | None:
        """The batch ``worker`` takes now, by the rules at the top of this module (None: none yet)."""
        queues = list(self.queues.values())
        heads = [(i, q.batches[0]) for i, q in enumerate(queues) if q.batches and q.batches[0].complete]
        idle = worker.in_flight == 0
        others_full = any(batch.fills_a_run for _, batch in heads)
        ready = [
            (i, batch)
            for i, batch in heads
            if batch.fills_a_run or (now >= self._due_s(batch) and (idle or others_full))
        ]
        if not ready:
            return None
        # Round robin: the first model at or after this turn's, then the turn passes it.
        index, batch = min(ready, key=lambda entry: (entry[0] - self._turn) % len(queues))
        self._turn = (index + 1) % len(queues)
        batch.queue.batches.pop(0)
        return batch

    def _drop_void(self, queue: ModelQueue) -> None:
        while (
            queue.batches and queue.batches[0].complete and all(r.state is RowState.VOID for r in queue.batches[0].rows)
        ):
            batch = queue.batches.pop(0)
            queue.waiting_rows -= len(batch.rows)
            batch.finish(None, None)

    def _send(self, worker: Worker, batch: Batch) -> None:
        queue = batch.queue
        queue.waiting_rows -= len(batch.rows)
        batch.state = BatchState.SENT
        batch.sent_s = self.now()
        try:
            worker.send_batch(batch.message(), functools.partial(self._finished, worker, batch))
        except FastInferError as error:
            batch.finish(None, error)

    def _finished(
        self, worker: Worker, batch: Batch, reply: dict[str, Any] | None, error: FastInferError | None
    ) -> None:
        now = self.now()
        # The worker ran this batch from when it was sent or when its previous one ended (batches
        # wait in its pipeline), to now: the drain rate that admission by waiting time uses.
        started_s = max(batch.sent_s, self._busy_until.get(id(worker), 0.0))
        self._busy_until[id(worker)] = now
        if error is None and batch.rows:
            cost = (now - started_s) / len(batch.rows)
            queue = batch.queue
            queue.row_cost_s = cost if not queue.row_cost_s else 0.8 * queue.row_cost_s + 0.2 * cost
        if self._on_batch is not None:  # before finish(): once its rows are released, a batch forgets them
            queue_s, compute_s = batch.sent_s - batch.opened_s, now - batch.sent_s
            self._on_batch(batch.queue.signature.name, len(batch.rows), queue_s, compute_s)
        batch.finish(reply, error)
        self.pump()

    def fail_all(self, error: FastInferError) -> None:
        """Fail every batch no worker has taken (at shutdown, or when no worker is left)."""
        for queue in self.queues.values():
            for batch in queue.batches:
                batch.finish(None, error)
            queue.batches.clear()
            queue.waiting_rows = 0
