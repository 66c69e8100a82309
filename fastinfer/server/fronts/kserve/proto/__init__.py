"""The v2 gRPC messages (``inference.*``), from a descriptor pool of fastinfer's own.

protoc's ``*_pb2.py`` modules would register ``inference.*`` in protobuf's default pool, where
tritonclient.grpc and the kserve SDK register the same names: whichever comes second fails to
import. A pool of our own lets the server live beside either in one process. ``descriptor.py`` is
generated from ``open_inference_grpc.proto`` by ``scripts/gen_grpc_descriptor.py``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from fastinfer.server.fronts.kserve.proto.descriptor import SERIALIZED

SERVICE = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
_pool.Add(descriptor_pb2.FileDescriptorProto.FromString(SERIALIZED))


def message(name: str) -> Any:
    """The message class ``inference.<name>``."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


def methods() -> dict[str, tuple[Any, Any]]:
    """Each RPC of the service by name, with its request and response classes."""
    service = _pool.FindServiceByName(SERVICE)
    return {
        method.name: (
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )
        for method in service.methods
    }
