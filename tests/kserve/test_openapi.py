"""The v2 REST API against the Open Inference Protocol's OpenAPI document: schemathesis generates
requests from it (bodies of every shape the schema allows, and broken ones) for a live server
started as the KServe runtime starts it; no answer may be a 5xx or break the documented schema."""

from __future__ import annotations

from pathlib import Path

import hypothesis
import pytest
import schemathesis
import yaml
from pod import Pod, render, runtime_container, storage_initialize, tiny_archive
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

SPEC = Path(__file__).parent / "data" / "open_inference_rest.yaml"
ISVC = "tiny"


def load_spec() -> schemathesis.BaseSchema:
    raw = yaml.safe_load(SPEC.read_text())
    # The document writes path templates as ${MODEL_NAME}; OpenAPI's are {MODEL_NAME} (the "$"
    # would be a literal character of the path, which no v2 server serves).
    raw["paths"] = {path.replace("${", "{"): item for path, item in raw["paths"].items()}
    return schemathesis.openapi.from_dict(raw)


schema = load_spec()


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    bucket = tmp_path_factory.mktemp("bucket")
    tiny_archive(bucket, tmp_path_factory.mktemp("archive-cache"))
    model_dir = tmp_path_factory.mktemp("pod") / "mnt-models"
    storage_initialize(f"file://{bucket}/tiny.fia", model_dir)
    args, environ = render(runtime_container(), ISVC)
    served = Pod(args, environ, model_dir, tmp_path_factory.mktemp("cache"))
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


@schema.parametrize()
@hypothesis.settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
    database=None,
)
def test_v2_api_conforms_to_the_open_inference_protocol(case, pod):
    if case.path_parameters is not None and "MODEL_NAME" in case.path_parameters:
        # The model the pod serves, so that requests get past the lookup to the parsing.
        case.path_parameters = {**case.path_parameters, "MODEL_NAME": ISVC, "MODEL_VERSION": "1"}
    response = case.call(base_url=pod.url)
    case.validate_response(response, checks=(not_a_server_error, response_schema_conformance))
