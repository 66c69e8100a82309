"""Starts the workers, keeps them running and healthy, and feeds them batches.

A worker that exits unasked has already failed its in-flight batches (see WorkerHandle); the
supervisor starts it again after a backoff that grows while it keeps dying, and gives up after
``restart_max_count`` starts within ``restart_window_s`` (a crash loop). A worker whose models
cannot load is not restarted: loading is deterministic. A worker that stops beating its heartbeat,
or holds a batch past ``batch_timeout_s``, is hung: it is killed, and so restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from fastinfer.batcher import Batcher
from fastinfer.config import Config
from fastinfer.errors import FastInferError, ModelLoadError, ModelNotFound, ModelNotReady
from fastinfer.metrics import Metrics
from fastinfer.shm import SlotPool
from fastinfer.signature import ModelSignature
from fastinfer.worker.handle import WorkerHandle

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
MISSED_BEATS = 5


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


class Supervisor:
    """The workers of one server, all serving every configured model from one slot pool."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.model_paths = config.model_paths()
        self.workers: list[WorkerHandle] = []
        self.pool = SlotPool(config.shm_slots_per_worker * config.worker_count(), config.shm_slot_bytes)
        self.batcher = Batcher(
            self.pool,
            self.workers,
            batch_max_size=config.batch_max_size,
            batch_max_delay_s=config.batch_max_delay_s,
            queue_max_size=config.queue_max_size,
            on_batch=self.metrics.batch_done,
        )
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def start(self) -> None:
        """Create the slot pool and begin starting the workers (readiness comes later)."""
        self.pool.create()
        init = {
            "models": self.model_paths,
            "cache_dir": self.config.cache_dir,
            "max_image_pixels": self.config.max_image_pixels,
            "log_level": self.config.log_level,
            "shm_name": self.pool.name,
            "slot_count": self.pool.slot_count,
            "slot_bytes": self.pool.slot_bytes,
            "batch_limit": self.config.batch_max_size,
            "heartbeat_s": self.config.worker_heartbeat_s,
        }
        shares = split_cores(sorted(os.sched_getaffinity(0)), self.config.worker_count())
        for index, cores in enumerate(shares):
            handle = WorkerHandle(index, cores, init)
            self.workers.append(handle)
            self._tasks.append(asyncio.create_task(self._keep_running(handle)))
        self._tasks.append(asyncio.create_task(self._watch_health()))

    async def _keep_running(self, handle: WorkerHandle) -> None:
        backoff = BACKOFF_FIRST_S
        starts: list[float] = []
        while not self._stopping:
            now = time.monotonic()
            starts = [t for t in starts if now - t < self.config.restart_window_s] + [now]
            if len(starts) > self.config.restart_max_count:
                self._give_up(
                    handle,
                    f"worker {handle.index} died {len(starts) - 1} times within "
                    f"{self.config.restart_window_s:.0f} s; not restarting it",
                )
                return
            try:
                await handle.start(self.config.worker_start_timeout_s)
            except ModelLoadError as error:
                self._give_up(handle, error.message)
                return
            log.info("worker %d (pid %s, cores %s) is ready", handle.index, handle.pid, handle.cores)
            for signature in handle.signatures.values():
                self.batcher.add_model(signature)
            self._count_ready()
            self.batcher.pump()
            code = await handle.wait_exit()
            self._count_ready()
            if self._stopping:
                return
            self.metrics.worker_restarts.labels(str(handle.index)).inc()
            log.warning("worker %d exited (code %s); restarting in %.1f s", handle.index, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _give_up(self, handle: WorkerHandle, reason: str) -> None:
        handle.state = "failed"
        self.failure = reason
        log.error("%s", reason)
        if not any(w.state in ("ready", "starting") for w in self.workers):
            self.batcher.fail_all(ModelNotReady(reason))

    def _count_ready(self) -> None:
        self.metrics.workers_ready.set(sum(w.state == "ready" for w in self.workers))

    async def _watch_health(self) -> None:
        """Kill workers that stopped beating or hold a batch for too long."""
        beat_s = self.config.worker_heartbeat_s
        while not self._stopping:
            await asyncio.sleep(beat_s)
            now = time.monotonic()
            for worker in self.workers:
                if worker.state != "ready":
                    continue
                oldest = worker.oldest_sent_s
                if now - worker.last_heard_s > MISSED_BEATS * beat_s:
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
        return bool(self.workers) and all(w.state == "ready" for w in self.workers)

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
        if not any(w.state == "ready" for w in self.workers):
            raise ModelNotReady(self.failure or f"no worker of model {model!r} is running; one is restarting")
        return queue.signature

    async def stop(self, timeout_s: float) -> None:
        """Stop every worker (killing those that overrun ``timeout_s``) and remove the shared memory."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop(timeout_s) for w in self.workers), return_exceptions=True)
        self.batcher.fail_all(FastInferError("the server is shutting down", code="shutting_down", status=503))
        self.pool.close()
