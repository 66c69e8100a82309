"""KServe v2 over gRPC on a live server: tritonclient.grpc (sync, aio, and its generated stub for
typed contents), the kserve SDK's InferenceGRPCClient (in a process of its own: it registers the
same protobuf names as tritonclient), errors with their gRPC codes, deadlines and tokens."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from conftest import running_server
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from fastinfer.server.fronts.kserve.grpc_service import peer_host
from fastinfer.server.fronts.kserve.sysshm import is_local

MODELS = ("echo=echo:float32:16", "ints=echo:int32:4", "slow=echo:float32:4:0.5")
SETTINGS = {"shm_slot_bytes": 1 << 16, "shm_slots_per_worker": 32, "max_body_bytes": 1 << 16, "batch_max_size": 4}


@pytest.fixture
async def server(tmp_path):
    async with running_server(tmp_path, models=MODELS, grpc_port=-1, **SETTINGS) as server:
        yield server


def fp32(array: np.ndarray, module=triton) -> list:
    tensor = module.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return [tensor]


def sync_session(url: str) -> None:
    client = triton.InferenceServerClient(url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("echo") and client.is_model_ready("echo", "1")
        metadata = client.get_server_metadata()
        assert metadata.name == "fastinfer" and "system_shared_memory" not in metadata.extensions
        model = client.get_model_metadata("echo", as_json=True)
        assert model["versions"] == ["1"]
        assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "16"]}]
        rng = np.random.default_rng(0)
        for batch in (1, 3, 4, 9):  # 9 samples of a model batched by 4: split over batches
            data = rng.standard_normal((batch, 16)).astype(np.float32)
            outputs = [triton.InferRequestedOutput("output")]
            result = client.infer("echo", fp32(data), outputs=outputs, request_id=f"r{batch}")
            np.testing.assert_array_equal(result.as_numpy("output"), data)
            response = result.get_response()
            assert response.id == f"r{batch}" and response.model_name == "echo" and response.model_version == "1"
        ints = triton.InferInput("input", [2, 4], "INT32")
        ints.set_data_from_numpy(np.arange(8, dtype=np.int32).reshape(2, 4) - 3)
        np.testing.assert_array_equal(client.infer("ints", [ints]).as_numpy("output"), np.arange(8).reshape(2, 4) - 3)

        def code_of(call) -> grpc.StatusCode:
            with pytest.raises(InferenceServerException) as caught:
                call()
            return caught.value.status(), caught.value.message()

        data = np.zeros((1, 16), np.float32)
        status, message = code_of(lambda: client.infer("nope", fp32(data)))
        assert status == "StatusCode.NOT_FOUND" and "no model named 'nope'" in message
        status, message = code_of(lambda: client.infer("echo", fp32(data), model_version="2"))
        assert status == "StatusCode.NOT_FOUND" and "no version '2'" in message
        status, message = code_of(lambda: client.infer("echo", fp32(np.zeros((1, 15), np.float32))))
        assert status == "StatusCode.INVALID_ARGUMENT" and "input" in message
        bad = triton.InferInput("input", [1, 16], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 16), np.int32))
        status, message = code_of(lambda: client.infer("echo", [bad]))
        assert status == "StatusCode.INVALID_ARGUMENT" and 'input "input" is INT32 but the model takes FP32' in message
        status, message = code_of(
            lambda: client.infer("echo", fp32(data), outputs=[triton.InferRequestedOutput("nope")])
        )
        assert status == "StatusCode.INVALID_ARGUMENT" and 'unknown output "nope"' in message
        status, message = code_of(lambda: client.get_model_metadata("nope"))
        assert status == "StatusCode.NOT_FOUND"
        # Past the message limit (max_body_bytes): grpc's own RESOURCE_EXHAUSTED.
        status, message = code_of(lambda: client.infer("echo", fp32(np.zeros((1100, 16), np.float32))))
        assert status == "StatusCode.RESOURCE_EXHAUSTED"
        # The deadline: a model that takes 0.5 s, a call that allows 0.1 s.
        slow = triton.InferInput("input", [1, 4], "FP32")
        slow.set_data_from_numpy(np.ones((1, 4), np.float32))
        status, message = code_of(lambda: client.infer("slow", [slow], client_timeout=0.1))
        assert status == "StatusCode.DEADLINE_EXCEEDED"
        np.testing.assert_array_equal(client.infer("slow", [slow], client_timeout=30).as_numpy("output"), 1)
    finally:
        client.close()


async def test_tritonclient_grpc_sync(server):
    await asyncio.to_thread(sync_session, f"127.0.0.1:{server.grpc.port}")
    pool = server.supervisor.pool
    async with asyncio.timeout(10):
        while pool.free_count != pool.slot_count:  # the expired request's batch returns when it ends
            await asyncio.sleep(0.05)


async def test_tritonclient_grpc_aio_concurrent(server):
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.grpc.port}")
    try:
        assert await client.is_server_ready()

        async def one(i: int) -> None:
            data = np.arange((1 + i % 3) * 16, dtype=np.float32).reshape(-1, 16) * (i + 1)
            result = await client.infer("echo", fp32(data, triton_aio))
            np.testing.assert_array_equal(result.as_numpy("output"), data)

        await asyncio.gather(*(one(i) for i in range(16)))
        with pytest.raises(InferenceServerException, match="no model named"):
            await client.get_model_metadata("nope")
    finally:
        await client.close()
    counted = server.supervisor.metrics.requests
    assert counted[("echo", "grpc", "ok")] == 16


def typed_and_raw_session(port: int) -> None:
    """tritonclient's generated stub, to send typed contents (its client sends raw ones only)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="ints", id="typed")
        tensor = request.inputs.add(name="input", datatype="INT32", shape=[2, 4])
        tensor.contents.int_contents.extend(range(-4, 4))
        response = stub.ModelInfer(request)
        assert response.id == "typed" and response.outputs[0].shape == [2, 4]
        output = np.frombuffer(response.raw_output_contents[0], "<i4")
        np.testing.assert_array_equal(output, np.arange(-4, 4))

        for break_it, words in [
            (lambda r: r.inputs[0].contents.int_contents.append(1), "contents.int_contents has 9"),
            (lambda r: r.raw_input_contents.append(b"\0" * 32), "give one kind"),
            (lambda r: setattr(r.inputs[0], "datatype", "INT8"), "is INT8 but the model takes INT32"),
        ]:
            broken = service_pb2.ModelInferRequest()
            broken.CopyFrom(request)
            break_it(broken)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(broken)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in caught.value.details()
        out_of_range = service_pb2.ModelInferRequest(model_name="echo")
        wide = out_of_range.inputs.add(name="input", datatype="FP32", shape=[1, 16])
        wide.contents.fp32_contents.extend([0.5] * 16)
        response = stub.ModelInfer(out_of_range)
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), 0.5)


