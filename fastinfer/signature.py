"""What a model takes and gives, as plain data shared by the front and the workers.

Shapes are per sample: every served model batches along a leading axis that the specs leave out.
A batch travels in one shared-memory slot laid out by ``BatchLayout``: each input's rows, then each
output's rows, every region 64-byte aligned so the worker can hand it to TVM without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fastinfer.errors import BadRequest
from fastinfer.preprocess import ImagePreprocess
from fastinfer.shm import round_up


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of one sample: numpy dtype name and shape without the batch axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class ModelSignature:
    """A served model as the front sees it.

    ``batch_sizes`` lists the batch sizes the compiled code accepts; None means any size (a
    symbolic batch axis). A batch of another size is padded up to the next compiled one; one larger
    than the largest compiled size runs as several runs of that size, the rest padded as any batch.
    Several runs in one batch still share its worker message, its reply and its wake-ups.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: ImagePreprocess | None = None
    top_k: int = 0
    batch_sizes: tuple[int, ...] | None = None

    @property
    def takes_images(self) -> bool:
        return self.preprocess is not None

    def runs(self, rows: int) -> list[tuple[int, int]]:
        """How the compiled code runs a batch of ``rows`` requests: (first row, batch size) per run."""
        if self.batch_sizes is None:
            return [(0, rows)]
        largest = max(self.batch_sizes)
        runs = [(start, largest) for start in range(0, rows - largest + 1, largest)]
        rest = rows % largest
        if rest:
            runs.append((rows - rest, min(size for size in self.batch_sizes if size >= rest)))
        return runs

    def padded(self, rows: int) -> int:
        """The rows the compiled code runs for ``rows`` requests, padding included: what a batch's
        layout makes room for. A plan from measured costs (:func:`cheapest_runs`) never runs more."""
        start, size = self.runs(rows)[-1]
        return start + size

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "top_k": self.top_k,
            "batch_sizes": list(self.batch_sizes) if self.batch_sizes else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelSignature:
        pre = data.get("preprocess")
        preprocess = None
        if pre:
            preprocess = ImagePreprocess(
                resize_shorter=pre["resize_shorter"],
                crop=pre["crop"],
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
                layout=pre["layout"],
            )
        sizes = data.get("batch_sizes")
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            preprocess=preprocess,
            top_k=data.get("top_k", 0),
            batch_sizes=tuple(sizes) if sizes else None,
        )


def samples_of(
    specs: Sequence[TensorSpec],
    given: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    max_samples: int | None = None,
    dtype_name: Callable[[np.dtype], str] = lambda dtype: dtype.name,
) -> int:
    """The number of samples a request's tensors (name, dtype, shape with the batch axis first)
    carry, once checked against the model's inputs: the same names, dtypes and per-sample shapes (a
    negative spec dimension matches any size), and one batch size from 1 to ``max_samples`` (None:
    no bound). BadRequest otherwise. Every front checks tensors here, so the same request gets the
    same answer on each (``dtype_name`` words dtypes in the protocol's vocabulary, as FP32 for KServe)."""
    by_name = {spec.name: spec for spec in specs}
    names = {name for name, _, _ in given}
    taken = ", ".join(f'"{name}"' for name in by_name)
    for name, _, _ in given:
        if name not in by_name:
            raise BadRequest(f'unexpected input "{name}"; the model takes {taken}')
    for name in by_name:
        if name not in names:
            raise BadRequest(f'missing input "{name}"; the model takes {taken}')
    samples: int | None = None
    for name, dtype, shape in given:
        spec = by_name[name]
        if np.dtype(dtype) != np.dtype(spec.dtype):
            have, want = dtype_name(np.dtype(dtype)), dtype_name(np.dtype(spec.dtype))
            raise BadRequest(f'input "{name}" is {have} but the model takes {want}')
        batch = f"1..{max_samples}" if max_samples is not None else "N"
        expected = ",".join([batch, *(str(d) if d >= 0 else "-1" for d in spec.shape)])
        mismatch = f'input "{name}" has shape [{",".join(map(str, shape))}] but the model takes [{expected}]'
        if len(shape) != len(spec.shape) + 1:
            raise BadRequest(mismatch)
        if any(want >= 0 and have != want for have, want in zip(shape[1:], spec.shape, strict=True)):
            raise BadRequest(mismatch)
        if shape[0] < 1 or (max_samples is not None and shape[0] > max_samples):
            raise BadRequest(mismatch)
        if samples is not None and shape[0] != samples:
            raise BadRequest(f'input "{name}" has batch size {shape[0]} but another input has {samples}')
        samples = shape[0]
    return samples or 1


