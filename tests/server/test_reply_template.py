"""A reply built from a model's encoded-once template is the frame the general path encodes."""

import numpy as np
import pytest

from fastinfer.protocol import FrameType, Request, encode_frame
from fastinfer.protocol.frames import TensorDescriptor
from fastinfer.server.batcher import RowResult
from fastinfer.server.fronts.binary import ReplyTemplate, _envelope
from fastinfer.signature import ModelSignature, TensorSpec

SIGNATURE = ModelSignature(
    "two",
    (TensorSpec("x", "float32", (3,)),),
    (TensorSpec("logits", "float32", (5,)), TensorSpec("ids", "int64", (2, 3)), TensorSpec("flag", "uint8", (1,))),
)


@pytest.mark.parametrize("wanted", [None, ("ids",), ("flag", "logits")])
def test_template_frame_equals_the_general_encoding(wanted):
    request = Request("two", (TensorDescriptor("x", "float32", (1, 3), 0, 12),), outputs=wanted)
    rng = np.random.default_rng(0)
    outputs = [
        rng.random(5).astype(np.float32),
        rng.integers(0, 100, (2, 3)).astype(np.int64),
        np.array([7], np.uint8),
    ]
    template = ReplyTemplate.build(SIGNATURE, request)
    assert template is not None
    general = encode_frame(FrameType.RESPONSE, 77, *_envelope(SIGNATURE, request, [RowResult(outputs, None)]))
    assert b"".join(template.frame(77, outputs)) == b"".join(bytes(part) for part in general)
