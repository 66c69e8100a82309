"""Running under systemd: notifications on a real datagram socket, socket activation in a real
child process, the unit files through ``systemd-analyze verify``, and the installer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from fastinfer.config import Config
from fastinfer.server import systemd
from fastinfer.server.systemd import Notifier, listen_sockets, watchdog_interval_s, watchdog_loop

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
SOCKET_UNITS = {
    systemd.HTTP: "fastinfer-http.socket",
    systemd.MANAGEMENT: "fastinfer-management.socket",
    systemd.BINARY: "fastinfer-binary.socket",
}
UNITS = ["fastinfer.service", *SOCKET_UNITS.values()]


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path):
    """A datagram socket standing in for systemd, and the NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
    else:
        name = f"fastinfer-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(5)
    yield sock, address
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``, without waiting for more."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(sock.recv(4096))
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(timeout)


# --- sd_notify ----------------------------------------------------------------------------


def test_notifier_sends_exact_datagrams(manager):
    sock, address = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.status("warming up\n2 workers")
    assert sock.recv(4096) == b"STATUS=warming up 2 workers"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.extend_timeout(1.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    assert notifier.notify(READY=1, STATUS="ok")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"

    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = sock.recv(4096).split(b"\n")
    assert reloading == b"RELOADING=1"
    key, _, value = monotonic.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before_us <= int(value) <= after_us
    assert received(sock) == []


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_no_notify_socket_is_a_no_op(environ, monkeypatch):
    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was opened without NOTIFY_SOCKET")

    monkeypatch.setattr(systemd.socket, "socket", no_socket)
    notifier = Notifier.from_environment(environ)
    assert not notifier.enabled
    sent = [
        notifier.ready(),
        notifier.reloading(),
        notifier.stopping(),
        notifier.status("x"),
        notifier.watchdog(),
        notifier.notify(READY=1),
    ]
    assert sent == [False] * 6


@pytest.mark.parametrize("address", ["/nonexistent/fastinfer-notify", "@fastinfer-nobody-listens", "vsock:2:1"])
def test_send_failure_is_logged_never_raised(address, caplog):
    caplog.set_level(logging.DEBUG, logger=systemd.__name__)
    assert Notifier(address).ready() is False
    assert any(address in record.getMessage() for record in caplog.records)
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


def test_full_manager_queue_neither_blocks_nor_raises(manager):
    sock, address = manager
    notifier = Notifier(address)
    started = time.monotonic()
    sent = [notifier.watchdog() for _ in range(5000)]
    assert time.monotonic() - started < 10
    assert sent[0] is True
    assert False in sent  # the queue filled up, and the sends that found it full were dropped
    assert set(received(sock)) == {b"WATCHDOG=1"}


def test_newline_in_a_field_is_a_misuse():
    with pytest.raises(ValueError, match="newline"):
        Notifier(None).notify(STATUS="two\nlines")


# --- watchdog -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4321"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": ""}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": "1234"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ, expected):
    assert watchdog_interval_s(environ, pid=1234) == expected


def test_watchdog_interval_defaults_to_this_process(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert watchdog_interval_s() is None


async def test_watchdog_loop_pings_only_while_healthy(tmp_path, caplog):
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    states = [True, True, False, True]
    calls = 0
    finished = asyncio.Event()

    def healthy() -> bool:
        nonlocal calls
        calls += 1
        if calls > len(states):
            finished.set()
            return False
        return states[calls - 1]

    interval_s = 0.01
    started = time.monotonic()
    task = asyncio.create_task(watchdog_loop(Notifier(str(tmp_path / "notify")), interval_s, healthy))
    try:
        await asyncio.wait_for(finished.wait(), 5)
        elapsed_s = time.monotonic() - started
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    try:
        assert received(manager) == [b"WATCHDOG=1"] * 3
    finally:
        manager.close()
    assert elapsed_s >= len(states) * interval_s * 0.9  # it waited between pings
    assert sum("unhealthy" in record.getMessage() for record in caplog.records) == 2


async def test_watchdog_loop_refuses_a_bad_interval():
    with pytest.raises(ValueError):
        await watchdog_loop(Notifier(None), 0, lambda: True)


# --- socket activation --------------------------------------------------------------------

# Runs in the child: moves the inherited sockets to fds 3, 4, 5 as systemd would, claims them
# with LISTEN_PID, reports what listen_sockets() found, then serves one connection per socket.
CHILD = """
import fcntl, json, os, sys
sources = [int(fd) for fd in sys.argv[1:]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())

from fastinfer.server.systemd import listen_sockets

found = listen_sockets()
report = {
    "sockets": {
        name: [[s.fileno(), s.getsockname()[1], os.get_inheritable(s.fileno())] for s in socks]
        for name, socks in found.items()
    },
    "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
for name, socks in found.items():
    for sock in socks:
        sock.settimeout(10)
        connection, _ = sock.accept()
        connection.sendall(name.encode())
        connection.close()
"""


@pytest.mark.parametrize(
    ("fdnames", "expected"),
    [
        ("http:management:binary", {"http": [0], "management": [1], "binary": [2]}),
        ("http:http", {"http": [0, 1], "unknown": [2]}),  # one unit, two sockets; one unnamed
        (None, {"unknown": [0, 1, 2]}),
    ],
)
def test_listen_sockets_in_a_child_process(fdnames, expected):
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    ports = [listener.getsockname()[1] for listener in listeners]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    environ["LISTEN_FDS"] = "3"
    if fdnames is not None:
        environ["LISTEN_FDNAMES"] = fdnames
    fds = [listener.fileno() for listener in listeners]
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, fds)],
            pass_fds=fds,
            env=environ,
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        try:
            report = json.loads(child.stdout.readline())
            assert report["environ"] == []
            assert {
                name: [ports.index(port) for _, port, _ in socks] for name, socks in report["sockets"].items()
            } == expected
            fd_of_port = {port: fd for socks in report["sockets"].values() for fd, port, _ in socks}
            assert [fd_of_port[port] for port in ports] == [3, 4, 5]
            assert not any(inheritable for socks in report["sockets"].values() for *_, inheritable in socks)
            for name, indexes in expected.items():
                for index in indexes:
                    with socket.create_connection(("127.0.0.1", ports[index]), timeout=10) as client:
                        assert client.recv(100) == name.encode()
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
    finally:
        for listener in listeners:
            listener.close()


