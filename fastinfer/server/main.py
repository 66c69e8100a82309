"""The server's lifecycle: start workers and listeners, wait for a signal, shut down in order.

Shutdown is one sequence: stop accepting connections, let in-flight requests finish within
``shutdown_timeout_s``, stop the workers, remove the shared memory.

Under systemd, listeners passed by name (socket activation: "http", "management", "binary") are
used instead of binding the configured ports; see fastinfer.server.service for the notifications
and the reload on SIGHUP.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Callable, Mapping

from aiohttp import web

from fastinfer.config import Config
from fastinfer.logs import configure_logging
from fastinfer.malloc import keep_freed_blocks
from fastinfer.server import systemd
from fastinfer.server.access import AccessLog, guard_server
from fastinfer.server.binary import BinaryServer
from fastinfer.server.http import inference_app, runner_for, start_runner
from fastinfer.server.management import management_app
from fastinfer.server.service import Service
from fastinfer.supervisor import Supervisor

log = logging.getLogger("fastinfer")

MANAGEMENT_HOST = "127.0.0.1"


class Server:
    """Workers plus the HTTP listeners; ``start()`` returns once the ports are open.

    ``sockets`` are listening sockets by name (see :func:`systemd.listen_sockets`), used instead
    of binding the configured port of that name.
    """

    def __init__(self, config: Config, sockets: Mapping[str, list[socket.socket]] | None = None):
        self.config = config
        self.sockets = dict(sockets or {})
        self.supervisor = Supervisor(config)
        self._runners: list[web.AppRunner] = []
        self.binary = BinaryServer(self.supervisor, config)
        self.access_log = AccessLog()

    async def start(self) -> None:
        self.supervisor.start()
        self.access_log.start()
        try:
            inference = inference_app(self.supervisor, self.config, self.access_log)
            await self._listen(inference, self.config.host, self.config.http_port, systemd.HTTP)
            management = management_app(self.supervisor, self.config, self.access_log)
            await self._listen(management, MANAGEMENT_HOST, self.config.management_port, systemd.MANAGEMENT)
            binary = self.sockets.get(systemd.BINARY, [])
            if len(binary) > 1:
                log.warning("%d sockets named %r passed: serving the first only", len(binary), systemd.BINARY)
            await self.binary.start(binary[0] if binary else None)
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, app: web.Application, host: str, port: int, name: str) -> None:
        runner = runner_for(app, self.config)
        self._runners.append(runner)
        passed = self.sockets.get(name)
        if not passed:
            await start_runner(runner, host, port, self.config.max_connections)
            return
        await runner.setup()
        assert runner.server is not None
        guard_server(runner.server, self.config.max_connections)
        for sock in passed:
            await web.SockSite(runner, sock).start()

    @property
    def http_port(self) -> int:
        return _port(self._runners[0])

    @property
    def management_port(self) -> int:
        return _port(self._runners[1])

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


def _port(runner: web.AppRunner) -> int:
    """The port of the runner's first TCP listener (0 if it has only Unix sockets)."""
    return next((address[1] for address in runner.addresses if isinstance(address, tuple)), 0)


async def serve(config: Config, load: Callable[[], Config] | None = None) -> None:
    """Run until SIGINT or SIGTERM; on SIGHUP, reload with ``load()`` (default: ``config`` again)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = Server(config, systemd.listen_sockets())  # before any worker starts: they must not inherit them
    service = Service(server, load or (lambda: config))
    loop.add_signal_handler(signal.SIGHUP, service.request_reload)
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
    service.start()
    gc.freeze()  # what start-up made lives as long as the server: full collections need not walk it
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    log.info("shutting down")
    await service.stop()
    await server.stop()
    log.info("stopped")


def run(config: Config, load: Callable[[], Config] | None = None) -> None:
    import uvloop

    configure_logging(config.log_level)
    keep_freed_blocks()
    uvloop.run(serve(config, load))
