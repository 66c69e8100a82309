"""``fastinfer bench`` against a real server: both protocols, pipelined or not, answers counted."""

import pytest
from conftest import running_server

from fastinfer.bench import bench


@pytest.fixture
async def server(tmp_path):
    models = ("echo=echo:float32:16", "slow=echo:float32:16:0.05")
    async with running_server(tmp_path, models=models, binary_socket=str(tmp_path / "binary.sock")) as server:
        yield server


@pytest.mark.parametrize("scheme, pipeline", [("http", 1), ("tcp", 1), ("tcp", 4), ("unix", 2)])
async def test_bench_counts_answers_within_the_window(server, scheme, pipeline):
    url = {
        "http": f"http://127.0.0.1:{server.http_port}",
        "tcp": f"tcp://127.0.0.1:{server.binary.port}",
        "unix": f"unix://{server.config.binary_socket}",
    }[scheme]
    protocol = "http" if scheme == "http" else "binary"
    options = {"shape": (1, 16), "input_name": "input", "pipeline": pipeline}
    result = await bench(url, "echo", concurrency=8, duration_s=0.5, **options)
    assert (result.protocol, result.errors) == (protocol, 0)
    assert result.requests > 8 and result.throughput_rps == result.requests / 0.5
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms


async def test_bench_latency_follows_the_model(server):
    url = f"tcp://127.0.0.1:{server.binary.port}"
    result = await bench(url, "slow", concurrency=1, duration_s=0.5, shape=(1, 16), input_name="input")
    assert 50 <= result.p50_ms < 200
    assert 2 <= result.requests <= 10


async def test_bench_counts_errors(server):
    url = f"tcp://127.0.0.1:{server.binary.port}"
    result = await bench(url, "echo", concurrency=2, duration_s=0.3, shape=(1, 8), input_name="input")
    assert result.requests == 0 and result.errors > 0  # 8 floats where the model takes 16