def test_listen_sockets_of_another_process_are_ignored_and_unset(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "3")
    monkeypatch.setenv("LISTEN_FDNAMES", "http:management:binary")
    assert listen_sockets() == {}
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_without_socket_activation_there_are_no_sockets(monkeypatch):
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert listen_sockets() == {}


# --- unit files ---------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> every value it is given, in order (keys like Environment= repeat)."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key), []).append(value)
    return settings


def test_service_unit_settings():
    service = unit_settings(SCRIPTS / "fastinfer.service")
    assert service[("Service", "Type")] == ["notify"]
    assert service[("Service", "NotifyAccess")] == ["main"]
    assert service[("Service", "ExecReload")] == ["/bin/kill -HUP $MAINPID"]
    assert "FASTINFER_CACHE_DIR=/var/cache/fastinfer" in service[("Service", "Environment")]
    assert service[("Service", "CacheDirectory")] == ["fastinfer"]
    assert float(service[("Service", "TimeoutStopSec")][0]) > 2 * Config().shutdown_timeout_s
    assert int(service[("Service", "LimitNOFILE")][0]) > 2 * Config().max_connections  # HTTP and binary ports
    for absent in ("MemoryDenyWriteExecute", "DynamicUser"):
        assert ("Service", absent) not in service, f"{absent}= breaks TVM's JIT or the cache's owner"


