"""Triton's system shared-memory extension, with tritonclient.utils.shared_memory regions over HTTP
and gRPC; and every refusal: extension off, out-of-bounds windows, unknown regions, fastinfer's own
memory, links out of /dev/shm, and a region the client shrinks after registering it."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
from conftest import running_server
from tritonclient.utils import InferenceServerException

MODELS = ("echo=echo:float32:16",)
SETTINGS = {"shm_slot_bytes": 1 << 16, "shm_slots_per_worker": 8, "max_body_bytes": 1 << 16, "batch_max_size": 4}
ROW = 16 * 4


@pytest.fixture
async def server(tmp_path):
    async with running_server(tmp_path, models=MODELS, grpc_port=-1, allow_client_shm=True, **SETTINGS) as server:
        yield server


@pytest.fixture
def regions():
    """Client regions (POSIX shm objects) made by tritonclient, destroyed after the test."""
    made = []

    def make(byte_size: int) -> tuple[str, object]:
        key = f"/fi-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, byte_size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def opened(key: str) -> int:
    """How many descriptors of this process (client and server both) hold the object open."""
    fds = Path("/proc/self/fd")
    return sum(os.readlink(fds / fd) == f"/dev/shm{key}" for fd in os.listdir(fds) if (fds / fd).exists())


def session(client_module, url: str, make) -> None:
    """Inputs and outputs in client regions, as tritonclient's shm examples do it."""
    client = client_module.InferenceServerClient(url)
    try:
        extensions = client.get_server_metadata()
        extensions = extensions["extensions"] if isinstance(extensions, dict) else list(extensions.extensions)
        assert "system_shared_memory" in extensions
        batch = 3
        data = np.arange(batch * 16, dtype=np.float32).reshape(batch, 16)
        in_key, in_handle = make(64 + data.nbytes)
        out_key, out_handle = make(data.nbytes)
        shm.set_shared_memory_region(in_handle, [data], offset=64)
        client.unregister_system_shared_memory()
        client_fds = opened(in_key)
        client.register_system_shared_memory("in", in_key, data.nbytes + 64)
        client.register_system_shared_memory("out", out_key, data.nbytes)
        assert opened(in_key) == opened(out_key) == client_fds + 1  # the server holds one of each
        status = client.get_system_shared_memory_status()
        if isinstance(status, list):  # HTTP: a list of documents
            described = {r["name"]: (r["key"], r["byte_size"]) for r in status}
        else:  # gRPC: a map by name
            described = {name: (r.key, r.byte_size) for name, r in status.regions.items()}
        assert described == {"in": (in_key, data.nbytes + 64), "out": (out_key, data.nbytes)}
        tensor = client_module.InferInput("input", [batch, 16], "FP32")
        tensor.set_shared_memory("in", data.nbytes, offset=64)
        output = client_module.InferRequestedOutput("output")
        output.set_shared_memory("out", data.nbytes)
        result = client.infer("echo", [tensor], outputs=[output])
        described = result.get_output("output")
        shape = described["shape"] if isinstance(described, dict) else list(described.shape)
        assert shape == [batch, 16]
        np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [batch, 16]), data)

        # Bytes in, region out; and a region in, bytes out.
        shm.set_shared_memory_region(out_handle, [np.zeros_like(data)])
        plain = client_module.InferInput("input", [batch, 16], "FP32")
        plain.set_data_from_numpy(data * 2)
        client.infer("echo", [plain], outputs=[output])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [batch, 16]), data * 2)
        np.testing.assert_array_equal(client.infer("echo", [tensor]).as_numpy("output"), data)

        def refused(call, words: str) -> str:
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert words in caught.value.message(), caught.value.message()
            return caught.value.status()

        # A window that reaches past the registered region.
        past = client_module.InferInput("input", [batch, 16], "FP32")
        past.set_shared_memory("in", data.nbytes, offset=65)
        refused(lambda: client.infer("echo", [past]), "do not fit region 'in'")
        small = client_module.InferRequestedOutput("output")
        small.set_shared_memory("out", data.nbytes - 4)
        refused(lambda: client.infer("echo", [tensor], outputs=[small]), "shared_memory_byte_size")
        unknown = client_module.InferInput("input", [batch, 16], "FP32")
        unknown.set_shared_memory("nope", data.nbytes)
        refused(lambda: client.infer("echo", [unknown]), "no shared-memory region named 'nope'")
        refused(lambda: client.register_system_shared_memory("x", in_key, 1 << 20), "run past the end")
        refused(lambda: client.register_system_shared_memory("in", in_key, 64), "registered already")
        refused(lambda: client.register_system_shared_memory("x", "/fastinfer-slots", 64), "fastinfer's own memory")
        refused(lambda: client.register_system_shared_memory("x", "/proc/self/mem", 64), "POSIX shared-memory name")
        refused(lambda: client.register_system_shared_memory("x", "/fi-absent", 64), "no shared-memory object")

        # The client shrinks its object after registering it: a refusal, not a crash.
        fd = os.open(f"/dev/shm{in_key}", os.O_RDWR)
        os.ftruncate(fd, 16)
        os.close(fd)
        refused(lambda: client.infer("echo", [tensor]), "shrunk after it was registered")
        np.testing.assert_array_equal(client.infer("echo", [plain]).as_numpy("output"), data * 2)

        client.unregister_system_shared_memory("in")
        assert (opened(in_key), opened(out_key)) == (client_fds, client_fds + 1)
        refused(lambda: client.infer("echo", [tensor]), "no shared-memory region named 'in'")
        client.unregister_system_shared_memory()
        assert opened(out_key) == client_fds
    finally:
        client.close()


