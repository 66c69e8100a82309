"""The inference step both v2 codecs (REST in :mod:`.rest`, gRPC in :mod:`.grpc_service`) share, once
each has parsed its request into a :class:`~fastinfer.server.fronts.kserve.codec.InferRequest`.

Check the request against the model's signature; take one row per sample; fill each row from the
request's bytes or from the client's shared-memory region; wait for the results; stack the outputs,
or write them straight from the batch slot into the client's region. Region bytes are moved in a
thread when they are many (``OFF_LOOP_BYTES``), so the loop never copies a large tensor.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from fastinfer.errors import BadRequest, Forbidden
from fastinfer.server.batcher import Row
from fastinfer.server.fronts.kserve import codec
from fastinfer.server.fronts.kserve.sysshm import ClientRegions, Region
from fastinfer.server.supervisor import Supervisor
from fastinfer.signature import ModelSignature, samples_of

OFF_LOOP_BYTES = 64 << 10  # region copies past this run in a thread (~20 us of memcpy)
T = TypeVar("T")
# One thread, not a pool, for parsing and encoding: orjson and protobuf-to-numpy conversions hold
# the GIL for a whole document, so parses in parallel threads would only take turns at it, and the
# loop would wait behind all of them (32 clients of 5 MB JSON bodies stalled it 500 ms); behind
# one, it waits one parse.
PARSE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastinfer-parse")

Outputs = list[tuple[str, np.ndarray | codec.WrittenToRegion]]


async def parse_off_loop_if(condition: bool, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in the parse thread when ``condition`` holds (work proportional to a
    large tensor), else here on the loop (a small one costs less than the hand-over)."""
    if not condition:
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(PARSE_THREAD, function, *args)


def check(parsed: codec.InferRequest, signature: ModelSignature, max_samples: int) -> None:
    """The request's inputs and outputs against the model (BadRequest naming the field)."""
    given = [(t.name, t.dtype, t.shape) for t in parsed.inputs]
    samples_of(signature.inputs, given, max_samples, dtype_name=codec.numpy_to_kserve)
    codec.validate_outputs(parsed, signature.outputs)


def check_regions_allowed(regions: ClientRegions | None, peer_local: bool) -> None:
    """Forbidden unless client shared memory is on and the client is on this machine."""
    if regions is None:
        raise Forbidden("client shared memory is off on this server (--allow-client-shm turns it on)")
    if not peer_local:
        raise Forbidden("shared-memory regions are for clients on the server's machine only")


@dataclass
class _Transfer:
    region: Region
    start: int


async def infer(
    supervisor: Supervisor,
    signature: ModelSignature,
    parsed: codec.InferRequest,
    timeout_s: float,
    regions: ClientRegions | None,
    peer_local: bool,
) -> Outputs:
    """Run a checked request; the outputs in the model's order (all of them, requested or not).
    ``regions`` is None when client shared memory is off; ``peer_local`` says the client is on
    this machine."""
    inputs_in_regions = any(isinstance(t.data, codec.RegionRef) for t in parsed.inputs)
    if inputs_in_regions or any(o.region is not None for o in parsed.outputs or ()):
        check_regions_allowed(regions, peer_local)
    held: list[Region] = []
    try:
        return await _infer(supervisor, signature, parsed, timeout_s, regions, held)
    finally:
        for region in held:
            assert regions is not None
            regions.release(region)


