"""How a batch maps onto the compiled batch sizes: padded up, or run in several runs."""

import time

import numpy as np
import pytest

from fastinfer.signature import BatchLayout, ModelSignature, TensorSpec, cheapest_runs
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


@pytest.mark.parametrize(
    ("batch_sizes", "costs", "rows", "runs"),
    [
        # the default model on one core: a run of 8 costs more than 7 runs of 1
        ((1, 8), {1: 1.0, 8: 7.5}, 2, [(0, 1), (1, 1)]),
        ((1, 8), {1: 1.0, 8: 7.5}, 7, [(0, 1)] + [(i, 1) for i in range(1, 7)]),
        ((1, 8), {1: 1.0, 8: 7.5}, 8, [(0, 8)]),
        ((1, 8), {1: 1.0, 8: 7.5}, 9, [(0, 8), (8, 1)]),
        # a GPU: a run of 8 costs little more than a run of 1
        ((1, 8), {1: 1.0, 8: 1.5}, 2, [(0, 8)]),
        ((1, 4, 8), {1: 1.0, 4: 2.0, 8: 5.0}, 8, [(0, 4), (4, 4)]),
        ((1, 4, 8), {1: 1.0, 4: 2.0, 8: 5.0}, 5, [(0, 4), (4, 1)]),
        # never more rows than the layout has room for (the greedy plan's padding)
        ((4,), {4: 1.0}, 5, [(0, 4), (4, 4)]),
        ((2, 3), {2: 1.0, 3: 1.0}, 4, [(0, 2), (2, 2)]),
        # no costs measured: the greedy plan
        ((1, 8), {}, 2, [(0, 8)]),
    ],
)
def test_cheapest_runs_by_measured_costs(batch_sizes, costs, rows, runs):
    sig = signature(batch_sizes)
    plan = cheapest_runs(sig, rows, costs)
    assert plan == runs
    assert plan[-1][0] + plan[-1][1] <= sig.padded(rows)
    assert [start for start, _ in plan] == list(np.cumsum([0] + [size for _, size in plan[:-1]]))


def test_warm_up_times_every_compiled_size_and_batches_run_the_cheapest_plan():
    class Timed(AlignedOnlyRuntime):
        def run(self, inputs):  # a run of 8 rows costs far more than 8 runs of 1 would
            if len(inputs[0]) == 8:
                time.sleep(0.02)
            return super().run(inputs)

    runtime = Timed((1, 8))
    model = LoadedModel(signature((1, 8)), runtime)  # type: ignore[arg-type]
    model.warm_up(8)
    assert set(model.run_costs) == {1, 8} and model.run_costs[8] > model.run_costs[1]
    layout = BatchLayout.for_slot(model.signature, 8, 4096)
    slot = memoryview(aligned_zeros((4096,), "uint8"))
    inputs = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    layout.input_array(slot, 0, 2)[:] = inputs
    runtime.sizes.clear()
    model.run_batch(layout, slot, 2, [None, None])
    assert runtime.sizes == [1, 1]
    np.testing.assert_array_equal(layout.output_array(slot, 0, 2), inputs + 1)
