"""Starts the workers, keeps them running and healthy, and feeds them batches.

A worker that exits unasked has already failed its in-flight batches (see WorkerHandle); the
supervisor starts it again after a backoff that grows while it keeps dying, and gives up after
``restart_max_count`` starts within ``restart_window_s`` (a crash loop). A worker whose models
cannot load is not restarted: loading is deterministic. A worker that stops beating its heartbeat,
or holds a batch past ``batch_timeout_s``, is hung: it is killed, and so restarted.

The workers, the slot pool they map and the batcher that feeds them form a *generation*. To
change the models or the worker count (register, unregister, scale, reload), a new generation
starts beside the serving one; once every new worker is warm, new requests go to it, and the old
generation drains (its queued and running batches finish) and stops. No request fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping

from fastinfer.config import Config
from fastinfer.errors import FastInferError, ModelLoadError, ModelNotFound, ModelNotReady
from fastinfer.server.batcher import Batcher, WorkerState
from fastinfer.server.metrics import Metrics
from fastinfer.server.workers import WorkerHandle
from fastinfer.shm import SlotPool, round_up
from fastinfer.signature import ModelSignature

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
MISSED_BEATS = 5


BatcherFactory = Callable[[SlotPool, list[WorkerHandle]], Batcher]


def split_cores(cores: list[int], workers: int) -> list[list[int]]:
    """Give each worker its own share of the cores (round-robin when there are fewer cores)."""
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    size, extra = divmod(len(cores), workers)
    shares, start = [], 0
    for i in range(workers):
        end = start + size + (1 if i < extra else 0)
        shares.append(cores[start:end])
        start = end
    return shares


class Generation:
    """Workers that serve one set of models, the slot pool they map, and the batcher that feeds them."""

    def __init__(self, model_paths: dict[str, str], worker_count: int, pool: SlotPool, batcher_for: BatcherFactory):
        self.model_paths = model_paths
        self.worker_count = worker_count
        self.pool = pool
        self.workers: list[WorkerHandle] = []
        self.batcher = batcher_for(pool, self.workers)
        self.failure: str | None = None
        self.tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        return bool(self.workers) and all(w.state is WorkerState.READY for w in self.workers)

    @property
    def idle(self) -> bool:
        """No batch is waiting, filling or running: the generation can stop without failing a request."""
        return not any(q.batches for q in self.batcher.queues.values()) and not any(w.in_flight for w in self.workers)


class Supervisor:
    """The workers of one server, all serving every model, fed from one slot pool.

    ``model_paths``, ``workers``, ``pool`` and ``batcher`` are those of the serving generation;
    look them up per request (they change when :meth:`replace_workers` switches generations).
    """

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        count = config.worker_count()
        pool = SlotPool(config.shm_slots_per_worker * count, config.shm_slot_bytes)
        self._generation = Generation(config.model_paths(), count, pool, self._new_batcher)
        self._live: list[Generation] = [self._generation]
        self._next_index = 0
        self._replacing = asyncio.Lock()
        self._health_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        self._stopping = False
        # A stop is coming (SIGTERM): readiness probes fail so that load balancers stop sending,
        # while the requests that still come are served.
        self.draining = False

    @property
    def model_paths(self) -> dict[str, str]:
        return self._generation.model_paths

    @property
    def workers(self) -> list[WorkerHandle]:
        return self._generation.workers

    @property
    def pool(self) -> SlotPool:
        return self._generation.pool

    @property
    def batcher(self) -> Batcher:
        return self._generation.batcher

    @property
    def failure(self) -> str | None:
        """Why the serving generation cannot serve (a model failed to load, a crash loop), or None."""
        return self._generation.failure

    def _new_batcher(self, pool: SlotPool, workers: list[WorkerHandle]) -> Batcher:
        max_size, max_delay_s = self.config.batch_limits()  # GPU workers: larger batches, a short wait
        return Batcher(
            pool,
            workers,
            batch_max_size=max_size,
            batch_max_delay_s=max_delay_s,
            batch_max_runs=self.config.batch_max_runs,
            queue_max_size=self.config.queue_max_size,
            queue_max_delay_s=self.config.queue_max_delay_s,
            on_batch=self.metrics.batch_done,
        )

    def start(self) -> None:
        """Create the slot pool and begin starting the workers (readiness comes later)."""
        self.pool.create()
        self._launch(self._generation)
        self._health_task = asyncio.create_task(self._watch_health())
        self._lag_task = asyncio.create_task(self.metrics.sample_loop_lag())

    def _launch(self, generation: Generation) -> None:
        init = {
            "models": generation.model_paths,
            "cache_dir": self.config.cache_dir,
            "max_image_pixels": self.config.max_image_pixels,
            "log_level": self.config.log_level,
            "slot_count": generation.pool.slot_count,
            "slot_bytes": generation.pool.slot_bytes,
            "batch_limit": self.config.batch_limits()[0],
            "model_batch_limits": self.config.model_batch_limits(),
            "heartbeat_s": self.config.worker_heartbeat_s,
        }
        # A GPU worker gets a share of the cores like a CPU worker: its kernels run on the GPU, but it
        # decodes images and copies batches on the CPU, and pinning keeps workers off each other's cores.
        devices = self.config.device_list()
        shares = split_cores(sorted(os.sched_getaffinity(0)), generation.worker_count)
        for number, cores in enumerate(shares):
            device = devices[number % len(devices)]  # scaled past the GPUs named: they are shared round-robin
            handle = WorkerHandle(self._next_index, cores, {**init, "device": device}, generation.pool.fd)
            self._next_index += 1
            generation.workers.append(handle)
            generation.tasks.append(asyncio.create_task(self._keep_running(generation, handle)))

    async def _keep_running(self, generation: Generation, handle: WorkerHandle) -> None:
        backoff = BACKOFF_FIRST_S
        starts: list[float] = []
        while not self._stopping:
            now = time.monotonic()
            starts = [t for t in starts if now - t < self.config.restart_window_s] + [now]
            if len(starts) - 1 > self.config.restart_max_count:  # the first start is not a restart
                self._give_up(
                    generation,
                    handle,
                    f"worker {handle.index} died {len(starts) - 1} times within "
                    f"{self.config.restart_window_s:.0f} s; not restarting it",
                )
                return
            try:
                await handle.start(self.config.worker_start_timeout_s)
            except ModelLoadError as error:
                self._give_up(generation, handle, error.message)
                return
            log.info("worker %d (pid %s, cores %s) is ready", handle.index, handle.pid, handle.cores)
            ready_s = time.monotonic()
            for signature in handle.signatures.values():
                generation.batcher.add_model(signature, self.config.limits_for(signature.name))
            self._count_ready()
            generation.batcher.pump()
            code = await handle.wait_exit()
            self._count_ready()
            if self._stopping:
                return
            self.metrics.worker_restarts.labels(str(handle.index)).inc()
            if time.monotonic() - ready_s > self.config.restart_window_s:
                backoff = BACKOFF_FIRST_S  # it served well for a while: this is no crash loop
            log.warning("worker %d exited (code %s); restarting in %.1f s", handle.index, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _give_up(self, generation: Generation, handle: WorkerHandle, reason: str) -> None:
        handle.state = WorkerState.FAILED
        generation.failure = reason
        log.error("%s", reason)
        if not any(w.state in (WorkerState.READY, WorkerState.STARTING) for w in generation.workers):
            generation.batcher.fail_all(ModelNotReady(reason))

    def _count_ready(self) -> None:
        self.metrics.workers_ready.set(sum(w.state is WorkerState.READY for w in self.workers))

    async def _watch_health(self) -> None:
        """Kill workers that stopped beating or hold a batch for too long."""
        beat_s = self.config.worker_heartbeat_s
        checked_s = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(beat_s)
            now = time.monotonic()
            # A loop that was busy (a long callback) read no heartbeat meanwhile, though they came:
            # judge the workers by their beats again only after the loop has read what is waiting.
            stalled = now - checked_s > 2 * beat_s
            checked_s = now
            for worker in (w for generation in self._live for w in generation.workers):
                if worker.state is not WorkerState.READY:
                    continue
                oldest = worker.oldest_sent_s
                if stalled:
                    worker.last_heard_s = max(worker.last_heard_s, now - beat_s)
                elif now - worker.last_heard_s > MISSED_BEATS * beat_s:
                    log.error("worker %d missed %d heartbeats: killing it", worker.index, MISSED_BEATS)
                    worker.kill()
                elif oldest is not None and now - oldest > self.config.batch_timeout_s:
                    log.error(
                        "worker %d held a batch over %.0f s: killing it", worker.index, self.config.batch_timeout_s
                    )
                    worker.kill()
            for model in self.batcher.queues:
                self.metrics.queue_depth.labels(model).set(self.batcher.queue_depth(model))

    @property
    def ready(self) -> bool:
        """True once every worker is warm."""
        return self._generation.ready

    def health(self) -> dict:
        """What /ping and the management API say about the workers."""
        return {
            "workers": [
                {"index": w.index, "pid": w.pid, "state": w.state, "cores": w.cores, "in_flight": w.in_flight}
                for w in self.workers
            ],
            "failure": self.failure,
        }

    def signature(self, model: str) -> ModelSignature:
        """The model's signature; raise ModelNotFound or ModelNotReady."""
        if model not in self.model_paths:
            raise ModelNotFound(f"no model named {model!r}; served: {', '.join(sorted(self.model_paths))}")
        queue = self.batcher.queues.get(model)
        if queue is None:
            raise ModelNotReady(self.failure or f"model {model!r} is still loading")
        if not any(w.state is WorkerState.READY for w in self.workers):
            raise ModelNotReady(self.failure or f"no worker of model {model!r} is running; one is restarting")
        return queue.signature

    async def replace_workers(
        self,
        model_paths: Mapping[str, str] | None = None,
        worker_count: int | None = None,
        config: Config | None = None,
    ) -> None:
        """Serve ``model_paths`` with ``worker_count`` workers (None: as now), without failing a request.

        New workers start beside the serving ones; once all are warm, new requests go to them and
        the old workers drain (within ``shutdown_timeout_s``) and stop. If a new worker cannot
        start, the new ones stop, the old ones go on serving, and this raises ModelLoadError.
        With ``config`` (a reload), the new workers and their batcher follow it: devices, batching,
        supervision. Calls are serialized.
        """
        async with self._replacing:
            previous = self.config
            self.config = config or previous
            try:
                await self._replace(
                    dict(self.model_paths if model_paths is None else model_paths),
                    self._generation.worker_count if worker_count is None else worker_count,
                )
            except BaseException:
                self.config = previous  # the old workers go on serving, as they were configured
                raise

    async def add_model(self, name: str, path: str) -> None:
        """Start serving ``path`` as ``name`` (see :meth:`replace_workers`); FastInferError 409 if taken."""
        async with self._replacing:
            if name in self.model_paths:
                raise FastInferError(f"a model named {name!r} is already served", code="model_exists", status=409)
            await self._replace({**self.model_paths, name: path}, self._generation.worker_count)

    async def remove_model(self, name: str) -> None:
        """Stop serving ``name`` once its requests in flight are answered; ModelNotFound if unknown."""
        async with self._replacing:
            if name not in self.model_paths:
                raise ModelNotFound(f"no model named {name!r}; served: {', '.join(sorted(self.model_paths))}")
            await self._replace({k: v for k, v in self.model_paths.items() if k != name}, self._generation.worker_count)

    async def _replace(self, model_paths: dict[str, str], worker_count: int) -> None:
        if self._stopping:
            raise FastInferError("the server is shutting down", code="shutting_down", status=503)
        old = self._generation
        slots = self.config.shm_slots_per_worker * worker_count
        pool = old.pool
        if pool.slot_count < slots or pool.slot_bytes != round_up(self.config.shm_slot_bytes):
            pool = SlotPool(slots, self.config.shm_slot_bytes)
            pool.create()
        new = Generation(model_paths, worker_count, pool, self._new_batcher)
        self._live.append(new)
        self._launch(new)
        try:
            await self._wait_warm(new)
        except BaseException:
            await self._retire(new, drain=False)
            raise
        self._generation = new
        self._count_ready()
        log.info("switched to %d workers serving %s", worker_count, ", ".join(sorted(model_paths)) or "no model")
        for model in old.model_paths.keys() - model_paths.keys():
            with contextlib.suppress(KeyError):  # never measured
                self.metrics.queue_depth.remove(model)
        await self._retire(old, drain=True)

    async def _wait_warm(self, generation: Generation) -> None:
        async with asyncio.timeout(self.config.worker_start_timeout_s):
            while not generation.ready:
                if generation.failure:
                    raise ModelLoadError(generation.failure)
                if self._stopping:
                    raise FastInferError("the server is shutting down", code="shutting_down", status=503)
                await asyncio.sleep(0.05)

    async def _retire(self, generation: Generation, *, drain: bool) -> None:
        """Let the generation finish its batches (if ``drain``), stop its workers, free its pool."""
        timeout_s = self.config.shutdown_timeout_s
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + timeout_s
        while drain and not generation.idle and loop.time() < deadline_s and not self._stopping:
            await asyncio.sleep(0.02)
        for task in generation.tasks:
            task.cancel()
        await asyncio.gather(*generation.tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop(timeout_s) for w in generation.workers), return_exceptions=True)
        generation.batcher.fail_all(ModelNotReady("the workers of this request were replaced; retry"))
        if generation in self._live:
            self._live.remove(generation)
        if all(g.pool is not generation.pool for g in self._live):
            pool = generation.pool
            while pool.free_count < pool.slot_count and loop.time() < deadline_s:
                await asyncio.sleep(0.02)  # replies still being written from their slots
            pool.close()

    async def stop(self, timeout_s: float) -> None:
        """Stop every worker (killing those that overrun ``timeout_s``) and remove the shared memory."""
        self._stopping = True
        tasks = [t for g in self._live for t in g.tasks]
        tasks += [task for task in (self._health_task, self._lag_task) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        workers = [w for g in self._live for w in g.workers]
        await asyncio.gather(*(w.stop(timeout_s) for w in workers), return_exceptions=True)
        for generation in self._live:
            generation.batcher.fail_all(FastInferError("the server is shutting down", code="shutting_down", status=503))
        for pool in {id(g.pool): g.pool for g in self._live}.values():
            pool.close()
