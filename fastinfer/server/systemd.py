"""Running under systemd: readiness and watchdog notifications, and socket activation.

Both protocols are small enough to speak directly, so there is no libsystemd dependency:

- sd_notify (see sd_notify(3)): newline-separated ``KEY=VALUE`` lines in one datagram on the
  AF_UNIX SOCK_DGRAM socket named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the
  abstract namespace. Without ``$NOTIFY_SOCKET`` the server is not supervised and every
  notification is a no-op. A notification that cannot be sent is logged at debug level and
  dropped: systemd acts on the ones that arrive (a missed ``WATCHDOG=1`` is covered by the next),
  and the server must never fail, or block its event loop, because of one.
- socket activation (see sd_listen_fds(3)): systemd passes already-listening sockets as fds
  3, 4, ... and describes them in ``$LISTEN_PID``, ``$LISTEN_FDS`` and ``$LISTEN_FDNAMES``.

The socket names fastinfer uses are :data:`HTTP`, :data:`MANAGEMENT` and :data:`BINARY`, set by
``FileDescriptorName=`` in the socket units under ``scripts/``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

HTTP = "http"
MANAGEMENT = "management"
BINARY = "binary"

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first fd systemd passes
UNNAMED = "unknown"  # what sd_listen_fds_with_names() calls a socket without FileDescriptorName=


class Notifier:
    """Sends sd_notify messages to ``address`` (a path, or ``@name`` for the abstract namespace).

    With ``address`` None every method does nothing and returns False. Each method returns
    whether the message was handed to the kernel; none of them raises on a failed send.
    """

    def __init__(self, address: str | None):
        self.address = address

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for; a no-op one when it is unset or empty."""
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> bool:
        """Start-up (or a reload) is complete: systemd moves the unit to active."""
        return self.notify(READY=1)

    def reloading(self) -> bool:
        """A reload began; send :meth:`ready` when it is complete.

        ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd 253 and later), which
        uses it to tell this reload from an earlier one; older versions ignore it.
        """
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        """Shutdown began: systemd shows the unit as deactivating and stops expecting pings."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """One line of free text that ``systemctl status`` shows; newlines become spaces."""
        return self.notify(STATUS=" ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Keep-alive ping; see :func:`watchdog_interval_s` and :func:`watchdog_loop`."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more of the current start or stop timeout (e.g. while compiling)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in one datagram, in the order given.

        A value containing a newline is a misuse (it would split into another field) and raises
        ValueError; anything that goes wrong while sending is logged at debug level only.
        """
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"sd_notify field {key} must not contain a newline: {text!r}")
            lines.append(f"{key}={text}")
        if self.address is None:
            return False
        return self._send("\n".join(lines).encode())

    def _send(self, message: bytes) -> bool:
        assert self.address is not None
        if self.address.startswith("/"):
            address = self.address
        elif self.address.startswith("@"):
            address = "\0" + self.address[1:]
        else:
            log.debug("NOTIFY_SOCKET=%r is not an AF_UNIX address; notification dropped", self.address)
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Non-blocking: a manager whose queue is full must not stall the event loop.
                sock.setblocking(False)
                sock.sendto(message, address)
        except OSError as error:
            log.debug("sd_notify %r to %r failed: %s", message, self.address, error)
            return False
        return True


def watchdog_interval_s(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """How often to ping: half of ``$WATCHDOG_USEC``, or None when no watchdog is configured.

    None also when ``$WATCHDOG_PID`` names another process (``pid``, default this one), such as
    the server's parent when the variables were inherited: only the named process may ping.
    """
    environ = os.environ if environ is None else environ
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    this_pid = os.getpid() if pid is None else pid
    if watchdog_pid and (not watchdog_pid.isdigit() or int(watchdog_pid) != this_pid):
        return None
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    return int(raw) / 2 / 1_000_000


async def watchdog_loop(notifier: Notifier, interval_s: float, healthy: Callable[[], bool]) -> None:
    """Ping ``WATCHDOG=1`` every ``interval_s`` while ``healthy()``; run until cancelled.

    The pings come from the event loop itself, so a blocked loop stops them, as does
    ``healthy()`` returning False; after ``WatchdogSec=`` without one, systemd kills the service
    and ``Restart=`` starts it again. Pings resume if ``healthy()`` recovers before that.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    was_healthy = True
    while True:
        is_healthy = healthy()
        if is_healthy:
            notifier.watchdog()
        elif was_healthy:
            log.warning("unhealthy: watchdog pings stop until it recovers")
        was_healthy = is_healthy
        await asyncio.sleep(interval_s)


def listen_sockets() -> dict[str, list[socket.socket]]:
    """The sockets systemd passed, by ``FileDescriptorName=``; empty when there are none.

    They are ours only when ``$LISTEN_PID`` is this process. Each socket is marked close-on-exec,
    and ``$LISTEN_PID``, ``$LISTEN_FDS`` and ``$LISTEN_FDNAMES`` are removed from ``os.environ``
    in every case, so child processes (the workers) neither inherit the fds nor mistake the
    variables for their own. Call it once, early, before starting any child process. A socket
    without a name is listed as ``"unknown"``; one name can hold several sockets (a socket unit
    with several ``ListenStream=``). The sockets are left blocking or not as passed: asyncio's
    ``create_server(sock=...)`` and aiohttp's ``SockSite`` make them non-blocking themselves.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names_raw = os.environ.pop("LISTEN_FDNAMES", "")
    if not pid or not count:
        return {}
    if not pid.isdigit() or int(pid) != os.getpid():
        log.debug("LISTEN_PID=%s is not this process (%d): no sockets", pid, os.getpid())
        return {}
    if not count.isdigit():
        log.warning("ignoring malformed LISTEN_FDS=%r", count)
        return {}
    names = names_raw.split(":") if names_raw else []
    sockets: dict[str, list[socket.socket]] = {}
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        name = (names[index] if index < len(names) else "") or UNNAMED
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
        except OSError as error:
            log.warning("passed fd %d (%s) is not a socket, ignoring it: %s", fd, name, error)
            continue
        sockets.setdefault(name, []).append(sock)
    return sockets
