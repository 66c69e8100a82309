"""The server's lifecycle: open the listeners, start the workers, wait for a signal, shut down in order.

A start that cannot succeed ends the process with one line that says why (StartupError, which the
CLI prints, then exits non-zero for the service manager's restart policy): a port in use or a
model file that is not there (both found before any worker starts), or models that every worker
of the first start failed to load. Shutdown is one sequence: stop accepting connections, let
in-flight requests finish within ``shutdown_timeout_s``, stop the workers, remove the shared memory.

Under systemd, listeners passed by name (socket activation: "http", "management", "binary") are
used instead of binding the configured ports; see fastinfer.server.service for the notifications
and the reload on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator, Mapping

from aiohttp import web

from fastinfer import cache
from fastinfer.config import Config
from fastinfer.errors import StartupError
from fastinfer.logs import configure_logging
from fastinfer.malloc import keep_freed_blocks
from fastinfer.server import systemd
from fastinfer.server.batcher import WorkerState
from fastinfer.server.fronts.access import AccessLog, guard_server
from fastinfer.server.fronts.binary import BinaryServer
from fastinfer.server.fronts.http import inference_app, runner_for, start_runner
from fastinfer.server.fronts.kserve.grpc_service import GrpcFront
from fastinfer.server.fronts.kserve.sysshm import ClientRegions
from fastinfer.server.fronts.management import TEST_RUNTIME_PREFIX, management_app
from fastinfer.server.service import Service
from fastinfer.server.supervisor import Supervisor

log = logging.getLogger("fastinfer")

MANAGEMENT_HOST = "127.0.0.1"
START_POLL_S = 0.05


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
        # Client shared memory (off by default): registered regions, shared by the v2 fronts.
        self.regions = ClientRegions(lambda: [self.supervisor.pool.fd]) if config.allow_client_shm else None
        self.grpc = GrpcFront(self.supervisor, config, self.regions)

    async def start(self) -> None:
        """Open the listeners, then start the workers. A model file that is not there, or a port
        that cannot be had, raises StartupError before any worker has started."""
        _check_model_files(self.supervisor.model_paths)
        cache.remove_stale_staging(self.config.cache_dir)
        self.access_log.start()
        try:
            inference = inference_app(self.supervisor, self.config, self.access_log, self.regions)
            await self._listen(inference, self.config.host, self.config.http_port, systemd.HTTP)
            management = management_app(self.supervisor, self.config, self.access_log)
            await self._listen(management, MANAGEMENT_HOST, self.config.management_port, systemd.MANAGEMENT)
            binary = self.sockets.get(systemd.BINARY, [])
            if len(binary) > 1:
                log.warning("%d sockets named %r passed: serving the first only", len(binary), systemd.BINARY)
            where = f"{self.config.host}:{self.config.binary_port}"
            with _cannot_listen(f"{where} and {self.config.binary_socket}" if self.config.binary_socket else where):
                await self.binary.start(binary[0] if binary else None)
            if self.config.grpc_port:
                with _cannot_listen(f"{self.config.host}:{self.config.grpc_port} (gRPC)"):
                    await self.grpc.start()
            self.supervisor.start()
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, app: web.Application, host: str, port: int, name: str) -> None:
        runner = runner_for(app, self.config)
        self._runners.append(runner)
        passed = self.sockets.get(name)
        if not passed:
            with _cannot_listen(f"{host}:{port}"):
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
        await asyncio.gather(self.binary.stop(timeout_s), self.grpc.stop(timeout_s), self._drain_http(timeout_s))
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))
        self._runners.clear()
        if self.regions is not None:
            self.regions.close()
        await self.supervisor.stop(self.config.shutdown_timeout_s)
        self.access_log.stop()

    async def _drain_http(self, timeout_s: float) -> None:
        """Close the HTTP listeners, then wait (within ``timeout_s``) for the requests in flight.

        aiohttp's own shutdown drops the bytes that arrive once it has begun, so a request whose
        body was still coming in would never finish: it is let finish first.
        """
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()
        in_flight = self.supervisor.metrics.in_flight
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + timeout_s
        while any(in_flight.values()) and loop.time() < deadline_s:
            await asyncio.sleep(START_POLL_S)


def _check_model_files(model_paths: Mapping[str, str]) -> None:
    """StartupError for a model file that is not there: no restart of a worker would find it."""
    for name, path in model_paths.items():
        if path and not path.startswith(TEST_RUNTIME_PREFIX) and not os.path.isfile(path):
            raise StartupError(f"cannot serve model {name!r}: no model file {path}")


@contextlib.contextmanager
def _cannot_listen(where: str) -> Iterator[None]:
    """An OSError while opening a listener (a port in use, an address not this host's) as one line."""
    try:
        yield
    except OSError as error:
        # asyncio words bind errors its own way; the errno's text is the same everywhere
        reason = os.strerror(error.errno) if error.errno and error.errno > 0 else (error.strerror or str(error))
        raise StartupError(f"cannot listen on {where}: {reason[:1].lower()}{reason[1:]}") from None


async def _first_start(supervisor: Supervisor, stop: asyncio.Event) -> str | None:
    """Wait for the first workers: None once they are warm (or a stop is asked); why they cannot
    serve once every one of them has given up loading its models, which no restart would fix."""
    while not (supervisor.ready or stop.is_set()):
        # As the supervisor judges it when it fails every queued request: a worker gave up, and none
        # serves or is on its way (one that gave up may read "dead" once its process is gone).
        if supervisor.failure and not any(
            w.state in (WorkerState.READY, WorkerState.STARTING) for w in supervisor.workers
        ):
            return supervisor.failure
        await asyncio.sleep(START_POLL_S)
    return None


def _cannot_serve(model_paths: Mapping[str, str], reason: str) -> str:
    """The line that ends a start whose workers could not load: the models named, and why."""
    named = [name for name, path in model_paths.items() if path and os.path.basename(path) in reason]
    named = named or sorted(model_paths)  # the reason names no model file: each may be the one
    noun = "model" if len(named) == 1 else "models"
    return f"cannot serve {noun} {', '.join(repr(name) for name in named)}: {reason}"


async def _drain_delay(supervisor: Supervisor, delay_s: float) -> None:
    """Fail readiness, and go on serving for ``delay_s``: a load balancer (Kubernetes' endpoints)
    notices a terminating replica only after a while, and sends it requests meanwhile."""
    if delay_s <= 0:
        return
    supervisor.draining = True
    log.info("draining: readiness fails; serving for %.1f s more before stopping", delay_s)
    await asyncio.sleep(delay_s)


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
        "serving %s: http://%s:%d, management http://%s:%d, binary tcp://%s:%d, gRPC %s",
        ", ".join(sorted(server.supervisor.model_paths)),
        config.host,
        server.http_port,
        MANAGEMENT_HOST,
        server.management_port,
        config.host,
        server.binary.port,
        f"{config.host}:{server.grpc.port}" if server.grpc.port else "off",
    )
    service.start()
    gc.freeze()  # what start-up made lives as long as the server: full collections need not walk it
    failure = await _first_start(server.supervisor, stop)
    if failure is None:
        await stop.wait()
        await _drain_delay(server.supervisor, config.shutdown_delay_s)
    loop.remove_signal_handler(signal.SIGHUP)
    log.info("shutting down")
    await service.stop()
    model_paths = server.supervisor.model_paths
    await server.stop()
    log.info("stopped")
    if failure is not None:  # exit, so that a service manager applies its restart policy
        raise StartupError(_cannot_serve(model_paths, failure))


def run(config: Config, load: Callable[[], Config] | None = None) -> None:
    import uvloop

    configure_logging(config.log_level)
    keep_freed_blocks()
    uvloop.run(serve(config, load))
