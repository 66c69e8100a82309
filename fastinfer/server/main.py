"""The server's lifecycle: start workers and listeners, wait for a signal, shut down in order.

Shutdown is one sequence: stop accepting connections, let in-flight requests finish within
``shutdown_timeout_s``, stop the workers, remove the shared memory.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from fastinfer.config import Config
from fastinfer.server.access import AccessLog
from fastinfer.server.binary import BinaryServer
from fastinfer.server.http import inference_app, runner_for, start_runner
from fastinfer.server.management import management_app
from fastinfer.supervisor import Supervisor

log = logging.getLogger("fastinfer")

MANAGEMENT_HOST = "127.0.0.1"


class Server:
    """Workers plus the HTTP listeners; ``start()`` returns once the ports are open."""

    def __init__(self, config: Config):
        self.config = config
        self.supervisor = Supervisor(config)
        self._runners: list[web.AppRunner] = []
        self.binary = BinaryServer(self.supervisor, config)
        self.access_log = AccessLog()

    async def start(self) -> None:
        self.supervisor.start()
        self.access_log.start()
        try:
            inference = inference_app(self.supervisor, self.config, self.access_log)
            await self._listen(inference, self.config.host, self.config.http_port)
            management = management_app(self.supervisor, self.config, self.access_log)
            await self._listen(management, MANAGEMENT_HOST, self.config.management_port)
            await self.binary.start()
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, app: web.Application, host: str, port: int) -> None:
        runner = runner_for(app, self.config)
        self._runners.append(runner)
        await start_runner(runner, host, port, self.config.max_connections)

    @property
    def http_port(self) -> int:
        return self._runners[0].addresses[0][1]

    @property
    def management_port(self) -> int:
        return self._runners[1].addresses[0][1]

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until every worker is warm; raise if one failed or time ran out."""
        async with asyncio.timeout(timeout_s):
            while not self.supervisor.ready:
                if self.supervisor.failure:
                    raise RuntimeError(self.supervisor.failure)
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop accepting; let requests in flight finish (within the timeout); stop the workers."""
        timeout_s = self.config.shutdown_timeout_s
        await asyncio.gather(self.binary.stop(timeout_s), *(runner.cleanup() for runner in self._runners))
        self._runners.clear()
        await self.supervisor.stop(self.config.shutdown_timeout_s)
        self.access_log.stop()


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = Server(config)
    await server.start()
    log.info(
        "serving %s: http://%s:%d, management http://%s:%d, binary tcp://%s:%d",
        ", ".join(sorted(server.supervisor.model_paths)),
        config.host,
        server.http_port,
        MANAGEMENT_HOST,
        server.management_port,
        config.host,
        server.binary.port,
    )
    ready = asyncio.create_task(_announce_ready(server))
    await stop.wait()
    ready.cancel()
    log.info("shutting down")
    await server.stop()
    log.info("stopped")


async def _announce_ready(server: Server) -> None:
    while not server.supervisor.ready:
        await asyncio.sleep(0.1)
    log.info("ready: all workers are warm")


def run(config: Config) -> None:
    import uvloop

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(config))
