"""Starts the workers, keeps them running, and routes each request to one of them.

A worker that exits unasked has already failed its in-flight requests (see WorkerHandle); the
supervisor starts it again after a backoff that grows while it keeps dying. A worker whose models
cannot load is not restarted: loading is deterministic, so it would fail the same way again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from fastinfer.config import Config
from fastinfer.errors import ModelLoadError, ModelNotFound, ModelNotReady
from fastinfer.shm import SlotPool
from fastinfer.signature import ModelSignature
from fastinfer.worker.handle import WorkerHandle

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0


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
    """The workers of one server, all serving every configured model."""

    def __init__(self, config: Config):
        self.config = config
        self.model_paths = config.model_paths()
        self.workers: list[WorkerHandle] = []
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def start(self) -> None:
        """Create the slot pools and begin starting the workers (readiness comes later)."""
        init = {
            "models": self.model_paths,
            "cache_dir": self.config.cache_dir,
            "max_image_pixels": self.config.max_image_pixels,
            "log_level": self.config.log_level,
            "slot_count": self.config.shm_slots_per_worker,
        }
        shares = split_cores(sorted(os.sched_getaffinity(0)), self.config.worker_count())
        for index, cores in enumerate(shares):
            pool = SlotPool(self.config.shm_slots_per_worker, self.config.shm_slot_bytes)
            pool.create()
            worker_init = {**init, "shm_name": pool.name, "slot_bytes": pool.slot_bytes}
            handle = WorkerHandle(index, cores, pool, worker_init)
            self.workers.append(handle)
            self._tasks.append(asyncio.create_task(self._keep_running(handle)))

    async def _keep_running(self, handle: WorkerHandle) -> None:
        backoff = BACKOFF_FIRST_S
        while not self._stopping:
            started = time.monotonic()
            try:
                await handle.start(self.config.worker_start_timeout_s)
            except ModelLoadError as error:
                self.failure = error.message
                handle.state = "failed"
                log.error("%s", error.message)
                return
            log.info("worker %d (pid %s, cores %s) is ready", handle.index, handle.pid, handle.cores)
            code = await handle.wait_exit()
            if self._stopping:
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = BACKOFF_FIRST_S
            log.warning("worker %d exited (code %s); restarting in %.1f s", handle.index, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    @property
    def ready(self) -> bool:
        """True once every worker is warm."""
        return bool(self.workers) and all(w.state == "ready" for w in self.workers)

    def signature(self, model: str) -> ModelSignature:
        if model not in self.model_paths:
            raise ModelNotFound(f"no model named {model!r}; served: {', '.join(sorted(self.model_paths))}")
        for worker in self.workers:
            if model in worker.signatures:
                return worker.signatures[model]
        raise ModelNotReady(f"model {model!r} is still loading" if not self.failure else self.failure)

    def pick(self, model: str) -> WorkerHandle:
        """The ready worker with the fewest requests in flight."""
        self.signature(model)
        ready = [w for w in self.workers if w.state == "ready"]
        if not ready:
            raise ModelNotReady(f"no worker of model {model!r} is running; one is restarting")
        return min(ready, key=lambda w: w.in_flight)

    async def stop(self, timeout_s: float) -> None:
        """Stop every worker (killing those that overrun ``timeout_s``) and remove the shared memory."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop(timeout_s) for w in self.workers), return_exceptions=True)
        for worker in self.workers:
            worker.pool.close()
