"""Kubernetes manifests per SKU: a Deployment and Service, or a KServe ``InferenceService``.

Each runs the SKU's image by digest on nodes with the SKU's labels, asks for the SKU's extended
resource (``nvidia.com/gpu``, ``amd.com/gpu`` ...), requests memory from the measured peak, and
probes the entry point's health endpoints. Deployments and Services are validated offline, in
strict mode, with the schemas ``kubernetes-validate`` bundles. ``InferenceService`` is a custom
resource: its shape is checked against ``KSERVE_SCHEMA`` (the KServe v1beta1 fields used here),
and its pod part (containers, node selector, tolerations, volumes) against the Kubernetes Pod
schema, strictly, by wrapping it in a Pod.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from mlopt.core.errors import BackendUnavailable, BadInput
from mlopt.package.serving import (
    ENGINE_CACHE,
    Deployable,
    ServingOptions,
    is_jit,
    memory_request,
)

PORT_NAME = "http"
_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
KSERVE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "KServe v1beta1 InferenceService (the fields mlopt writes)",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
                           "namespace": {"type": "string"}, "labels": _STRINGS, "annotations": _STRINGS},
        },
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["predictor"],
            "properties": {"predictor": {
                "type": "object", "additionalProperties": False, "required": ["containers"],
                "properties": {
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "containerConcurrency": {"type": "integer", "minimum": 0},
                    "timeout": {"type": "integer", "minimum": 0},
                    "labels": _STRINGS, "annotations": _STRINGS,
                    "nodeSelector": _STRINGS,
                    "tolerations": {"type": "array"},
                    "volumes": {"type": "array"},
                    "containers": {"type": "array", "minItems": 1, "maxItems": 1},
                },
            }},
        },
    },
}


@dataclass(frozen=True)
class Workload:
    """What the Kubernetes objects of one deployable share."""

    name: str
    image: str  # REPO@sha256:...
    labels: dict[str, str]
    annotations: dict[str, str]
    pod: dict[str, Any]  # containers, nodeSelector, tolerations, volumes


def object_name(d: Deployable) -> str:
    """A DNS-1123 label for the (model, SKU): lowercase, at most 63 characters."""
    base = _NAME_CHARS.sub("-", f"{d.model.name}-{d.sku.name}".lower()).strip("-")
    if len(base) <= 63:
        return base
    return base[:54].rstrip("-") + "-" + hashlib.sha256(base.encode()).hexdigest()[:8]


def workload(d: Deployable, image: str, options: ServingOptions) -> Workload:
    """The pod, labels and annotations of one deployable running ``image``."""
    name = object_name(d)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": d.model.name[:63],
              "app.kubernetes.io/version": f"v{d.entry.version}", "app.kubernetes.io/managed-by": "mlopt",
              "mlopt.dev/sku": d.sku.name}
    mem, source = memory_request(d)
    annotations = {"mlopt.dev/artifact": d.artifact.key, "mlopt.dev/backend": d.backend,
                   "mlopt.dev/precision": d.entry.precision or "", "mlopt.dev/memory-request-from": source}
    if d.sku.requirements.driver:
        annotations["mlopt.dev/min-driver"] = d.sku.requirements.driver
    pod: dict[str, Any] = {"containers": [_container(d, image, options, mem)]}
    if d.sku.kubernetes.node_selector:
        pod["nodeSelector"] = dict(d.sku.kubernetes.node_selector)
    if d.sku.kubernetes.resource:
        pod["tolerations"] = [{"key": d.sku.kubernetes.resource, "operator": "Exists", "effect": "NoSchedule"}]
    if is_jit(d.backend):  # engines are built once per node and shared by its replicas
        pod["volumes"] = [{"name": "engine-cache", "hostPath": {"path": ENGINE_CACHE, "type": "DirectoryOrCreate"}}]
    return Workload(name, image, labels, annotations, pod)


def _container(d: Deployable, image: str, options: ServingOptions, mem: int) -> dict[str, Any]:
    requests = {"cpu": str(d.threads), "memory": _mebibytes(mem)}
    limits = {"memory": _mebibytes(2 * mem)}
    if d.sku.kubernetes.resource:
        limits[d.sku.kubernetes.resource] = "1"
    jit = is_jit(d.backend)
    c: dict[str, Any] = {
        "name": "model", "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": PORT_NAME, "containerPort": options.port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        # a JIT engine is built on the first start: allow it up to 20 minutes
        "startupProbe": _probe("/v2/health/live", period=10, failures=120 if jit else 30),
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if jit:
        c["volumeMounts"] = [{"name": "engine-cache", "mountPath": ENGINE_CACHE}]
    return c


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "periodSeconds": period, "failureThreshold": failures}


def _mebibytes(n: int) -> str:
    return f"{math.ceil(n / (1 << 20))}Mi"


def deployment(w: Workload, options: ServingOptions) -> dict[str, Any]:
    """An apps/v1 Deployment."""
    selector = {"app.kubernetes.io/name": w.name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": w.name, "labels": w.labels, "annotations": w.annotations},
        "spec": {"replicas": options.replicas, "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": w.labels, "annotations": w.annotations}, "spec": w.pod}},
    }


def service(w: Workload, options: ServingOptions) -> dict[str, Any]:
    """A ClusterIP Service in front of the Deployment."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": w.name, "labels": w.labels},
        "spec": {"selector": {"app.kubernetes.io/name": w.name},
                 "ports": [{"name": PORT_NAME, "port": options.port, "targetPort": PORT_NAME, "protocol": "TCP"}]},
    }