def test_socket_units_match_the_config_defaults():
    defaults = Config()
    listen = {
        systemd.HTTP: str(defaults.http_port),
        systemd.MANAGEMENT: f"127.0.0.1:{defaults.management_port}",
        systemd.BINARY: str(defaults.binary_port),
    }
    for name, unit in SOCKET_UNITS.items():
        settings = unit_settings(SCRIPTS / unit)
        assert settings[("Socket", "FileDescriptorName")] == [name]
        assert settings[("Socket", "Service")] == ["fastinfer.service"]
        assert settings[("Socket", "ListenStream")] == [listen[name]]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    # verify insists that ExecStart= names an existing executable: point it at this Python.
    for unit in UNITS:
        shutil.copy(SCRIPTS / unit, tmp_path / unit)
    service = tmp_path / "fastinfer.service"
    text, count = re.subn(
        r"^ExecStart=/usr/local/bin/fastinfer ",
        f"ExecStart={sys.executable} -m fastinfer ",
        service.read_text(),
        flags=re.MULTILINE,
    )
    assert count == 1
    service.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{unit}" for unit in UNITS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # verify reports unknown keys and unparsable values as warnings with status 0, so any line
    # about our units is a failure; lines about the host's own units are not ours to judge.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "fastinfer" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []


# --- installer ----------------------------------------------------------------------------


@pytest.fixture
def fake_tools(tmp_path):
    """A PATH on which systemctl, useradd and chown only record that they were called."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("systemctl", "useradd", "chown", "getent"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 1\n')
        script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", calls


def install(*args: str, path: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / "install-service.sh"), *args],
        env={**os.environ, "PATH": path, **(environ or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_install_into_a_root_is_complete_and_idempotent(tmp_path, fake_tools):
    path, calls = fake_tools
    root = tmp_path / "root"
    first = install("--root", str(root), "--enable", path=path)
    assert "wrote" in first.stdout

    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_text() == (SCRIPTS / unit).read_text()
    config = root / "etc/fastinfer/config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    models = root / "var/lib/fastinfer/models"
    assert models.is_dir()
    assert stat.S_IMODE(models.stat().st_mode) == 0o750
    tree = sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    config.write_text(config.read_text() + 'devices = "cpu:2"\n')
    edited = config.read_text()
    second = install("--root", str(root), path=path)
    assert "wrote" not in second.stdout
    assert config.read_text() == edited  # an existing configuration is never overwritten
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == tree
    assert not calls.exists(), calls.read_text()  # no systemctl, useradd or chown under --root


def test_install_destdir_and_bin(tmp_path, fake_tools):
    path, calls = fake_tools
    install("--bin", "/opt/fastinfer/bin/fastinfer", path=path, environ={"DESTDIR": str(tmp_path / "root")})
    service = unit_settings(tmp_path / "root/etc/systemd/system/fastinfer.service")
    assert service[("Service", "ExecStart")][0].startswith("/opt/fastinfer/bin/fastinfer serve ")
    assert not calls.exists()


def test_config_template_keys_are_config_fields(tmp_path, fake_tools):
    path, _ = fake_tools
    install("--root", str(tmp_path), path=path)
    installed = tmp_path / "etc/fastinfer/config.toml"
    template = installed.read_text()
    assert template == (SCRIPTS / "config.toml").read_text()
    assert tomllib.loads(template) == {}  # everything commented: the defaults apply
    uncommented = tmp_path / "uncommented.toml"
    uncommented.write_text(
        "\n".join(re.sub(r"^# (\w+ = )", r"\1", line) for line in template.splitlines() if re.match(r"^# \w+ = ", line))
    )
    values = tomllib.loads(uncommented.read_text())
    defaults = dataclasses.asdict(Config())
    assert set(values) == set(defaults)  # every option is documented
    for key, value in values.items():
        if key == "cache_dir":
            assert value == "/var/cache/fastinfer"
        else:
            assert (tuple(value) if isinstance(value, list) else value) == defaults[key], f"the template's {key}"
    assert Config.load(config_file=str(uncommented), environ={}) == Config(cache_dir="/var/cache/fastinfer")
