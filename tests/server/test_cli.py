"""``fastinfer serve`` as a user runs it: a real process, stopped by a signal."""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import fastinfer_segments


def start_server(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastinfer",
            "serve",
            "--models",
            "echo=echo:float32:16",
            "--http-port",
            "0",
            "--management-port",
            "0",
            "--binary-port",
            "0",
            "--cache-dir",
            str(tmp_path),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    ports = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if match := re.search(r"http://127\.0\.0\.1:(\d+), management http://127\.0\.0\.1:(\d+)", line):
            ports = int(match[1]), int(match[2])
        if "ready: all workers are warm" in line:
            return process, ports
    process.kill()
    raise AssertionError("server did not become ready")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_and_leaves_nothing(tmp_path, signum):
    process, (http_port, management_port) = start_server(tmp_path)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/predictions/echo", data=bytes(64))
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["outputs"][0]["data"] == [0.0] * 16
        with urllib.request.urlopen(f"http://127.0.0.1:{management_port}/models/echo", timeout=10) as response:
            worker_pids = [w["pid"] for w in json.load(response)["workers"]]
        assert fastinfer_segments(process.pid)

        process.send_signal(signum)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.stderr.close()
    for pid in worker_pids:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text().lower()
    assert not fastinfer_segments(process.pid)


def test_bad_flags_are_refused_with_a_message():
    result = subprocess.run(
        [sys.executable, "-m", "fastinfer", "serve", "--models", "nopath"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "NAME=PATH" in result.stderr