async def test_typed_contents_through_tritonclients_stub(server):
    await asyncio.to_thread(typed_and_raw_session, server.grpc.port)


KSERVE_SESSION = """
import sys, numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
async def main(port):
    client = InferenceGRPCClient(f"127.0.0.1:{port}")
    assert await client.is_server_live() and await client.is_server_ready()
    assert await client.is_model_ready("echo")
    for binary in (False, True):  # typed contents, then raw contents
        data = np.arange(32, dtype=np.float32).reshape(2, 16) * (1 + binary)
        tensor = InferInput("input", [2, 16], "FP32")
        tensor.set_data_from_numpy(data, binary_data=binary)
        response = await client.infer(InferRequest("echo", infer_inputs=[tensor], request_id="k"))
        np.testing.assert_array_equal(response.outputs[0].as_numpy(), data)
    try:
        await client.infer(InferRequest("nope", infer_inputs=[tensor]))
    except Exception as error:
        print("error:", getattr(error, "code", lambda: None)(), error)
    await client.close()
    print("kserve ok")
import asyncio; asyncio.run(main(int(sys.argv[1])))
"""


async def test_kserve_sdk_grpc_client(server):
    """The kserve SDK registers ``inference.*`` in protobuf's default pool, as tritonclient does
    here: it runs as a client process of its own."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KSERVE_SESSION, str(server.grpc.port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = (await asyncio.wait_for(process.communicate(), 120))[0].decode()
    assert process.returncode == 0, output
    assert "kserve ok" in output
    assert "StatusCode.NOT_FOUND" in output and "no model named 'nope'" in output


async def test_tokens_from_metadata(tmp_path):
    settings = {**SETTINGS, "inference_token": "s3cret"}
    async with running_server(tmp_path, models=MODELS[:1], grpc_port=-1, **settings) as server:

        def session() -> None:
            url = f"127.0.0.1:{server.grpc.port}"
            client = triton.InferenceServerClient(url)
            assert client.is_server_live() and client.is_server_ready()  # health: open
            data = np.ones((1, 16), np.float32)
            for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("echo", fp32(data), headers=headers)
                assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException, match="authorization"):
                client.get_model_metadata("echo")
            good = {"authorization": "Bearer s3cret"}
            np.testing.assert_array_equal(client.infer("echo", fp32(data), headers=good).as_numpy("output"), data)
            client.close()

        await asyncio.to_thread(session)


async def test_grpc_port_off_and_taken(tmp_path):
    from fastinfer.config import Config
    from fastinfer.errors import StartupError
    from fastinfer.server.main import Server

    async with running_server(tmp_path, models=MODELS[:1], grpc_port=-1, **SETTINGS) as server:
        taken = server.grpc.port
        other = Server(
            Config(
                http_port=0,
                management_port=0,
                binary_port=0,
                grpc_port=taken,
                models=MODELS[:1],
                cache_dir=str(tmp_path),
            )
        )
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{taken}"):
            await other.start()
    async with running_server(tmp_path, models=MODELS[:1], **SETTINGS) as server:
        assert server.grpc.port == 0


def test_peers():
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/run/x.sock") is None
    assert is_local("127.0.0.1") and is_local("::1") and is_local(None) and is_local("::ffff:127.0.0.1")
    assert not is_local("10.0.0.1") and not is_local("unknown") and not is_local("::ffff:10.0.0.1")


def test_no_pb2_module_in_the_default_pool():
    """The server's messages live in a pool of their own: importing it beside tritonclient.grpc
    (already imported here) and loading every message does not clash."""
    from fastinfer.server.fronts.kserve import proto

    assert len(proto.methods()) == 9
    assert proto.message("ModelInferRequest").DESCRIPTOR.file.pool is not service_pb2.DESCRIPTOR.pool
    assert os.path.basename(Path(proto.__file__).parent) == "proto"


async def test_an_aborted_call_keeps_no_frame_of_the_request():
    """gRPC keeps the exception ``context.abort`` raises for as long as the call lives. Raised while
    the request's error was being handled, it chained that error's traceback: the request's frames,
    their views of the slot memory with them, so the memory stayed mapped after the server stopped."""
    from fastinfer.config import Config
    from fastinfer.errors import DeadlineExceeded
    from fastinfer.server.fronts.kserve.grpc_service import GrpcFront

    class Context:
        raised: BaseException | None = None

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.code, self.details = code, details
            self.raised = grpc.aio.AbortError()
            raise self.raised

    async def failing(request, response, context):
        raise DeadlineExceeded("too late")

    context = Context()
    handle = GrpcFront(None, Config())._handler("ModelInfer", failing, object)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AbortError):
        await handle(object(), context)
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED and context.details == "too late"
    assert context.raised is not None and context.raised.__context__ is None and context.raised.__cause__ is None
