"""The default model served with images: fastinfer against its in-process ceiling and Flask + ORT.

EfficientNet-Lite0 (the default model) classifying scikit-image's ``coffee.png``, sent as JPEG or PNG
bytes, in rounds; each round measures, for each image format,
1. the in-process ceiling: one single-threaded process per core, pinned, all at once, each decoding
   and preprocessing the image (``fastinfer.preprocess``) and running batch-1 inference of the same
   compiled archive the server loads, in a loop;
2. ``fastinfer serve --devices cpu:N`` serving the default model, loaded by ``fastinfer bench
   --image`` over the binary protocol and over HTTP at each concurrency;
3. Flask + gunicorn (one sync worker a core) decoding with Pillow, preprocessing as the model's
   manifest says (resize the shorter side, center crop, normalize) and calling ONNX Runtime on the
   same ONNX graph (one intra-op thread a worker), at the same concurrencies.
It prints, per format, the medians over the rounds: each served rate against its own round's
ceiling and against Flask + ONNX Runtime at the same concurrency. Targets: fastinfer at least 90%
of the ceiling, and at least 1.2x Flask + ONNX Runtime.

    python scripts/bench_default.py --duration-s 4 --rounds 2 --formats jpeg png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import ORT_BASELINE, bench, report, run_pinned, start_fastinfer, start_flask

from fastinfer.config import DEFAULT_MODEL_NAME


def images(folder: Path, formats: list[str]) -> dict[str, Path]:
    """scikit-image's coffee.png (600x400) as each format's bytes, in files."""
    import skimage
    from PIL import Image

    photo = Image.open(Path(skimage.__file__).parent / "data" / "coffee.png").convert("RGB")
    paths = {}
    for name in formats:
        encoded = io.BytesIO()
        photo.save(encoded, format=name.upper(), **({"quality": 90} if name == "jpeg" else {}))
        paths[name] = folder / f"coffee.{name}"
        paths[name].write_bytes(encoded.getvalue())
    return paths


def ceiling_child(cores, wait_for_start, archive: str, cache: str, image: str, seconds: str) -> float:
    """In one pinned process (run_pinned): decode + preprocess + batch-1 inference, images/s."""
    from fastinfer.preprocess import preprocess_into
    from fastinfer.worker.model import aligned_zeros, load_model

    model = load_model("m", archive, cache_dir=cache, num_cores=len(cores), max_image_pixels=40_000_000)
    spec, preprocess = model.signature.inputs[0], model.signature.preprocess
    assert preprocess is not None, "the default model takes images"
    batch = aligned_zeros((1, *spec.shape), spec.dtype)
    data = Path(image).read_bytes()

    def classify() -> None:
        preprocess_into(data, preprocess, batch[0])
        model.runtime.run([batch])

    classify()
    begin = wait_for_start()
    while time.time() < begin:
        time.sleep(0.001)
    count, now = 0, begin
    while (now := time.time()) < begin + float(seconds):
        classify()
        count += 1
    return count / (now - begin)


def top_class(url: str, image: Path) -> int:
    """The top class index a server answers for ``image`` over HTTP."""
    request = urllib.request.Request(f"{url}/predictions/{DEFAULT_MODEL_NAME}", data=image.read_bytes())
    with urllib.request.urlopen(request, timeout=30) as answer:
        return int(json.loads(answer.read())[0]["index"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2, help="measure everything this many times; report medians")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--formats", nargs="+", choices=("jpeg", "png"), default=["jpeg", "png"])
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "fastinfer-bench-cache"))
    args = parser.parse_args()

    from fastinfer.archive.load import load
    from fastinfer.models import default

    cores = sorted(os.sched_getaffinity(0))
    cache = Path(args.cache_dir)
    archive = default.archive_path(cache, 1)  # what each single-threaded worker of --devices cpu:N loads
    loaded = load(archive, str(cache))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = images(folder, args.formats)
        labels = folder / "labels.txt"
        labels.write_text("\n".join(loaded.labels() or []) + "\n", "utf-8")
        flask_environment = {
            "FASTINFER_BASELINE_ONNX": str(default.onnx_path(cache)),
            "FASTINFER_BASELINE_PREPROCESS": json.dumps(loaded.manifest.preprocess),
            "FASTINFER_BASELINE_LABELS": str(labels),
        }
        print(f"default model, {len(cores)} cores, preprocessing {loaded.manifest.preprocess}", flush=True)
        servers: list[subprocess.Popen] = []
        try:
            server, urls = start_fastinfer(None, folder, f"cpu:{len(cores)}", cache=cache)
            servers.append(server)
            server, url = start_flask("flask_onnxruntime", flask_environment, folder, len(cores))
            servers.append(server)
            urls[ORT_BASELINE] = url
            for name, image in files.items():
                answers = {top_class(urls[kind], image) for kind in ("fastinfer http", ORT_BASELINE)}
                assert len(answers) == 1, f"fastinfer and Flask + ONNX Runtime disagree on the {name} image: {answers}"
            rows: dict[str, list] = {name: [] for name in files}
            ceilings: dict[str, list] = {name: [] for name in files}
            for number in range(1, args.rounds + 1):
                for name, image in files.items():
                    arguments = [str(archive), str(cache), str(image), str(args.duration_s)]
                    best = sum(run_pinned("bench_default:ceiling_child", [[core] for core in cores], arguments))
                    ceilings[name].append({f"{len(cores)} x 1 thread, decode + batch 1": best})
                    print(f"round {number}, {name}, in-process: {best:.1f} images/s", flush=True)
                    for concurrency in args.concurrency:
                        served = {
                            kind: bench(url, DEFAULT_MODEL_NAME, concurrency, args.duration_s, "1", image=image)
                            for kind, url in urls.items()
                        }
                        for kind, result in served.items():
                            rate = result["throughput_rps"]
                            ratio = rate / max(served[ORT_BASELINE]["throughput_rps"], 1e-9)
                            row = {"server": kind, "round": number, "of_best": rate / best, "vs_flask_ort": ratio}
                            rows[name].append(row | result)
                            print(rows[name][-1], flush=True)
        finally:
            for server in servers:
                server.terminate()
                server.wait(30)

    for name in files:
        label = f"default model, {name} images"
        report(rows[name], ceilings[name], SimpleNamespace(**(vars(args) | {"model": label, "out": None})))


if __name__ == "__main__":
    main()
