"""Shared fixtures: both event loops, a compiled-model cache shared by the session, test photos, a
tuning builder in the test's own process, and the convolutions of a mobile network, small."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import uvloop
from onnx import TensorProto, helper, numpy_helper


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on plain asyncio and on uvloop."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One compiled-model cache for the whole session, so each model compiles once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def photos() -> Path:
    """scikit-image's sample photos: chelsea.png is a cat, coffee.png an espresso."""
    import skimage

    return Path(os.path.dirname(skimage.__file__)) / "data"


@contextlib.asynccontextmanager
async def running_server(tmp_path: Path, **settings) -> AsyncIterator:
    """A server in this process on free ports, its workers real processes; once stopped, it must
    have left no shared memory behind (what an earlier test left is that test's failure, not this one's)."""
    from fastinfer.config import Config
    from fastinfer.server.main import Server

    defaults = {"http_port": 0, "management_port": 0, "binary_port": 0, "grpc_port": 0, "worker_start_timeout_s": 60}
    server = Server(Config(**{**defaults, "cache_dir": str(tmp_path), **settings}))
    before = fastinfer_segments()
    await server.start()
    try:
        await server.wait_ready(60)
        yield server
    finally:
        await server.stop()
    assert fastinfer_segments() <= before, "shared memory left behind"


def fastinfer_segments(pid: int | None = None) -> set[str]:
    """The slot memory process ``pid`` (default: this one, for in-process servers) holds open:
    descriptors of fastinfer's anonymous memory file. Named segments would show in /dev/shm;
    there must be none."""
    from fastinfer.shm import MEMFD_NAME

    assert not [name for name in os.listdir("/dev/shm") if name.startswith("fastinfer-")], "a named segment"
    fds = Path(f"/proc/{os.getpid() if pid is None else pid}/fd")
    held: set[str] = set()
    if not fds.exists():
        return held  # the process is gone, and its memory with it
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(fds / fd).startswith(f"/memfd:{MEMFD_NAME}"):
                held.add(fd)
    return held


LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_input(model: onnx.ModelProto) -> np.ndarray:
    """The input the light models' expected outputs were computed from (onnx's backend test runner)."""
    initializers = {init.name for init in model.graph.initializer}
    (value,) = [v for v in model.graph.input if v.name not in initializers]
    shape = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
    count = int(np.prod(shape))
    return (np.arange(count).reshape(shape) / count).astype(np.float32)


def expected_output(name: str) -> np.ndarray:
    """The output shipped beside ``light_{name}.onnx``."""
    return numpy_helper.to_array(TensorProto.FromString((LIGHT / f"light_{name}_output_0.pb").read_bytes()))


class InProcessBuilder:
    """The tuner's builder (BuilderInput in, artifact paths out), with MetaSchedule's own build and
    export functions, in this process: no worker processes to start, each of which imports TVM's
    tensor intrinsics first (tens of seconds)."""

    def build(self, inputs: list) -> list:
        from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

        return [
            SimpleNamespace(artifact_path=default_export(default_build(item.mod, item.target, None))) for item in inputs
        ]

    def close(self) -> None:
        pass


@pytest.fixture
def in_process_builder() -> InProcessBuilder:
    return InProcessBuilder()


def mobile_block(rng: np.random.Generator, pointwise_channels: int, output: str) -> tuple[list, list]:
    """The nodes and weights of what EfficientNet-Lite0 is made of, small, on an input ``x`` of 3
    channels: a strided 3x3 convolution with ReLU6 (Clip with constant bounds, which the ONNX frontend
    lowers to TIR calls) into ``r1``, a depthwise 3x3 with ReLU6 into ``r2``, and a 1x1 convolution of
    ``pointwise_channels`` into ``output``. Weights come from ``rng`` in that order."""

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["d1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["d1", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "wp", "bp"], [output], kernel_shape=[1, 1]),
    ]
    initializers = [
        weight("w1", 8, 3, 3, 3),
        weight("b1", 8),
        weight("wd", 8, 1, 3, 3),
        weight("wp", pointwise_channels, 8, 1, 1),
        weight("bp", pointwise_channels),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    return nodes, initializers
