"""The container image, built with scripts/kserve/build-image.sh and run as the runtime's pod
would run it: a read-only root, uid 1000, the model folder and the cache as volumes. Inference
from outside, SIGTERM drained, and nothing written but the cache (the root is read-only).

Needs podman, runc and mmdebstrap (the base image is made from Debian's packages when no registry
is reachable); skipped, saying which is missing, where they are not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from pod import CACHE_DIR, MODEL_DIR, REPO, free_port, render, runtime_container, tiny_archive

ISVC = "tiny"
TAG = "localhost/fastinfer-test:latest"
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]
# What runs containers on machines without systemd's cgroup manager or crun (see README).
RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "host"]


def missing_tools() -> str | None:
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc mmdebstrap)"
    if os.geteuid() != 0:
        return "building the base image with mmdebstrap and running rootful podman needs root"
    probe = subprocess.run([*PODMAN, "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"podman cannot run here: {probe.stderr.strip()[-300:]}"
    return None


pytestmark = pytest.mark.skipif(bool(reason := missing_tools()), reason=reason or "")


@pytest.fixture(scope="module")
def image() -> str:
    environ = {
        **os.environ,
        "PODMAN_FLAGS": " ".join(PODMAN[1:]),
        "BUILD_FLAGS": " ".join(RUN_FLAGS),
    }
    result = subprocess.run(
        ["scripts/kserve/build-image.sh", "--local-base", "--tag", TAG],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return TAG


@pytest.fixture
def container(image, tmp_path_factory):
    """The image run with the runtime's rendered args and env, as uid 1000 on a read-only root."""
    models = tmp_path_factory.mktemp("mnt-models")
    tiny_archive(models, tmp_path_factory.mktemp("archive-cache"))  # what the storage initializer downloads
    models.chmod(0o755)
    cache = tmp_path_factory.mktemp("cache")
    os.chown(cache, 1000, 1000)  # an emptyDir is writable by the pod's user
    args, environ = render(runtime_container(), ISVC)
    port = free_port()
    # The pod has its own network; on the host's, the ports are moved to free ones.
    args += [f"--http-port={port}", f"--management-port={free_port()}", f"--binary-port={free_port()}"]
    args += [f"--grpc-port={free_port()}"]
    name = f"fastinfer-test-{uuid.uuid4().hex[:8]}"
    command = [*PODMAN, "run", "--detach", "--name", name, *RUN_FLAGS, "--read-only", "--read-only-tmpfs=false"]
    command += ["--shm-size=512m", "-v", f"{models}:{MODEL_DIR}:ro", "-v", f"{cache}:{CACHE_DIR}"]
    for key, value in environ.items():
        command += ["--env", f"{key}={value}"]
    subprocess.run([*command, image, *args], check=True, capture_output=True)
    served = Container(name, f"http://127.0.0.1:{port}", cache)
    try:
        yield served
    finally:
        subprocess.run([*PODMAN, "rm", "--force", "--time=0", name], capture_output=True)


class Container:
    def __init__(self, name: str, url: str, cache: Path):
        self.name, self.url, self.cache = name, url, cache

    def logs(self) -> str:
        result = subprocess.run([*PODMAN, "logs", self.name], capture_output=True, text=True)
        return result.stdout + result.stderr

    def inspect(self, template: str) -> str:
        return subprocess.run(
            [*PODMAN, "inspect", "--format", template, self.name], capture_output=True, text=True, check=True
        ).stdout.strip()

    def ready_status(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.inspect("{{.State.Running}}") != "true":
                raise AssertionError(f"the container stopped:\n{self.logs()}")
            try:
                if self.ready_status() == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout_s} s:\n{self.logs()}")


def infer(url: str, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((2, 16)).astype(np.float32)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        given = triton.InferInput("x", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer(ISVC, [given]).as_numpy("y"), 2 * x + 1, rtol=1e-6)
    finally:
        client.close()


def uids(pid: int) -> set[int]:
    """The real, effective, saved and filesystem uids of process ``pid`` and its children."""
    found: set[int] = set()
    for proc in [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        for line in Path(f"/proc/{proc}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                found.update(int(uid) for uid in line.split()[1:])
    return found


def test_the_image_serves_as_uid_1000_on_a_read_only_root_and_drains_on_sigterm(container):
    container.wait_ready()
    infer(container.url)
    pid = int(container.inspect("{{.State.Pid}}"))
    assert uids(pid) == {1000}, "a process of the container runs as another user"
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"fastinfer")  # PID 1 is the server

    subprocess.run([*PODMAN, "kill", "--signal", "TERM", container.name], check=True, capture_output=True)
    while container.ready_status() != 503:  # readiness fails at once...
        time.sleep(0.05)
    infer(container.url, seed=1)  # ...while requests are still served, for the delay
    status = subprocess.run([*PODMAN, "wait", container.name], capture_output=True, text=True, timeout=120)
    logs = container.logs()
    assert status.stdout.strip() == "0", logs
    assert "draining: readiness fails" in logs and "stopped" in logs
    # Written nowhere but the volumes: the root is read-only, /tmp included, and a write there fails.
    assert "Read-only file system" not in logs
