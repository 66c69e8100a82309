"""The front's handle on one worker process: spawn it, wait until warm, send it requests, and
fail those requests at once if it dies.

A slot stays out of the pool for as long as the worker may write into it: a request that gives
up early (timeout, client gone) leaves its slot to be returned when the worker answers or dies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
from typing import Any

from fastinfer.errors import FastInferError, ModelLoadError, WorkerDied
from fastinfer.shm import SlotPool
from fastinfer.signature import ModelSignature
from fastinfer.worker.channel import HEADER, decode, encode

log = logging.getLogger(__name__)


class RequestTimeout(FastInferError):
    code = "timeout"
    status = 504


class WorkerHandle:
    """One worker process and the slot pool it shares with the front."""

    def __init__(self, index: int, cores: list[int], pool: SlotPool, init: dict[str, Any]):
        self.index = index
        self.cores = cores
        self.pool = pool
        self._init = init
        self.state = "stopped"  # -> starting -> ready -> dead
        self.signatures: dict[str, ModelSignature] = {}
        self.pid: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, tuple[asyncio.Future, int]] = {}
        self._held_by_worker: set[int] = set()
        self._abandoned: set[int] = set()
        self._next_id = 0

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def start(self, timeout_s: float) -> None:
        """Spawn the process and return once it is warm; raise ModelLoadError if it cannot load."""
        parent, child = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fastinfer.worker", str(child.fileno()), pass_fds=(child.fileno(),)
            )
        finally:
            child.close()
        self.pid = self._process.pid
        self.state = "starting"
        self._reader, self._writer = await asyncio.open_connection(sock=parent)
        self._writer.write(encode({**self._init, "index": self.index, "cores": self.cores}))
        try:
            message = await asyncio.wait_for(self._read(), timeout_s)
        except TimeoutError:
            self.kill()
            raise ModelLoadError(f"worker {self.index} was not warm within {timeout_s:.0f} s") from None
        if message is None or message["op"] != "ready":
            self.kill()
            reason = message["message"] if message else "it exited while loading"
            raise ModelLoadError(f"worker {self.index} could not load its models: {reason}")
        self.signatures = {name: ModelSignature.from_dict(sig) for name, sig in message["models"].items()}
        self.state = "ready"
        self._reader_task = asyncio.create_task(self._read_replies())

    async def _read(self) -> dict[str, Any] | None:
        assert self._reader is not None
        try:
            header = await self._reader.readexactly(HEADER.size)
            (length,) = HEADER.unpack(header)
            return decode(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError, struct.error):
            return None

    async def _read_replies(self) -> None:
        while (message := await self._read()) is not None:
            entry = self._pending.pop(message["id"], None)
            if entry is None:
                continue
            future, slot = entry
            self._give_back(slot)
            if not future.done():
                future.set_result(message)
        self.state = "dead"
        died = WorkerDied(f"worker {self.index} died while running the request")
        pending, self._pending = self._pending, {}
        for future, slot in pending.values():
            self._give_back(slot)
            if not future.done():
                future.set_exception(died)

    def acquire_slot(self) -> int:
        return self.pool.acquire()

    def release_slot(self, slot: int) -> None:
        """Return a slot; if the worker still holds it, it returns when the worker lets go."""
        if slot in self._held_by_worker:
            self._abandoned.add(slot)
        else:
            self.pool.release(slot)

    def _give_back(self, slot: int) -> None:
        self._held_by_worker.discard(slot)
        if slot in self._abandoned:
            self._abandoned.discard(slot)
            self.pool.release(slot)

    async def run(self, model: str, kind: str, slot: int, nbytes: int, timeout_s: float) -> dict[str, Any]:
        """Have the worker run the request whose payload is in ``slot``; return its reply message."""
        if self.state != "ready" or self._writer is None:
            raise WorkerDied(f"worker {self.index} is not running")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, slot)
        self._held_by_worker.add(slot)
        self._writer.write(
            encode({"op": "infer", "id": request_id, "model": model, "kind": kind, "slot": slot, "nbytes": nbytes})
        )
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"no answer from the worker within {timeout_s:.0f} s") from None

    async def wait_exit(self) -> int | None:
        if self._process is None:
            return None
        code = await self._process.wait()
        if self._reader_task is not None:
            await self._reader_task
        self.state = "dead"
        if self._writer is not None:
            self._writer.close()
        return code

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit; kill it if it has not within ``timeout_s``."""
        if self._process is None:
            return
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode({"op": "stop"}))
        try:
            await asyncio.wait_for(self._process.wait(), timeout_s)
        except TimeoutError:
            self.kill()
            await self._process.wait()
        if self._reader_task is not None:
            await self._reader_task
        if self._writer is not None:
            self._writer.close()
        self.state = "stopped"
