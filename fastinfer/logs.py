"""Log formats: a timestamp in a terminal, none under systemd (journald stamps each line), and
``<N>`` syslog priorities when stderr really is the journal. The front and the workers share it.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
TERMINAL_FORMAT = "%(asctime)s {prefix}%(name)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "{prefix}%(name)s %(levelname)s %(message)s"  # journald stamps each line itself


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3)'s ``<N>`` prefixes)."""
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return SYSLOG_PRIORITY[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """Prefixes every line with ``<N>``, its syslog priority, which journald reads and strips."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is connected to journald: ``$JOURNAL_STREAM`` names its device and inode."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def log_formatter(stream: TextIO, environ: Mapping[str, str] | None = None, prefix: str = "") -> logging.Formatter:
    """The formatter for logs on ``stream``: with a timestamp in a terminal; under systemd
    (``$INVOCATION_ID`` or ``$JOURNAL_STREAM``) without one, since journald adds its own; and
    with ``<N>`` priority prefixes when ``stream`` really goes to journald."""
    environ = os.environ if environ is None else environ
    journal_format = JOURNAL_FORMAT.format(prefix=prefix)
    if stream_is_journal(stream, environ):
        return JournalFormatter(journal_format)
    if environ.get("INVOCATION_ID") or environ.get("JOURNAL_STREAM"):
        return logging.Formatter(journal_format)
    return logging.Formatter(TERMINAL_FORMAT.format(prefix=prefix))


def configure_logging(
    level: str, stream: TextIO | None = None, environ: Mapping[str, str] | None = None, prefix: str = ""
) -> None:
    """Log at ``level`` to ``stream`` (stderr) in the format :func:`log_formatter` picks;
    ``prefix`` tells processes apart (workers share the front's stderr)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log_formatter(stream, environ, prefix))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class LogLines(io.TextIOBase):
    """A text stream that logs each line written to it at INFO, with the seconds since it was made:
    the archive builder's progress, in a server's log. Not a terminal, so tuning progress comes a
    line a minute."""

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        self.logger = logger
        self.prefix = prefix
        self.started = time.monotonic()
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.info("%s%s (%.0f s)", self.prefix, line.strip(), time.monotonic() - self.started)
        return len(text)
