"""The server as a KServe pod runs it: the storage initializer fills the model folder, the server
starts with the runtime's rendered arguments and environment, and KServe's and Triton's clients
use it; on SIGTERM readiness fails at once, requests go on being served for the delay, and those
in flight when the listener closes still get their answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from pod import FEATURES, Pod, manifests, render, runtime_container, storage_initialize, tiny_archive, tiny_onnx

ISVC = "tiny"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """A local 'bucket' holding the tiny model's archive, as a storageUri would point to."""
    folder = tmp_path_factory.mktemp("bucket")
    tiny_archive(folder, tmp_path_factory.mktemp("archive-cache"))
    return folder


@pytest.fixture
def pod(bucket, tmp_path):
    model_dir = tmp_path / "mnt-models"
    assert storage_initialize(f"file://{bucket}/tiny.fia", model_dir) == ["tiny.fia"]
    args, environ = render(runtime_container(), ISVC)
    served = Pod(args, environ, model_dir, tmp_path / "cache")
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def sample(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def test_tritonclient_live_ready_metadata_infer(pod):
    client = triton.InferenceServerClient(pod.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(ISVC)
        metadata = client.get_model_metadata(ISVC)
        assert metadata["name"] == ISVC
        (tensor,) = metadata["inputs"]
        assert (tensor["name"], tensor["datatype"], tensor["shape"][-1]) == ("x", "FP32", FEATURES)
        x = sample(3)
        given = triton.InferInput("x", list(x.shape), "FP32")
        given.set_data_from_numpy(x, binary_data=True)
        result = client.infer(ISVC, [given])
        np.testing.assert_allclose(result.as_numpy("y"), 2 * x + 1, rtol=1e-6)
    finally:
        client.close()


# The kserve SDK registers KServe's ``inference.*`` protobuf messages in protobuf's default pool, as
# tritonclient.grpc does (tests/server/test_grpc.py): the two cannot share a process, so the SDK's
# session runs as a client process of its own.
KSERVE_SESSION = """
import asyncio, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

async def main(url, model, features):
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        assert await client.is_server_live(url)
        assert await client.is_server_ready(url)
        assert await client.is_model_ready(url, model)
        x = np.random.default_rng(1).standard_normal((2, features)).astype(np.float32)
        given = InferInput("x", list(x.shape), "FP32")
        given.set_data_from_numpy(x, binary_data=False)
        response = await client.infer(url, InferRequest(model, [given]), model_name=model)
        (output,) = response.outputs
        assert output.name == "y"
        np.testing.assert_allclose(output.as_numpy(), 2 * x + 1, rtol=1e-6)
    finally:
        await client.close()
    print("kserve ok")

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_kserve_sdk_live_ready_infer(pod):
    session = [sys.executable, "-c", KSERVE_SESSION, pod.url, ISVC, str(FEATURES)]
    result = subprocess.run(session, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "kserve ok" in result.stdout, result.stdout + result.stderr


def test_the_scaling_metrics_are_where_the_runtime_says(pod):
    """Prometheus scrapes the runtime's annotated port and path; KEDA's query names a metric there."""
    import urllib.request

    (runtime,) = manifests("clusterservingruntime.yaml")
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(runtime_container()["ports"][0]["containerPort"])
    with urllib.request.urlopen(pod.url + annotations["prometheus.kserve.io/path"], timeout=10) as response:
        exposition = response.read().decode()
    served = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE")}
    scaled = [doc for doc in manifests("keda-scaledobject.yaml") if doc["kind"] == "ScaledObject"]
    for trigger in scaled[0]["spec"]["triggers"]:
        assert trigger["metadata"]["metricName"] in served, served
        assert trigger["metadata"]["metricName"] + "{" in trigger["metadata"]["query"]


def test_a_folder_of_several_models_serves_each_by_its_file_name(bucket, tmp_path):
    """A storageUri naming a folder: the initializer links every file; an .onnx compiles at start."""
    (bucket_dir := tmp_path / "bucket").mkdir()
    (bucket_dir / "first.fia").symlink_to(bucket / "tiny.fia")
    tiny_onnx(bucket_dir / "second.onnx")
    model_dir = tmp_path / "mnt-models"
    assert storage_initialize(f"file://{bucket_dir}", model_dir) == ["first.fia", "second.onnx"]
    args, environ = render(runtime_container(), ISVC)
    pod = Pod(args, environ, model_dir, tmp_path / "cache")
    try:
        pod.wait_ready()
        client = triton.InferenceServerClient(pod.url.removeprefix("http://"))
        x = sample(1)
        for name in ("first", "second"):
            given = triton.InferInput("x", list(x.shape), "FP32")
            given.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer(name, [given]).as_numpy("y"), 2 * x + 1, rtol=1e-6)
        with pytest.raises(triton.InferenceServerException, match="no model named 'tiny'"):
            client.get_model_metadata(ISVC)
        client.close()
    finally:
        assert pod.stop() == 0, pod.log()


def test_an_empty_model_folder_ends_the_start_with_why(tmp_path):
    (model_dir := tmp_path / "mnt-models").mkdir()
    (model_dir / "README.txt").write_text("not a model")
    args, environ = render(runtime_container(), ISVC)
    pod = Pod(args, environ, model_dir, tmp_path / "cache")
    assert pod.process.wait(timeout=60) == 1
    pod.stop()
    assert f"model 'tiny': no .fia or .onnx file in the folder {model_dir}" in pod.log()


def infer_body(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_sigterm_under_load_loses_no_request(pod):
    """A rolling update as Kubernetes does it: SIGTERM; the endpoints controller notices the failed
    readiness probe and stops routing; meanwhile requests still come and are served; a request
    whose body is still arriving when the listener closes is drained, not cut."""
    import aiohttp

    delay_s = float(next(arg.split("=")[1] for arg in pod.command if arg.startswith("--shutdown-delay-s=")))
    assert delay_s > 0
    routed = asyncio.Event()  # set: the "load balancer" still sends here
    routed.set()
    answers: list[tuple[int, float]] = []  # (status, time)
    not_ready_at: list[float] = []
    x = sample(2, seed=3)
    expected = (2 * x + 1).ravel()

    async def client(session: aiohttp.ClientSession) -> None:
        while routed.is_set():
            async with session.post(f"/v2/models/{ISVC}/infer", data=infer_body(x)) as response:
                body = await response.json()
                answers.append((response.status, time.monotonic()))
                assert response.status == 200, body
                np.testing.assert_allclose(body["outputs"][0]["data"], expected, rtol=1e-6)

    async def endpoints_controller(session: aiohttp.ClientSession) -> None:
        """Probes readiness as the kubelet does; a failure takes the pod out of the endpoints."""
        while True:
            async with session.get("/v2/health/ready") as response:
                if response.status == 503:
                    not_ready_at.append(time.monotonic())
                    await asyncio.sleep(delay_s / 4)  # the lag before every proxy has the news
                    routed.clear()
                    return
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession(pod.url) as session:
        load = [asyncio.create_task(client(session)) for _ in range(4)]
        controller = asyncio.create_task(endpoints_controller(session))
        while len(answers) < 20:
            await asyncio.sleep(0.05)
        slow = await asyncio.open_connection("127.0.0.1", pod.http_port)
        body = infer_body(x)
        pod.terminate()
        await asyncio.gather(controller, *load)

        # A request arriving by halves, across the moment the listener closes.
        reader, writer = slow
        head = f"POST /v2/models/{ISVC}/infer HTTP/1.1\r\nHost: pod\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body[: len(body) // 2])
        await writer.drain()
        await wait_until_refused(pod.http_port, timeout_s=delay_s + 30)
        writer.write(body[len(body) // 2 :])
        status_line = await asyncio.wait_for(reader.readline(), 30)
        reply = await asyncio.wait_for(reader.read(), 30)
        writer.close()

    assert status_line.startswith(b"HTTP/1.1 200"), (status_line + reply, pod.log()[-3000:])
    assert b"Connection: close" in reply  # draining: the client's next request goes elsewhere
    np.testing.assert_allclose(json.loads(reply.split(b"\r\n\r\n", 1)[1])["outputs"][0]["data"], expected, rtol=1e-6)
    assert await asyncio.to_thread(pod.process.wait, 60) == 0, pod.log()
    assert {status for status, _ in answers} == {200}
    # Requests kept coming, and were served, after readiness had failed.
    assert any(at > not_ready_at[0] for _, at in answers), "no request was served while draining"
    assert "draining: readiness fails" in pod.log()


async def wait_until_refused(port: int, timeout_s: float) -> None:
    """Until a connection to ``port`` is refused: the listener is closed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await asyncio.sleep(0.05)
    raise AssertionError(f"port {port} still accepts after {timeout_s} s")
