"""``fastinfer serve`` as systemd runs it: a real process that notifies a datagram socket the test
listens on, serves sockets passed through ``LISTEN_FDS``, and reloads on SIGHUP under load; and
its logs as journald wants them."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import fastinfer_segments

from fastinfer.client import Client
from fastinfer.logs import JournalFormatter, log_formatter, syslog_priority

START_TIMEOUT_S = 60
PORTS = re.compile(r"http://127\.0\.0\.1:(\d+), management http://127\.0\.0\.1:(\d+), binary tcp://127\.0\.0\.1:(\d+)")
INHERITED = ("FASTINFER_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "INVOCATION_ID")


class Manager:
    """A datagram socket standing in for systemd's notification socket; keeps every message."""

    def __init__(self) -> None:
        self.address = f"@fastinfer-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.messages: list[tuple[float, dict[str, str]]] = []  # (time received, fields)

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout_s: float = START_TIMEOUT_S) -> float:
        """Receive until a message satisfies ``predicate``; the time it came."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such notification; got {[m for _, m in self.messages]}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))
            if predicate(fields):
                return self.messages[-1][0]

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                self.messages.append((time.monotonic(), dict(x.split("=", 1) for x in data.decode().split("\n"))))
        except BlockingIOError:
            pass

    def kinds(self) -> list[str]:
        """The order of READY, WATCHDOG, RELOADING and STOPPING messages."""
        order = ("READY", "WATCHDOG", "RELOADING", "STOPPING")
        return [key for _, fields in self.messages for key in fields if key in order]

    def close(self) -> None:
        self.sock.close()


class Served:
    """A ``fastinfer serve`` process whose stderr a thread keeps reading (so the pipe never fills)."""

    def __init__(self, command: list[str], environ: dict[str, str], pass_fds: tuple[int, ...] = ()):
        self.process = subprocess.Popen(
            command, env=environ, pass_fds=pass_fds, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if match := re.search(pattern, line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line matching {pattern!r}:\n{''.join(self.lines)}")
                self._changed.wait(min(remaining, 0.5))

    def ports(self) -> tuple[int, int, int]:
        match = self.wait_for_line(PORTS.pattern)
        return int(match[1]), int(match[2]), int(match[3])

    def stop(self) -> int:
        """SIGTERM, and the exit code; kills it if it does not stop in time."""
        try:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(10)
            assert self.process.stderr is not None
            self.process.stderr.close()


def serve_command(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastinfer",
        "serve",
        "--http-port",
        "0",
        "--management-port",
        "0",
        "--binary-port",
        "0",
        "--grpc-port",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--shm-slot-bytes",
        str(1 << 20),
        "--max-body-bytes",
        str(1 << 20),
        "--shm-slots-per-worker",
        "8",
        *args,
    ]


def clean_environ(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}
    return {**environ, **extra}


def post(port: int, model: str, body: bytes, timeout_s: float = 10) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/{model}", data=body)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture
def manager():
    manager = Manager()
    yield manager
    manager.close()


# --- notifications ---------------------------------------------------------------------------


def test_ready_once_warm_then_watchdog_then_stopping(tmp_path, manager):
    environ = clean_environ(NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="200000")
    served = Served(
        serve_command(tmp_path, "--config", "", "--models", "echo=echo:float32:16", "--devices", "cpu:2"), environ
    )
    try:
        http_port, _, _ = served.ports()
        manager.wait_for(lambda m: "READY" in m)
        status, body = get(http_port, "/ping")
        assert status == 200, body  # READY came once every worker was warm, not before
        ready = next(m for _, m in manager.messages if "READY" in m)
        assert ready == {"READY": "1", "STATUS": "serving echo on 2 workers"}
        manager.wait_for(lambda m: "WATCHDOG" in m, timeout_s=5)
        assert post(http_port, "echo", bytes(64))["outputs"][0]["data"] == [0.0] * 16
        pid = served.process.pid
        assert fastinfer_segments(pid)
    finally:
        code = served.stop()
    manager.drain()
    assert code == 0
    kinds = manager.kinds()
    assert "READY" in kinds and "STOPPING" in kinds, kinds
    first_ready = kinds.index("READY")
    stopping = kinds.index("STOPPING")
    assert "WATCHDOG" in kinds[first_ready:stopping], kinds
    assert stopping == len(kinds) - 1, kinds  # nothing after STOPPING: the watchdog stopped first
    assert kinds.count("READY") == 1
    assert any(m.get("STATUS", "").startswith("starting 2 workers") for _, m in manager.messages)
    assert fastinfer_segments(pid) == set()


def test_no_watchdog_pings_without_watchdog_usec(tmp_path, manager):
    environ = clean_environ(NOTIFY_SOCKET=manager.address)
    served = Served(serve_command(tmp_path, "--config", "", "--models", "echo=echo:float32:16"), environ)
    try:
        manager.wait_for(lambda m: "READY" in m)
        time.sleep(0.3)
    finally:
        code = served.stop()
    manager.drain()
    assert code == 0
    kinds = manager.kinds()
    assert kinds == ["READY", "STOPPING"], kinds


# --- socket activation -----------------------------------------------------------------------

# Runs in the child as systemd would start the server: the passed sockets on fds 3, 4, 5,
# LISTEN_PID naming this process, then exec (which keeps the pid) into `fastinfer serve`.
ACTIVATE = """
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1:4]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="3", LISTEN_FDNAMES="http:management:binary")
os.execv(sys.executable, sys.argv[4:])
"""


def test_passed_sockets_are_served(tmp_path, manager):
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    passed = tuple(listener.getsockname()[1] for listener in listeners)
    fds = tuple(listener.fileno() for listener in listeners)
    command = [sys.executable, "-c", ACTIVATE, *map(str, fds), *serve_command(tmp_path, "--config", "")]
    command += ["--models", "echo=echo:float32:16"]
    served = Served(command, clean_environ(NOTIFY_SOCKET=manager.address), pass_fds=fds)
    try:
        for listener in listeners:
            listener.close()  # the server holds its own copies now
        assert served.ports() == passed  # the ports it reports are the passed ones, not new ones
        http_port, management_port, binary_port = passed
        manager.wait_for(lambda m: "READY" in m)
        assert post(http_port, "echo", np.arange(16, dtype=np.float32).tobytes())["outputs"][0]["data"] == list(
            range(16)
        )
        status, models = get(management_port, "/models")
        assert (status, models) == (200, {"models": [{"modelName": "echo"}]})
        data = np.full((1, 16), 7, np.float32)
        with Client(f"tcp://127.0.0.1:{binary_port}") as client:
            np.testing.assert_array_equal(client.infer("echo", {"input": data})["output"], data)
        worker_pids = [w["pid"] for w in get(management_port, "/workers")[1]["workers"]]
        for pid in worker_pids:  # the workers did not inherit the listening sockets
            fd_targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            server_sockets = {os.readlink(f"/proc/{served.process.pid}/fd/{fd}") for fd in (3, 4, 5)}
            assert not fd_targets & server_sockets
    finally:
        code = served.stop()
    assert code == 0
    assert fastinfer_segments(served.process.pid) == set()


# --- reload ----------------------------------------------------------------------------------


class Load:
    """Threads that send HTTP requests to one model until stopped; every outcome is kept."""

    def __init__(self, port: int, model: str, threads: int = 3):
        self.port, self.model = port, model
        self.done: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, index: int) -> None:
        value = float(index)
        body = np.full(16, value, np.float32).tobytes()
        while not self._stop.is_set():
            try:
                data = post(self.port, self.model, body)["outputs"][0]["data"]
                if data != [value] * 16:
                    self.failures.append(f"wrong answer {data}")
                self.done.append(time.monotonic())
            except Exception as error:
                detail = error.read().decode() if isinstance(error, urllib.error.HTTPError) else ""
                self.failures.append(f"{error!r} {detail}")

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_sighup_reloads_under_load_without_failing_a_request(tmp_path, manager):
    config = tmp_path / "config.toml"
    config.write_text('models = ["a=echo:float32:16:0.01"]\n')
    environ = clean_environ(NOTIFY_SOCKET=manager.address)
    served = Served(serve_command(tmp_path, "--config", str(config)), environ)
    try:
        http_port, management_port, _ = served.ports()
        manager.wait_for(lambda m: "READY" in m)
        pid = served.process.pid

        # A reload that fails keeps the serving workers, and says so.
        config.write_text('models = ["a=echo:float32:16:0.01"]\nno_such_option = 1\n')
        served.process.send_signal(signal.SIGHUP)
        manager.wait_for(lambda m: "RELOADING" in m, timeout_s=10)
        manager.wait_for(lambda m: "READY" in m, timeout_s=10)
        assert "reload failed" in manager.messages[-1][1]["STATUS"]
        assert "no_such_option" in manager.messages[-1][1]["STATUS"]
        assert post(http_port, "a", bytes(64))["outputs"][0]["data"] == [0.0] * 16

        config.write_text(
            'models = ["a=echo:float32:16:0.01", "b=echo:float32:8"]\ndevices = "cpu:2"\n'
            'host = "127.0.0.2"\nrequest_timeout_s = 30\n'
        )
        with Load(http_port, "a") as load:
            time.sleep(0.3)
            served.process.send_signal(signal.SIGHUP)
            reloading_s = manager.wait_for(lambda m: "RELOADING" in m, timeout_s=10)
            ready_s = manager.wait_for(lambda m: "READY" in m, timeout_s=START_TIMEOUT_S)
            time.sleep(0.3)
        assert load.failures == []
        assert any(reloading_s < t < ready_s for t in load.done), "no request was answered during the reload"
        assert any(t > ready_s for t in load.done)
        assert manager.messages[-1][1] == {"READY": "1", "STATUS": "serving a, b on 2 workers"}
        reloading = next(m for _, m in manager.messages[::-1] if "RELOADING" in m)
        assert int(reloading["MONOTONIC_USEC"]) > 0

        assert post(http_port, "b", np.arange(8, dtype=np.float32).tobytes())["outputs"][0]["data"] == list(range(8))
        assert len(get(management_port, "/workers")[1]["workers"]) == 2
        served.wait_for_line(r"reload cannot change the listeners; restart to apply: host$")
        served.wait_for_line(r"restart to apply: request_timeout_s$")
    finally:
        code = served.stop()
    assert code == 0
    assert fastinfer_segments(pid) == set()


# --- logs ------------------------------------------------------------------------------------


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("fastinfer.test", level, __file__, 1, message, None, None)


def test_terminal_logs_have_a_timestamp():
    formatter = log_formatter(io.StringIO(), {})
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ fastinfer.test INFO hi$", formatter.format(record(20, "hi")))


@pytest.mark.parametrize("variable", ["INVOCATION_ID", "JOURNAL_STREAM"])
def test_under_systemd_logs_have_no_second_timestamp(variable):
    formatter = log_formatter(io.StringIO(), {variable: "1:2"})  # a stream that is not the journal
    assert not isinstance(formatter, JournalFormatter)
    assert formatter.format(record(logging.WARNING, "hi")) == "fastinfer.test WARNING hi"


def test_journal_stream_gets_syslog_prefixes_on_every_line(tmp_path):
    with open(tmp_path / "journal", "w") as stream:
        status = os.fstat(stream.fileno())
        formatter = log_formatter(stream, {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
    assert isinstance(formatter, JournalFormatter)
    assert formatter.format(record(logging.ERROR, "one\ntwo")) == "<3>fastinfer.test ERROR one\n<3>two"
    assert formatter.format(record(logging.INFO, "hi")) == "<6>fastinfer.test INFO hi"


def test_syslog_priorities():
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL, 5, 25, 60]
    assert [syslog_priority(level) for level in levels] == [7, 6, 4, 3, 2, 7, 6, 2]
