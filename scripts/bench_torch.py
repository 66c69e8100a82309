"""A PyTorch model two ways: eager PyTorch against its fastinfer archive, same threads, same run.

The model is SqueezeNet 1.1 as torchvision builds it, written here in plain PyTorch with seeded
random weights (nothing is downloaded), at 224x224. It is archived with
``fastinfer.archive.from_torch`` exactly as a user would: exported with a dynamic batch axis,
compiled tuned — one library per batch size, from the records that ship in the package and the cache
(``--tune-trials N`` first tunes what they miss) — and verified against PyTorch. The archive's
library then runs through the worker's runtime, as a server runs it.

Each cell is the median over ``--rounds`` of the mean time per batch over a window of
``--duration-s``, after warm-up; within a round, PyTorch and TVM alternate at each batch size, so a
noisy neighbour slows both, and the ratio is the median of each round's ratio. Both use
``--threads`` threads (``torch.set_num_threads``; ``TVM_NUM_THREADS`` and the target's ``num-cores``).
On a shared machine, PyTorch's OpenMP threads spin-wait for each other while a neighbour holds a
core; ``OMP_WAIT_POLICY=PASSIVE`` (printed with the figures) makes them sleep instead.

    python scripts/bench_torch.py --rounds 5 --duration-s 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5, help="the median round is reported")
    parser.add_argument("--duration-s", type=float, default=2.0, help="measuring window of one round")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--tune-trials", type=int, default=0, help="tune tasks the records miss, N trials each")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "fastinfer-bench-cache"))
    return parser.parse_args()


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(inplanes, squeeze, 1), nn.ReLU())
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand1x1, 1), nn.ReLU())
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand3x3, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


class SqueezeNet(nn.Module):
    """torchvision's ``squeezenet1_1`` architecture: the layer shapes of the ``onnx`` package's
    ``light_squeezenet.onnx``, whose tuning records ship in fastinfer."""

    def __init__(self) -> None:
        super().__init__()
        pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2),
            nn.ReLU(),
            pool,
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            pool,
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            pool,
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(nn.Conv2d(512, 1000, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def mean_time(run: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call over a window of ``seconds`` (at least three calls)."""
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        run()
        calls += 1
    return (time.perf_counter() - started) / calls


def main() -> int:
    args = parse()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    from fastinfer.archive import from_torch
    from fastinfer.archive.load import load
    from fastinfer.worker.model import aligned_zeros
    from fastinfer.worker.runtime import TvmArchiveRuntime

    torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))
    torch.manual_seed(0)
    model = SqueezeNet().eval()
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "squeezenet.fia"
        started = time.monotonic()
        manifest = from_torch(
            model,
            torch.rand(1, 3, 224, 224),
            output,
            name="squeezenet",
            batch_sizes=batches,
            use_stored_records=not args.tune_trials,
            tune_trials=args.tune_trials,
            num_cores=args.threads,
            cache_dir=args.cache_dir,
            stream=sys.stderr,
        )
        print(f"archived in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        archive = load(output, args.cache_dir)
    runtime = TvmArchiveRuntime(archive.library_paths(), manifest.inputs, manifest.outputs, manifest.batch_sizes)
    runtime.load()

    times: dict[tuple[str, int], list[float]] = {}
    runs = {}
    for batch in batches:
        x = aligned_zeros((batch, 3, 224, 224), "float32")
        x[:] = np.random.default_rng(batch).random(x.shape, dtype=np.float32)
        tensor = torch.from_numpy(x)

        def run_eager(tensor=tensor):
            with torch.inference_mode():
                return model(tensor)

        def run_compiled(x=x):
            return runtime.run([x])

        np.testing.assert_allclose(run_compiled()[0], run_eager().numpy(), rtol=1e-3, atol=1e-4)
        runs[batch] = {"pytorch": run_eager, "fastinfer": run_compiled}
    for _ in range(args.rounds):
        for batch, both in runs.items():
            for name, run in both.items():
                run()  # warm: caches, thread pools
                times.setdefault((name, batch), []).append(mean_time(run, args.duration_s))

    records = manifest.tuning.records_source if manifest.tuning else "none"
    print(
        f"\nSqueezeNet 1.1 (PyTorch {torch.__version__}), {args.threads} threads "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), tuning records: {records}; "
        f"median of {args.rounds} rounds of {args.duration_s} s"
    )
    print("| batch | PyTorch eager ms | fastinfer archive ms | PyTorch / fastinfer (median of rounds) |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in batches:
        eager, compiled = times[("pytorch", batch)], times[("fastinfer", batch)]
        ratio = statistics.median(a / b for a, b in zip(eager, compiled, strict=True))
        eager_ms, compiled_ms = statistics.median(eager) * 1000, statistics.median(compiled) * 1000
        print(f"| {batch} | {eager_ms:.2f} | {compiled_ms:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
