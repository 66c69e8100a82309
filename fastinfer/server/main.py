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
from fastinfer.server.http import inference_app, management_app
from fastinfer.supervisor import Supervisor

log = logging.getLogger("fastinfer")

MANAGEMENT_HOST = "127.0.0.1"


class Server:
    """Workers plus the HTTP listeners; ``start()`` returns once the ports are open."""

    def __init__(self, config: Config):
        self.config = config
        self.supervisor = Supervisor(config)
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        self.supervisor.start()
        try:
            await self._listen(inference_app(self.supervisor, self.config), self.config.host, self.config.http_port)
            await self._listen(management_app(self.supervisor), MANAGEMENT_HOST, self.config.management_port)
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, app: web.Application, host: str, port: int) -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.config.shutdown_timeout_s)
        self._runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()

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
        for runner in self._runners:
            await runner.cleanup()  # stops accepting, waits for in-flight handlers
        self._runners.clear()
        await self.supervisor.stop(self.config.shutdown_timeout_s)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = Server(config)
    await server.start()
    log.info(
        "serving %s: http://%s:%d, management http://%s:%d",
        ", ".join(sorted(server.supervisor.model_paths)),
        config.host,
        server.http_port,
        MANAGEMENT_HOST,
        server.management_port,
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
