"""GPU twins of the archive serving tests: a CUDA SqueezeNet served by a worker that owns cuda:0.

Skipped where TVM sees no CUDA device; scripts/device-check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import numpy as np
import onnx
import pytest
from conftest import LIGHT, expected_output, light_input
from gpu_models import cuda_compiler, needs_gpu, prebuilt

from fastinfer.archive.pack import BuildOptions, build_archive
from fastinfer.config import Config
from fastinfer.server.main import Server

pytestmark = needs_gpu


@pytest.fixture(scope="module")
def cuda_squeezenet(tmp_path_factory) -> Path:
    built = prebuilt("squeezenet")
    if built is not None:
        return built
    if cuda_compiler() is None:
        pytest.skip("no CUDA compiler here and no prebuilt squeezenet.fia (FASTINFER_GPU_ARCHIVES)")
    output = tmp_path_factory.mktemp("gpu") / "sq.fia"
    cache = tmp_path_factory.mktemp("gpu-cache")
    build_archive(
        LIGHT / "light_squeezenet.onnx",
        output,
        BuildOptions(name="squeezenet", target="cuda", batch_sizes=(1, 2, 4, 8, 16), cache_dir=str(cache)),
    )
    return output


def gpu_config(tmp_path: Path, **fields) -> Config:
    return Config(
        http_port=0,
        management_port=0,
        binary_port=0,
        grpc_port=0,
        cache_dir=str(tmp_path / "cache"),
        devices="cuda:0",
        shm_slot_bytes=16 << 20,
        max_body_bytes=4 << 20,
        shm_slots_per_worker=8,
        gpu_batch_max_size=16,
        worker_start_timeout_s=120,
        **fields,
    )


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_serve_a_cuda_archive(cuda_squeezenet, tmp_path):
    server = Server(gpu_config(tmp_path, models=(f"sq={cuda_squeezenet}",)))
    await server.start()
    try:
        await server.wait_ready(120)
        sample = light_input(onnx.load(str(LIGHT / "light_squeezenet.onnx")))
        expected = expected_output("squeezenet")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:

            async def one() -> np.ndarray:
                async with http.post(
                    "/predictions/sq",
                    data=sample.astype("<f4").tobytes(),
                    headers={"Content-Type": "application/octet-stream"},
                ) as response:
                    assert response.status == 200, await response.text()
                    (output,) = (await response.json())["outputs"]
                return np.asarray(output["data"], np.float32).reshape(expected.shape)

            for got in [await one(), *await asyncio.gather(*(one() for _ in range(24)))]:  # batches of several sizes
                np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    finally:
        await server.stop()
