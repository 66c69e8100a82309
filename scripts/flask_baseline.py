"""The usual way to serve a model, as a baseline: a Flask app under gunicorn calling TVM per request.

Each gunicorn worker loads the same model archive fastinfer serves (the same compiled code) and
runs one request at a time at batch 1: raw tensor bytes in, JSON out. Run by
scripts/bench_serving.py:

    FASTINFER_BASELINE_ARCHIVE=squeezenet.fia TVM_NUM_THREADS=1 \\
        gunicorn -w 2 -b 127.0.0.1:8500 --chdir scripts 'flask_baseline:app'
"""

import json
import os
import sys
import tempfile

import numpy as np
from flask import Flask, Response, request

from fastinfer.worker.model import aligned_zeros, load_model

app = Flask(__name__)
_model = load_model(
    "baseline",
    os.environ["FASTINFER_BASELINE_ARCHIVE"],
    cache_dir=tempfile.mkdtemp(prefix="baseline-"),
    num_cores=1,
    max_image_pixels=40_000_000,
)
_input = _model.signature.inputs[0]
_batch = aligned_zeros((1, *_input.shape), _input.dtype)
print("baseline ready", file=sys.stderr, flush=True)  # scripts/bench_serving.py waits for each worker's line


@app.post("/predictions/<model>")
def predict(model: str) -> Response:
    _batch[0] = np.frombuffer(request.get_data(), dtype=_input.dtype).reshape(_input.shape)
    (output,) = _model.runtime.run([_batch])
    outputs = [{"name": "output", "shape": list(output.shape), "data": output.ravel().tolist()}]
    return Response(json.dumps({"model_name": model, "outputs": outputs}), mimetype="application/json")