def cheapest_runs(signature: ModelSignature, rows: int, costs: dict[int, float]) -> list[tuple[int, int]]:
    """The runs of ``rows`` requests that cost least, by ``costs`` (seconds per run of each compiled
    size, measured): two requests on a model compiled for 1 and 8 run as two runs of 1 when a run
    of 8 costs more than two of 1. Runs cover the rows in order, padding (if any) at the end, and
    never more rows than :meth:`ModelSignature.padded`, for which the batch's layout has room."""
    sizes = signature.batch_sizes
    if sizes is None or not costs:
        return signature.runs(rows)
    limit = signature.padded(rows)
    # best[c]: the cheapest runs of exactly c rows (a knapsack over the compiled sizes), as
    # (cost, last size); then the cheapest total that covers ``rows``.
    best: list[tuple[float, int] | None] = [(0.0, 0)] + [None] * limit
    for covered in range(1, limit + 1):
        options = [
            (previous[0] + costs[size], size)
            for size in sizes
            if size <= covered and (previous := best[covered - size]) is not None and size in costs
        ]
        best[covered] = min(options) if options else None
    reachable = [(entry[0], covered) for covered in range(rows, limit + 1) if (entry := best[covered]) is not None]
    if not reachable:
        return signature.runs(rows)
    _, covered = min(reachable)
    plan = []
    while covered:
        size = best[covered][1]  # type: ignore[index]
        covered -= size
        plan.append(size)
    runs, start = [], 0
    for size in sorted(plan, reverse=True):  # the largest first: the rows a smaller run pads come last
        runs.append((start, size))
        start += size
    return runs


@dataclass(frozen=True)
class BatchLayout:
    """Where each input's and each output's rows sit in a slot, for batches of up to ``rows``."""

    signature: ModelSignature
    rows: int
    input_offsets: tuple[int, ...] = field(init=False)
    output_offsets: tuple[int, ...] = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        offset = 0
        offsets = []
        for spec in (*self.signature.inputs, *self.signature.outputs):
            offsets.append(offset)
            offset = round_up(offset + self.rows * spec.nbytes)
        count = len(self.signature.inputs)
        object.__setattr__(self, "input_offsets", tuple(offsets[:count]))
        object.__setattr__(self, "output_offsets", tuple(offsets[count:]))
        object.__setattr__(self, "nbytes", offset)

    @classmethod
    def for_slot(cls, signature: ModelSignature, batch_limit: int, slot_bytes: int) -> BatchLayout:
        """The layout for the largest batch (up to ``batch_limit``) whose padded size fits a slot."""
        for rows in range(batch_limit, 0, -1):
            layout = cls(signature, signature.padded(rows))
            if layout.nbytes <= slot_bytes:
                return layout
        raise ValueError(f"one sample of {signature.name} does not fit a {slot_bytes}-byte slot")

    @property
    def max_batch(self) -> int:
        """Requests per batch: padding must still fit the rows laid out."""
        return max(r for r in range(1, self.rows + 1) if self.signature.padded(r) <= self.rows)

    def input_array(self, slot: memoryview, index: int, rows: int) -> np.ndarray:
        return self._array(slot, self.signature.inputs[index], self.input_offsets[index], rows)

    def output_array(self, slot: memoryview, index: int, rows: int) -> np.ndarray:
        return self._array(slot, self.signature.outputs[index], self.output_offsets[index], rows)

    def input_row(self, slot: memoryview, index: int, row: int) -> memoryview:
        spec = self.signature.inputs[index]
        start = self.input_offsets[index] + row * spec.nbytes
        return slot[start : start + spec.nbytes]

    @staticmethod
    def _array(slot: memoryview, spec: TensorSpec, offset: int, rows: int) -> np.ndarray:
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        count = rows * math.prod(spec.shape)
        return np.frombuffer(slot, dtype, count=count, offset=offset).reshape((rows, *spec.shape))
