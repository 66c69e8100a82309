"""The usual way to serve a model, as a baseline: a Flask app under gunicorn calling ONNX Runtime.

Each gunicorn worker opens the ONNX file in ONNX Runtime with one intra-op thread (one worker a core)
and runs one request at a time at batch 1. Two kinds of request, as fastinfer takes them:

- raw tensor bytes of one sample in, JSON of the output out (``FASTINFER_BASELINE_ONNX`` only), as
  scripts/flask_baseline.py does with TVM;
- an encoded image in (``FASTINFER_BASELINE_PREPROCESS`` set to a JSON preprocessing spec, as in a
  model archive's manifest): Pillow decodes it, resizes its shorter side, center-crops and
  normalizes, and the top 5 classes come back as JSON, as fastinfer answers (names from ``FASTINFER_BASELINE_LABELS``, a
  file of one label a line, if set).

Run by scripts/bench_serving.py and scripts/bench_default.py:

    FASTINFER_BASELINE_ONNX=model.onnx gunicorn -w 2 -b 127.0.0.1:8500 --chdir scripts 'flask_onnxruntime:app'
"""

import io
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from flask import Flask, Response, request
from PIL import Image

TOP_K = 5

app = Flask(__name__)
_options = ort.SessionOptions()
_options.intra_op_num_threads = 1
_options.inter_op_num_threads = 1
_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
_session = ort.InferenceSession(os.environ["FASTINFER_BASELINE_ONNX"], _options, providers=["CPUExecutionProvider"])
_input = _session.get_inputs()[0]
_dtype = np.float32 if _input.type == "tensor(float)" else np.dtype(_input.type[len("tensor(") : -1])
_shape = [dimension if isinstance(dimension, int) else 1 for dimension in _input.shape]  # batch 1
_preprocess = json.loads(os.environ.get("FASTINFER_BASELINE_PREPROCESS") or "null")
_labels = None
if os.environ.get("FASTINFER_BASELINE_LABELS"):
    with open(os.environ["FASTINFER_BASELINE_LABELS"], encoding="utf-8") as file:
        _labels = file.read().splitlines()
print("baseline ready", file=sys.stderr, flush=True)  # the benchmark scripts wait for each worker's line


def _pixels(data: bytes) -> np.ndarray:
    """Decode, resize the shorter side, center-crop, normalize: one NCHW (or NHWC) batch of one."""
    spec = _preprocess
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = spec["resize_shorter"] / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - spec["crop"]) // 2, (image.height - spec["crop"]) // 2
    image = image.crop((left, top, left + spec["crop"], top + spec["crop"]))
    pixels = (np.asarray(image, np.float32) - np.float32(spec["mean"])) / np.float32(spec["std"])
    if spec["layout"] == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None])


def _top_k(logits: np.ndarray) -> list[dict]:
    exp = np.exp(logits - logits.max())
    probabilities = exp / exp.sum()
    return [
        {"index": int(i), "class": _labels[i] if _labels else str(i), "probability": float(probabilities[i])}
        for i in np.argsort(-probabilities)[:TOP_K]
    ]


@app.post("/predictions/<model>")
def predict(model: str) -> Response:
    if _preprocess is not None:
        (output,) = _session.run(None, {_input.name: _pixels(request.get_data())})
        return Response(json.dumps(_top_k(output[0])), mimetype="application/json")  # as fastinfer answers
    batch = np.frombuffer(request.get_data(), dtype=_dtype).reshape(_shape)
    (output,) = _session.run(None, {_input.name: batch})
    outputs = [{"name": "output", "shape": list(output.shape), "data": output.ravel().tolist()}]
    return Response(json.dumps({"model_name": model, "outputs": outputs}), mimetype="application/json")