def inference_service(w: Workload, options: ServingOptions) -> dict[str, Any]:
    """A KServe v1beta1 InferenceService whose predictor is the image (a custom container).

    Serverless KServe runs predictors as Knative services, which take one port named ``http1``,
    probes on that port by number, no startup probe and no hostPath volumes: the engine cache of
    an on-device build is an emptyDir there (one per pod)."""
    c = json.loads(json.dumps(w.pod["containers"][0]))
    c["name"] = "kserve-container"
    c.pop("startupProbe", None)
    c["ports"] = [{"name": "http1", "containerPort": options.port, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        c[probe]["httpGet"]["port"] = options.port
    pod = {k: v for k, v in w.pod.items() if k != "containers"}
    if "volumes" in pod:
        pod["volumes"] = [{"name": v["name"], "emptyDir": {}} for v in pod["volumes"]]
    predictor = {"minReplicas": options.replicas, "maxReplicas": max(options.replicas, options.max_replicas),
                 **pod, "containers": [c]}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": w.name, "labels": w.labels, "annotations": w.annotations},
            "spec": {"predictor": predictor}}


def validate_k8s(doc: dict[str, Any], version: str | None = None) -> None:
    """Validate a built-in Kubernetes object offline, strictly (unknown fields are errors)."""
    kv, utils = _kv()
    try:
        kv.validate(doc, version or utils.latest_version(), strict=True)
    except utils.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        raise BadInput(f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: invalid at {where or '(root)'}: "
                       f"{e.message.splitlines()[0]}") from None


def validate_kserve(doc: dict[str, Any], version: str | None = None) -> None:
    """Validate an InferenceService: KSERVE_SCHEMA, then its pod part as a strict Kubernetes Pod."""
    import jsonschema

    try:
        jsonschema.validate(doc, KSERVE_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise BadInput(f"InferenceService: invalid at {where or '(root)'}: {e.message}") from None
    pod_keys = ("containers", "nodeSelector", "tolerations", "volumes")
    predictor = doc["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]},
           "spec": {k: predictor[k] for k in pod_keys if k in predictor}}
    validate_k8s(pod, version)


def _kv() -> tuple[Any, Any]:
    try:
        import kubernetes_validate
        import kubernetes_validate.utils as utils
    except ImportError:
        raise BackendUnavailable("kubernetes-validate is missing", hint="pip install 'mlopt[serve]'") from None
    return kubernetes_validate, utils
