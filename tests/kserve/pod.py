"""A KServe pod, emulated without a cluster: the runtime's manifests read and rendered as KServe
renders them, a model folder filled by KServe's own storage initializer, the server started with
the rendered arguments and environment, and a small model to serve."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "scripts" / "kserve"
RUNTIME = MANIFESTS / "clusterservingruntime.yaml"
MODEL_DIR = "/mnt/models"  # where the storage initializer leaves the model, in every KServe pod
CACHE_DIR = "/var/cache/fastinfer"  # the runtime's cache volume
START_TIMEOUT_S = 120
FEATURES = 16


def manifests(name: str) -> list[dict]:
    """The documents of ``scripts/kserve/NAME``."""
    with open(MANIFESTS / name) as file:
        return [document for document in yaml.safe_load_all(file) if document]


def runtime_container() -> dict:
    (runtime,) = manifests(RUNTIME.name)
    (container,) = runtime["spec"]["containers"]
    return container


def render(container: dict, isvc_name: str) -> tuple[list[str], dict[str, str]]:
    """The container's args and environment as KServe renders them for an InferenceService
    (Go templates over the InferenceService: ``{{.Name}}`` is its name)."""

    def fill(text: str) -> str:
        return re.sub(r"\{\{\s*\.Name\s*\}\}", isvc_name, text)

    args = [fill(arg) for arg in container.get("args", [])]
    environ = {item["name"]: fill(item["value"]) for item in container.get("env", [])}
    assert "{{" not in " ".join(args) + " ".join(environ.values()), "a template KServe would not fill"
    return args, environ


def tiny_onnx(path: Path) -> Path:
    """y = 2x + 1 over float32 [N, 16]: compiles in seconds."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", FEATURES])
    two = helper.make_tensor("two", TensorProto.FLOAT, [FEATURES], np.full(FEATURES, 2, np.float32))
    one = helper.make_tensor("one", TensorProto.FLOAT, [FEATURES], np.ones(FEATURES, np.float32))
    nodes = [helper.make_node("Mul", ["x", "two"], ["twice"]), helper.make_node("Add", ["twice", "one"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny", [x], [y], [two, one]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def tiny_archive(folder: Path, cache_dir: Path) -> Path:
    """The tiny model as an archive (``fastinfer archive``), for this host's CPU."""
    from fastinfer.archive.pack import BuildOptions, build_archive

    output = folder / "tiny.fia"
    build_archive(tiny_onnx(folder / "tiny.onnx"), output, BuildOptions(name="tiny", cache_dir=str(cache_dir)))
    (folder / "tiny.onnx").unlink()
    return output


def storage_initialize(uri: str, model_dir: Path) -> list[str]:
    """What KServe's storage-initializer container does before the server starts; the files left."""
    from kserve_storage import Storage

    Storage.download(uri, str(model_dir))
    return sorted(os.listdir(model_dir))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pod:
    """``fastinfer serve`` started as the runtime's container would be: its rendered args and env,
    the pod's paths mapped to folders of the test's, and its ports to free ones (a pod has its own
    network; this test shares the machine's). stderr is read by a thread so the pipe never fills."""

    def __init__(self, args: list[str], environ: dict[str, str], model_dir: Path, cache_dir: Path):
        self.http_port = free_port()
        mapped = [arg.replace(MODEL_DIR, str(model_dir)) for arg in args]
        # Flags given later win: the pod's ports, moved.
        mapped += [
            f"--http-port={self.http_port}",
            "--management-port=0",
            "--binary-port=0",
            "--grpc-port=-1",
            "--host=127.0.0.1",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTINFER_")}
        env.update(environ)
        env["FASTINFER_CACHE_DIR"] = environ["FASTINFER_CACHE_DIR"].replace(CACHE_DIR, str(cache_dir))
        env["FASTINFER_CONFIG"] = ""  # no config file of this machine's
        self.command = [sys.executable, "-m", "fastinfer", "serve", *mapped]
        self.process = subprocess.Popen(self.command, env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll readiness as the kubelet's startupProbe does."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout_s} s:\n{self.log()}")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (as the kubelet) and the exit code; killed if it overruns ``timeout_s``."""
        try:
            if self.process.poll() is None:
                self.terminate()
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(10)

    def log(self) -> str:
        return "".join(self.lines)
