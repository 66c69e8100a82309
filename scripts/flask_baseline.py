"""The usual way to serve a model, as a baseline: a Flask app under gunicorn calling TVM per request.

Each gunicorn worker loads the same compiled library fastinfer serves and runs one request at a
time (batch 1), tensors arriving as raw bytes and leaving as JSON. Run by scripts/bench_serving.py:

    FASTINFER_BASELINE_LIBRARY=.../model.so FASTINFER_BASELINE_SIGNATURE=.../signature.json \
        gunicorn -w 2 -b 127.0.0.1:8500 'flask_baseline:app'
"""

import json
import os

import numpy as np
import tvm
from flask import Flask, Response, request
from tvm import relax

app = Flask(__name__)
with open(os.environ["FASTINFER_BASELINE_SIGNATURE"]) as file:
    _signature = json.load(file)
_input = _signature["inputs"][0]
_main = relax.VirtualMachine(tvm.runtime.load_module(os.environ["FASTINFER_BASELINE_LIBRARY"]), tvm.cpu())["main"]


@app.post("/predictions/<model>")
def predict(model: str) -> Response:
    array = np.frombuffer(request.get_data(), dtype=_input["dtype"]).reshape([1, *_input["shape"]])
    output = _main(tvm.runtime.tensor(array)).numpy()
    body = {
        "model_name": model,
        "outputs": [{"name": "output", "shape": list(output.shape), "data": output.ravel().tolist()}],
    }
    return Response(json.dumps(body), mimetype="application/json")