async def _infer(
    supervisor: Supervisor,
    signature: ModelSignature,
    parsed: codec.InferRequest,
    timeout_s: float,
    regions: ClientRegions | None,
    held: list[Region],
) -> Outputs:
    samples = parsed.inputs[0].shape[0] if parsed.inputs else 1
    by_name = {t.name: t for t in parsed.inputs}

    def locate(ref: codec.RegionRef, nbytes: int, what: str) -> _Transfer:
        assert regions is not None
        region = regions.acquire(ref.region)
        held.append(region)
        if ref.byte_size < nbytes:
            raise BadRequest(f"{what}: {nbytes} bytes do not fit its shared_memory_byte_size {ref.byte_size}")
        return _Transfer(region, region.locate(ref.offset, nbytes, what))

    # Every region checked before a row is taken: a bad reference costs no batch a row.
    sources: dict[str, _Transfer] = {}
    for spec in signature.inputs:
        ref = by_name[spec.name].data
        if isinstance(ref, codec.RegionRef):
            sources[spec.name] = locate(ref, samples * spec.nbytes, f'input "{spec.name}"')
    targets: dict[str, _Transfer] = {}
    for want in parsed.outputs or ():
        if want.region is not None:
            spec = next(s for s in signature.outputs if s.name == want.name)
            targets[want.name] = locate(want.region, samples * spec.nbytes, f'output "{want.name}"')

    batcher = supervisor.batcher
    rows: list[Row] = []
    try:
        for _ in range(samples):
            rows.append(batcher.reserve(signature.name, timeout_s))
        input_rows = [[row.input_view(k) for row in rows] for k in range(len(signature.inputs))]
        try:
            copies: list[Callable[[], None]] = []
            for spec, views in zip(signature.inputs, input_rows, strict=True):
                if spec.name in sources:
                    copies.append(_reader(sources[spec.name], views, f'input "{spec.name}"'))
                else:
                    raw = by_name[spec.name].raw_bytes()
                    for i, view in enumerate(views):
                        view[:] = raw[i * spec.nbytes : (i + 1) * spec.nbytes]
            await _run(copies, sum(spec.nbytes for spec in signature.inputs if spec.name in sources) * samples)
        finally:  # as every front does: a frame kept alive later (by a traceback) must not keep the slot memory mapped
            for views in input_rows:
                for view in views:
                    view.release()
        sample_bytes = sum(spec.nbytes for spec in signature.inputs)
        for row in rows:
            row.filled(sample_bytes)
        results = await asyncio.gather(*(row.result() for row in rows))

        outputs: Outputs = []
        writes: list[Callable[[], None]] = []
        for j, spec in enumerate(signature.outputs):
            if spec.name in targets:
                target = targets[spec.name]
                views = [_bytes_of(result.outputs[j]) for result in results]
                writes.append(_writer(target, views))
                region_ref = next(o.region for o in parsed.outputs or () if o.name == spec.name)
                assert region_ref is not None
                shape = (samples, *spec.shape)
                outputs.append((spec.name, codec.WrittenToRegion(shape, np.dtype(spec.dtype), region_ref)))
            else:
                outputs.append((spec.name, np.stack([result.outputs[j] for result in results])))
        written = [o for _, o in outputs if isinstance(o, codec.WrittenToRegion)]
        await _run(writes, sum(math.prod(o.shape) * o.dtype.itemsize for o in written))
        return outputs
    finally:
        for row in rows:
            row.release()


def _reader(source: _Transfer, views: list[memoryview], what: str) -> Callable[[], None]:
    return lambda: source.region.read_into(views, source.start, what)


def _writer(target: _Transfer, views: list[memoryview]) -> Callable[[], None]:
    return lambda: target.region.write_from(views, target.start)


def _bytes_of(array: np.ndarray) -> memoryview:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


async def _run(copies: Sequence[Callable[[], None]], nbytes: int) -> None:
    """Run the copies here when they are small, else in a thread (they release the GIL)."""
    if not copies:
        return
    if nbytes <= OFF_LOOP_BYTES:
        for copy in copies:
            copy()
        return

    def run_all() -> None:
        for copy in copies:
            copy()

    future = asyncio.get_running_loop().run_in_executor(None, run_all)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        # The thread still moves bytes in and out of the rows and the region: they must not be
        # released (and reused, or closed) under it, so the request ends only once it is done.
        await asyncio.wait([future])
        raise
