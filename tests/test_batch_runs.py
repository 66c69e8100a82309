"""How a batch maps onto the compiled batch sizes: padded up, or run in several runs."""

import numpy as np
import pytest

from fastinfer.signature import BatchLayout, ModelSignature, TensorSpec
from fastinfer.worker.model import LoadedModel, aligned_zeros

SPEC = (TensorSpec("x", "float32", (3,)),)  # 12 bytes a sample: rows past the first start off alignment


def signature(batch_sizes):
    return ModelSignature("m", SPEC, (TensorSpec("y", "float32", (3,)),), batch_sizes=batch_sizes)


@pytest.mark.parametrize(
    ("batch_sizes", "rows", "runs"),
    [
        (None, 5, [(0, 5)]),
        ((1,), 1, [(0, 1)]),
        ((1,), 3, [(0, 1), (1, 1), (2, 1)]),
        ((1, 4), 3, [(0, 4)]),
        ((1, 4), 4, [(0, 4)]),
        ((1, 4), 9, [(0, 4), (4, 4), (8, 1)]),
        ((1, 4), 6, [(0, 4), (4, 4)]),
        ((4,), 5, [(0, 4), (4, 4)]),
    ],
)
def test_runs(batch_sizes, rows, runs):
    assert signature(batch_sizes).runs(rows) == runs
    assert signature(batch_sizes).padded(rows) == runs[-1][0] + runs[-1][1]


def test_a_batch_may_hold_more_requests_than_the_largest_compiled_size():
    layout = BatchLayout.for_slot(signature((1,)), 8, 1 << 20)
    assert layout.rows == 8 and layout.max_batch == 8
    layout = BatchLayout.for_slot(signature((4,)), 6, 1 << 20)
    assert layout.rows == 8  # the second run of 4 holds 2 rows and 2 of padding


class AlignedOnlyRuntime:
    """Like TVM on the CPU: refuses inputs not 64-byte aligned; adds 1."""

    def __init__(self, batch_sizes):
        self.batch_sizes = batch_sizes
        self.sizes: list[int] = []

    def run(self, inputs):
        assert inputs[0].ctypes.data % 64 == 0, "not aligned"
        self.sizes.append(len(inputs[0]))
        return [inputs[0] + 1]


class WritingRuntime(AlignedOnlyRuntime):
    """Like a GPU: writes its outputs into the slot itself, which must be aligned too."""

    writes_outputs = True

    def run_into(self, inputs, outputs):
        assert outputs[0].ctypes.data % 64 == 0, "not aligned"
        outputs[0][...] = self.run(inputs)[0]


@pytest.mark.parametrize("runtime_type", [AlignedOnlyRuntime, WritingRuntime])
@pytest.mark.parametrize(("batch_sizes", "rows", "sizes"), [((1,), 5, [1] * 5), ((1, 2), 5, [2, 2, 1])])
def test_a_large_batch_runs_as_several_runs_of_the_compiled_sizes(runtime_type, batch_sizes, rows, sizes):
    runtime = runtime_type(batch_sizes)
    model = LoadedModel(signature(batch_sizes), runtime)  # type: ignore[arg-type]
    layout = BatchLayout.for_slot(model.signature, 8, 4096)
    slot = memoryview(aligned_zeros((4096,), "uint8"))  # shared memory starts aligned
    inputs = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    layout.input_array(slot, 0, rows)[:] = inputs
    reply = model.run_batch(layout, slot, rows, [None] * rows)
    assert reply["errors"] == [None] * rows
    assert runtime.sizes == sizes
    np.testing.assert_array_equal(layout.output_array(slot, 0, rows), inputs + 1)
