"""GPU workers without a GPU: device lists, batch limits, the copy plan (with a fake device), and a
server whose workers own cuda:0 and cuda:1 serving an echo model (which never touches the GPU)."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest

from fastinfer.config import Config, ConfigError
from fastinfer.server.main import Server
from fastinfer.signature import BatchLayout, ModelSignature, TensorSpec
from fastinfer.worker.cuda import CudaBatches, parse_device
from fastinfer.worker.model import LoadedModel, load_model


def test_devices_name_gpus_one_worker_each():
    assert Config(devices="cuda:0,cuda:1").device_list() == ["cuda:0", "cuda:1"]
    assert Config(devices="cuda:0").worker_count() == 1
    assert Config(devices="cpu:3").device_list() == ["cpu"] * 3
    for bad in ("cuda", "cuda:x", "cuda:0,cuda:0", "cpu:2,cuda:0", "gpu:0", "cuda:0,cpu:1"):
        with pytest.raises(ConfigError, match="--devices expects"):
            Config(devices=bad).device_list()


def test_gpu_workers_prefer_large_batches():
    assert Config(devices="cpu:2", batch_max_size=8, batch_max_delay_s=0.0).batch_limits() == (8, 0.0)
    gpu = Config(devices="cuda:0", gpu_batch_max_size=32, gpu_batch_max_delay_s=0.003)
    assert gpu.batch_limits() == (32, 0.003)
    assert Config(devices="cuda:0").batch_limits() == (64, 0.002)


def test_parse_device():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda:3") == ("cuda", 3)
    with pytest.raises(ValueError):
        parse_device("cuda")


class FakeDevice:
    """Device tensors are numpy arrays; every allocation and copy is recorded."""

    def __init__(self):
        self.allocations: list[tuple[tuple[int, ...], str]] = []
        self.copies: list[str] = []

    def empty(self, shape, dtype):
        self.allocations.append((tuple(shape), dtype))
        return np.full(shape, -1, dtype)

    def upload(self, device_tensor, host):
        assert device_tensor.shape == host.shape
        device_tensor[...] = host
        self.copies.append("in")

    def download(self, device_tensor, host):
        host[...] = device_tensor
        self.copies.append("out")


def test_copy_plan_allocates_inputs_once_per_batch_size():
    device = FakeDevice()
    specs = (TensorSpec("x", "float32", (2,)), TensorSpec("k", "int64", (1,)))
    mains = {None: lambda x, k: (x * 2, k + 1)}
    batches = CudaBatches(mains, specs, device)
    for rows in (4, 1, 4, 4, 1):
        x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        k = np.arange(rows, dtype=np.int64).reshape(rows, 1)
        out = [np.zeros((rows, 2), np.float32), np.zeros((rows, 1), np.int64)]
        batches.run_into([x, k], out)
        np.testing.assert_array_equal(out[0], x * 2)
        np.testing.assert_array_equal(out[1], k + 1)
    assert device.allocations == [((4, 2), "float32"), ((4, 1), "int64"), ((1, 2), "float32"), ((1, 1), "int64")]
    assert device.copies == ["in", "in", "out", "out"] * 5


def test_copy_plan_picks_the_library_of_the_batch_size():
    device = FakeDevice()
    spec = (TensorSpec("x", "float32", (1,)),)
    batches = CudaBatches({1: lambda x: x + 1, 8: lambda x: x + 8}, spec, device)
    out = np.zeros((8, 1), np.float32)
    batches.run_into([np.zeros((8, 1), np.float32)], [out])
    assert (out == 8).all()
    with pytest.raises(ValueError, match="no library for batch size 4"):
        batches.run_into([np.zeros((4, 1), np.float32)], [np.zeros((4, 1), np.float32)])


class WritingRuntime:
    """A GPU-like runtime: it writes its outputs into the slot itself (``run_into``)."""

    writes_outputs = True
    inputs = (TensorSpec("x", "float32", (3,)),)
    outputs = (TensorSpec("y", "float32", (3,)),)
    batch_sizes = (1, 4)

    def __init__(self):
        self.shapes: list[tuple] = []

    def load(self):
        pass

    def run(self, inputs):
        return [inputs[0] + 1]

    def run_into(self, inputs, outputs):
        self.shapes.append((inputs[0].shape, outputs[0].shape))
        outputs[0][...] = inputs[0] + 1


def test_run_batch_lets_a_gpu_runtime_write_the_slot():
    runtime = WritingRuntime()
    signature = ModelSignature("w", runtime.inputs, runtime.outputs, None, 0, runtime.batch_sizes)
    model = LoadedModel(signature, runtime)  # type: ignore[arg-type]
    layout = BatchLayout.for_slot(signature, 4, 4096)
    slot = memoryview(bytearray(4096))
    layout.input_array(slot, 0, 4)[:3] = np.arange(9, dtype=np.float32).reshape(3, 3)
    reply = model.run_batch(layout, slot, 3, [None] * 3)
    assert reply["errors"] == [None] * 3
    assert runtime.shapes == [((4, 3), (4, 3))]  # padded to the compiled size, straight into the slot
    np.testing.assert_array_equal(layout.output_array(slot, 0, 3), np.arange(9).reshape(3, 3) + 1)


def test_a_gpu_worker_refuses_an_onnx_file(tmp_path):
    with pytest.raises(Exception, match="GPU worker serves archives"):
        load_model(
            "m", str(tmp_path / "m.onnx"), cache_dir=str(tmp_path), num_cores=1, max_image_pixels=1, device="cuda:0"
        )


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_one_worker_per_gpu_named(tmp_path):
    config = Config(
        http_port=0,
        management_port=0,
        binary_port=0,
        grpc_port=0,
        cache_dir=str(tmp_path),
        models=("echo=echo:float32:4",),
        devices="cuda:0,cuda:1",
        gpu_batch_max_size=16,
        shm_slot_bytes=1 << 20,
        max_body_bytes=1 << 20,
        shm_slots_per_worker=4,
    )
    server = Server(config)
    await server.start()
    try:
        await server.wait_ready(60)
        workers = server.supervisor.workers
        assert [w._init["device"] for w in workers] == ["cuda:0", "cuda:1"]
        assert server.supervisor.batcher.batch_max_size == 16
        payload = np.arange(4, dtype="<f4")
        url = f"http://127.0.0.1:{server.http_port}/predictions/echo"
        async with aiohttp.ClientSession() as http, http.post(url, data=payload.tobytes()) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert body["outputs"][0]["data"] == payload.tolist()
    finally:
        await server.stop()
