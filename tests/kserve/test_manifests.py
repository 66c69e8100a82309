"""The manifests under scripts/kserve against the schemas a cluster checks them with: KServe's CRDs
(strictly: an unknown field is an error, as ``kubectl apply --validate=strict`` makes it) and
Kubernetes' own for the Deployment and HorizontalPodAutoscaler KServe makes of them."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from pod import MANIFESTS, manifests, render, runtime_container

SCHEMAS = json.loads(gzip.decompress((Path(__file__).parent / "data" / "kserve-crd-schemas.json.gz").read_bytes()))
KUBERNETES_VERSION = "1.32.0"
FILES = sorted(path.name for path in MANIFESTS.glob("*.yaml"))


def strict(schema: dict) -> dict:
    """``schema`` with unknown fields refused wherever Kubernetes would prune them."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_errors(document: dict) -> list[str]:
    key = f"{document['apiVersion']}/{document['kind']}"
    validator = jsonschema.Draft7Validator(strict(SCHEMAS[key]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def kserve_documents() -> list[tuple[str, dict]]:
    return [
        (name, doc) for name in FILES for doc in manifests(name) if doc["apiVersion"].startswith("serving.kserve.io/")
    ]


@pytest.mark.parametrize("name, document", kserve_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kserve_manifests_match_the_crds(name, document):
    assert crd_errors(document) == []


def test_a_misspelt_field_is_refused():
    (runtime,) = manifests("clusterservingruntime.yaml")
    runtime["spec"]["containers"][0]["readinesProbe"] = runtime["spec"]["containers"][0]["readinessProbe"]
    assert any("readinesProbe" in error for error in crd_errors(runtime))


def test_the_runtime_follows_kserve_conventions():
    (runtime,) = manifests("clusterservingruntime.yaml")
    spec = runtime["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"fia", "onnx"}
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    (container,) = spec["containers"]
    assert "--grpc-port=9000" in container["args"], "gRPC where KServe's Triton runtime has it"
    assert container["name"] == "kserve-container"
    assert container["ports"][0]["containerPort"] == 8080
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 1000
    assert security["capabilities"]["drop"] == ["ALL"] and security["readOnlyRootFilesystem"]
    # /dev/shm holds the slot pool: its memory emptyDir is at least the pool's size.
    environ = {item["name"]: item["value"] for item in container["env"]}
    workers = int(environ["FASTINFER_DEVICES"].removeprefix("cpu:"))
    pool_bytes = workers * int(environ["FASTINFER_SHM_SLOT_BYTES"]) * int(environ["FASTINFER_SHM_SLOTS_PER_WORKER"])
    (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory"
    assert quantity_bytes(dshm["emptyDir"]["sizeLimit"]) >= pool_bytes
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/var/cache/fastinfer"}
    # The grace period of each InferenceService leaves the delay and the drain their time.
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    needed_s = float(args["shutdown-delay-s"]) + float(args["shutdown-timeout-s"])
    for name, document in kserve_documents():
        if document["kind"] == "InferenceService":
            assert document["spec"]["predictor"]["terminationGracePeriodSeconds"] > needed_s, name


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def deployment_for(isvc: dict) -> dict:
    """The Deployment KServe's raw mode makes of an InferenceService with this runtime: its pod
    runs the runtime's container, args and env rendered, the model's own fields on top."""
    (runtime,) = manifests("clusterservingruntime.yaml")
    container = copy.deepcopy(runtime_container())
    name = isvc["metadata"]["name"]
    container["args"], environ = render(container, name)
    model = isvc["spec"]["predictor"]["model"]
    environ.update({item["name"]: item["value"] for item in model.get("env", [])})
    container["env"] = [{"name": k, "value": v} for k, v in environ.items()]
    for field in ("image", "resources"):
        if field in model:
            container[field] = model[field]
    labels = {"app": f"isvc.{name}-predictor"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-predictor", "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": runtime["spec"]["annotations"]},
                "spec": {
                    "containers": [container],
                    "volumes": runtime["spec"]["volumes"],
                    "terminationGracePeriodSeconds": isvc["spec"]["predictor"]["terminationGracePeriodSeconds"],
                },
            },
        },
    }


def hpa_for(isvc: dict) -> dict:
    """The HorizontalPodAutoscaler KServe's raw mode makes of an InferenceService's scaling fields."""
    predictor = isvc["spec"]["predictor"]
    name = isvc["metadata"]["name"]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"{name}-predictor"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-predictor"},
            "minReplicas": predictor["minReplicas"],
            "maxReplicas": predictor["maxReplicas"],
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": predictor["scaleMetric"],
                        "target": {"type": "Utilization", "averageUtilization": predictor["scaleTarget"]},
                    },
                }
            ],
        },
    }


RAW = [
    doc
    for _, doc in kserve_documents()
    if doc["kind"] == "InferenceService"
    and doc["metadata"]["annotations"].get("serving.kserve.io/deploymentMode") == "RawDeployment"
]


@pytest.mark.parametrize("isvc", RAW, ids=lambda doc: doc["metadata"]["name"])
def test_the_deployments_kserve_makes_are_valid_kubernetes(isvc):
    kubernetes_validate.validate(deployment_for(isvc), KUBERNETES_VERSION, strict=True)


def test_the_hpa_kserve_makes_is_valid_kubernetes():
    (isvc,) = [doc for doc in RAW if doc["metadata"]["annotations"].get("serving.kserve.io/autoscalerClass") == "hpa"]
    kubernetes_validate.validate(hpa_for(isvc), KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_refuses_a_broken_probe():
    deployment = deployment_for(RAW[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_keda_scaled_object_targets_the_predictor():
    isvc, scaled = manifests("keda-scaledobject.yaml")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", f"{isvc['metadata']['name']}-predictor")
