"""``fastinfer serve`` as a user runs it: a real process, stopped by a signal."""

import json
import re
import signal
import socket
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
            "--grpc-port",
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


def serve_until_exit(tmp_path, *flags: str) -> tuple[int, str, int]:
    """``fastinfer serve`` on free ports with ``flags`` on top, run until it exits by itself (it
    must, within the timeout); its exit status, its stderr and its pid."""
    command = [sys.executable, "-m", "fastinfer", "serve", "--host", "127.0.0.1", "--cache-dir", str(tmp_path)]
    command += [
        "--http-port",
        "0",
        "--management-port",
        "0",
        "--binary-port",
        "0",
        "--grpc-port",
        "0",
        *flags,
    ]  # the last flag wins
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, stderr, process.pid


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", ["--http-port", "--management-port", "--binary-port"])
def test_a_port_in_use_ends_the_start_with_one_line(tmp_path, flag):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, stderr, pid = serve_until_exit(tmp_path, "--models", "echo=echo:float32:16", flag, str(port))
    assert code == 1
    assert last_line(stderr) == f"fastinfer: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "worker" not in stderr, "no worker was started"
    assert not fastinfer_segments(pid)


def test_a_model_file_that_is_not_there_ends_the_start(tmp_path):
    missing = tmp_path / "models" / "gone.onnx"
    code, stderr, _ = serve_until_exit(tmp_path, "--models", f"gone={missing}")
    assert code == 1
    assert last_line(stderr) == f"fastinfer: cannot serve model 'gone': no model file {missing}"
    assert "worker" not in stderr, "no worker was started"


def test_models_that_no_worker_can_load_end_the_start(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    code, stderr, pid = serve_until_exit(
        tmp_path, "--models", "echo=echo:float32:4", f"broken={broken}", "--devices", "cpu:2"
    )
    assert code == 1
    line = last_line(stderr)
    assert line.startswith("fastinfer: cannot serve model 'broken': worker "), line
    assert "broken.onnx is not an ONNX model" in line, line
    assert not fastinfer_segments(pid)


def test_kill_9_of_every_process_leaves_no_shared_memory(tmp_path):
    """The slot memory has no name: when the last process that maps it dies, it is gone, and no
    process outside the server could ever open it."""
    import os

    before = set(os.listdir("/dev/shm"))
    process, (_, management_port) = start_server(tmp_path)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{management_port}/models/echo", timeout=10) as response:
            worker_pids = [w["pid"] for w in json.load(response)["workers"]]
        assert fastinfer_segments(process.pid), "the front holds the slot memory"
        maps = Path(f"/proc/{worker_pids[0]}/maps").read_text()
        assert "memfd:fastinfer-slots" in maps
        assert set(os.listdir("/dev/shm")) == before, "nothing with a name"
        for pid in [process.pid, *worker_pids]:
            os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        process.kill()
        process.stderr.close()
    assert set(os.listdir("/dev/shm")) == before