async def test_http_client_regions(server, regions):
    await asyncio.to_thread(session, thttp, f"127.0.0.1:{server.http_port}", regions)
    pool = server.supervisor.pool
    assert pool.free_count == pool.slot_count


async def test_grpc_client_regions(server, regions, monkeypatch):
    from fastinfer.server.fronts.kserve import inference

    monkeypatch.setattr(inference, "OFF_LOOP_BYTES", 0)  # every region copy in a thread, as large ones go
    await asyncio.to_thread(session, tgrpc, f"127.0.0.1:{server.grpc.port}", regions)


async def test_a_link_out_of_dev_shm_is_refused(server, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    link = f"/dev/shm/fi-test-link-{uuid.uuid4().hex[:8]}"
    os.symlink(secret, link)
    try:

        def call() -> None:
            client = thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
            with pytest.raises(InferenceServerException, match="cannot open shared-memory object") as caught:
                client.register_system_shared_memory("x", "/" + os.path.basename(link), 64)
            assert caught.value.status() == "403"
            client.close()

        await asyncio.to_thread(call)
    finally:
        os.unlink(link)


async def test_the_extension_is_off_by_default(tmp_path, regions):
    key, _handle = regions(ROW)
    client_fds = opened(key)
    async with running_server(tmp_path, models=MODELS, grpc_port=-1, **SETTINGS) as server:

        def call() -> None:
            http = thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
            assert "system_shared_memory" not in http.get_server_metadata()["extensions"]
            with pytest.raises(InferenceServerException, match="client shared memory is off") as caught:
                http.register_system_shared_memory("in", key, ROW)
            assert caught.value.status() == "403"
            tensor = thttp.InferInput("input", [1, 16], "FP32")
            tensor.set_shared_memory("in", ROW)
            with pytest.raises(InferenceServerException, match="client shared memory is off"):
                http.infer("echo", [tensor])
            http.close()
            grpc_client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc.port}")
            with pytest.raises(InferenceServerException, match="client shared memory is off") as caught:
                grpc_client.register_system_shared_memory("in", key, ROW)
            assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
            grpc_client.close()

        await asyncio.to_thread(call)
        assert opened(key) == client_fds
