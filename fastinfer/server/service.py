"""fastinfer as a systemd service: readiness, watchdog, reload on SIGHUP, and logs for journald.

The notifications follow one order (see sd_notify(3)): ``READY=1`` once every worker is warm;
``WATCHDOG=1`` from the event loop while it is healthy; around each reload ``RELOADING=1`` then
``READY=1``; ``STOPPING=1`` when shutdown begins, after which the watchdog is silent. Without
``$NOTIFY_SOCKET`` all of it is a no-op, so the same code runs in a terminal.

A reload (SIGHUP, which ``systemctl reload`` sends) reads the config file and environment again
with the command line's flags on top, and always replaces the workers, warm-first, through
:meth:`Supervisor.replace_workers`: changed model files are picked up even when the model list
is the same, and no request fails. It applies ``models`` and ``devices``; models registered
through the management API stay. Listener settings (host, ports) cannot change without new
listeners, and the other settings are held by the running apps and workers: a changed one is
named in a warning and takes effect at the next restart. A reload that fails (a bad config file,
a model that does not load) leaves the serving workers as they were, and says so in ``STATUS=``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastinfer.config import Config
from fastinfer.errors import FastInferError
from fastinfer.server.batcher import WorkerState
from fastinfer.server.systemd import Notifier, watchdog_interval_s, watchdog_loop

if TYPE_CHECKING:
    from fastinfer.server.main import Server

log = logging.getLogger(__name__)

LISTENER_SETTINGS = ("host", "http_port", "management_port", "binary_port", "binary_socket")
# What a reload applies: the new workers and their batcher follow these. The listeners and their
# limits belong to the front, which a reload keeps (the slot size with them: bodies must fit a slot).
RELOADED_SETTINGS = (
    "models",
    "devices",
    "batch_max_size",
    "batch_max_delay_s",
    "batch_max_runs",
    "gpu_batch_max_size",
    "gpu_batch_max_delay_s",
    "queue_max_size",
    "queue_max_delay_s",
    "model_limits",
    "shm_slots_per_worker",
    "max_image_pixels",
    "worker_heartbeat_s",
    "batch_timeout_s",
    "restart_max_count",
    "restart_window_s",
    "worker_start_timeout_s",
)
READY_POLL_S = 0.05


class Service:
    """Tells systemd how ``server`` is doing, and reloads it with ``load()`` on :meth:`request_reload`.

    ``load`` returns the configuration as at start (file and environment read again, the same
    flags on top); it may raise FastInferError for a bad file.
    """

    def __init__(self, server: Server, load: Callable[[], Config], notifier: Notifier | None = None):
        self.server = server
        self._load = load
        self.notifier = Notifier.from_environment() if notifier is None else notifier
        self._config_models = server.config.model_paths()  # the models that came from the config
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False
        self._stopping = False

    def start(self) -> None:
        """Start the watchdog pings (when systemd asked for them) and announce readiness when it comes."""
        workers = self.server.config.worker_count()
        self.notifier.status(f"starting {workers} worker{'s' * (workers != 1)}")
        interval_s = watchdog_interval_s()
        if interval_s is not None:
            self._spawn(watchdog_loop(self.notifier, interval_s, self.healthy))
        self._spawn(self._announce_ready())

    def healthy(self) -> bool:
        """The event loop runs (this is called from it) and a worker serves, or is on its way."""
        return any(w.state in (WorkerState.READY, WorkerState.STARTING) for w in self.server.supervisor.workers)

    async def _announce_ready(self) -> None:
        supervisor = self.server.supervisor
        reported: str | None = None
        while not supervisor.ready:
            if supervisor.failure and supervisor.failure != reported:
                reported = supervisor.failure
                self.notifier.status(f"failed: {reported}")
            await asyncio.sleep(READY_POLL_S)
        log.info("ready: all workers are warm")
        self.notifier.notify(READY=1, STATUS=self._serving())
        self._ready.set()

    def _serving(self) -> str:
        supervisor = self.server.supervisor
        count = len(supervisor.workers)
        return (
            f"serving {', '.join(sorted(supervisor.model_paths)) or 'no model'} on {count} worker{'s' * (count != 1)}"
        )

    def request_reload(self) -> None:
        """Reload soon (the SIGHUP handler). Reloads run one at a time; a request during one
        queues one more, so the last change to the config file is always applied."""
        if self._stopping:
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = self._spawn(self._reload_when_ready())

    async def _reload_when_ready(self) -> None:
        await self._ready.wait()  # a SIGHUP during start-up applies once the first workers are warm
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again or self._stopping:
                return

    async def reload(self) -> bool:
        """Apply the config as ``load()`` now reads it; True if the new workers serve."""
        log.info("reloading the configuration and the models")
        self.notifier.reloading()
        self.notifier.status("reloading")
        supervisor = self.server.supervisor
        try:
            config = self._load()
            self._warn_unapplied(config)
            registered = {k: v for k, v in supervisor.model_paths.items() if k not in self._config_models}
            models = {**registered, **config.model_paths()}
            applied = dataclasses.replace(
                self.server.config, **{name: getattr(config, name) for name in RELOADED_SETTINGS}
            )
            await supervisor.replace_workers(models, config.worker_count(), applied)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            message = error.message if isinstance(error, FastInferError) else f"{type(error).__name__}: {error}"
            log.error(
                "reload failed; the workers that were serving go on: %s",
                message,
                exc_info=not isinstance(error, FastInferError),
            )
            self.notifier.notify(READY=1, STATUS=f"reload failed: {message}; still {self._serving()}")
            return False
        self._config_models = config.model_paths()
        log.info("reloaded: %s", self._serving())
        self.notifier.notify(READY=1, STATUS=self._serving())
        return True

    def _warn_unapplied(self, config: Config) -> None:
        running = self.server.config
        changed = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name not in RELOADED_SETTINGS and getattr(config, f.name) != getattr(running, f.name)
        ]
        listeners = [name for name in changed if name in LISTENER_SETTINGS]
        others = [name for name in changed if name not in LISTENER_SETTINGS]
        if listeners:
            log.warning("reload cannot change the listeners; restart to apply: %s", ", ".join(listeners))
        if others:
            log.warning("reload does not apply these settings; restart to apply: %s", ", ".join(others))

    async def stop(self) -> None:
        """Shutdown begins: STOPPING=1, no more watchdog pings, no reload."""
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.notifier.notify(STOPPING=1, STATUS="stopping")

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
