"""The front's handle on one worker process: spawn it, wait until warm, send it batches, and
fail those batches at once if it dies.

The worker answers batches in the order sent, and beats a heartbeat between them; ``last_heard_s``
tells the supervisor whether it is still alive. Replies are handled in the channel's
``data_received`` callback, with no task per message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from typing import Any

from fastinfer.errors import FastInferError, ModelLoadError, WorkerDied
from fastinfer.server.batcher import BatchDone, WorkerState
from fastinfer.signature import ModelSignature
from fastinfer.worker.channel import ChannelProtocol, Op

log = logging.getLogger(__name__)


class WorkerHandle:
    """One worker process, from the front's side."""

    def __init__(self, index: int, cores: list[int], init: dict[str, Any], slot_fd: int):
        self.index = index
        self.cores = cores
        self._init = init
        self._slot_fd = slot_fd  # the slot pool's memory, inherited by the process
        self.state = WorkerState.STOPPED
        self.signatures: dict[str, ModelSignature] = {}
        self.pid: int | None = None
        self.last_heard_s = 0.0
        self._process: asyncio.subprocess.Process | None = None
        self._channel: ChannelProtocol | None = None
        self._first_message: asyncio.Future | None = None
        self._lost: asyncio.Future | None = None
        self._pending: dict[int, tuple[BatchDone, float]] = {}  # by batch id: who to tell, when sent
        self._next_id = 0

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._pending)

    @property
    def oldest_sent_s(self) -> float | None:
        return min((sent for _, sent in self._pending.values()), default=None)

    async def start(self, timeout_s: float) -> None:
        """Spawn the process and return once it is warm; raise ModelLoadError if it cannot load."""
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        try:
            fds = (child.fileno(), self._slot_fd)
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fastinfer.worker", *map(str, fds), pass_fds=fds
            )
        finally:
            child.close()
        self.pid = self._process.pid
        self.state = WorkerState.STARTING
        self._first_message = loop.create_future()
        self._lost = loop.create_future()
        _, self._channel = await loop.create_unix_connection(
            lambda: ChannelProtocol(self._on_message, self._on_lost), sock=parent
        )
        self._channel.send({**self._init, "op": Op.INIT, "index": self.index, "cores": self.cores})
        try:
            message = await asyncio.wait_for(asyncio.shield(self._first_message), timeout_s)
        except TimeoutError:
            self.kill()
            raise ModelLoadError(f"worker {self.index} was not warm within {timeout_s:.0f} s") from None
        if message is None or message["op"] != Op.READY:
            self.kill()
            reason = message["message"] if message else "it exited while loading"
            raise ModelLoadError(f"worker {self.index} could not load its models: {reason}")
        self.signatures = {name: ModelSignature.from_dict(sig) for name, sig in message["models"].items()}
        self.last_heard_s = time.monotonic()
        self.state = WorkerState.READY

    def _on_message(self, message: dict[str, Any]) -> None:
        self.last_heard_s = time.monotonic()
        if self._first_message is not None and not self._first_message.done():
            self._first_message.set_result(message)
        elif message["op"] == Op.DONE:
            done, _ = self._pending.pop(message["id"], (None, 0.0))
            if done is not None:
                _tell(done, message, None)

    def _on_lost(self) -> None:
        if self.state is not WorkerState.FAILED:  # the supervisor gave up on it: it stays so, process gone or not
            self.state = WorkerState.DEAD
        if self._first_message is not None and not self._first_message.done():
            self._first_message.set_result(None)
        died = WorkerDied(f"worker {self.index} died while running the request")
        pending, self._pending = self._pending, {}
        for done, _ in pending.values():
            _tell(done, None, died)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def send_batch(self, message: dict[str, Any], done: BatchDone) -> None:
        """Send a batch; ``done`` is called with the worker's ``done`` reply, or with WorkerDied,
        straight from the channel's callbacks (no future, no extra turn of the loop)."""
        if self.state is not WorkerState.READY or self._channel is None:
            raise WorkerDied(f"worker {self.index} is not running")
        self._next_id += 1
        self._pending[self._next_id] = (done, time.monotonic())
        self._channel.send({**message, "op": Op.RUN, "id": self._next_id})

    async def _closed(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._lost is not None:
            await self._lost

    async def wait_exit(self) -> int | None:
        """Wait for the process to exit; every batch it held has failed by the time this returns."""
        if self._process is None:
            return None
        code = await self._process.wait()
        await self._closed()
        if self.state is not WorkerState.FAILED:
            self.state = WorkerState.DEAD
        return code

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit after the batches it holds; kill it if it overruns ``timeout_s``."""
        if self._process is None:
            return
        if self._channel is not None:
            self._channel.send({"op": Op.STOP})
        try:
            await asyncio.wait_for(self._process.wait(), timeout_s)
        except TimeoutError:
            self.kill()
            await self._process.wait()
        await self._closed()
        self.state = WorkerState.STOPPED


def _tell(done: BatchDone, reply: dict[str, Any] | None, error: FastInferError | None) -> None:
    """Hand a batch's outcome on; a failure there is logged, and the worker's channel stays open."""
    try:
        done(reply, error)
    except Exception:
        log.exception("answering a batch failed")
