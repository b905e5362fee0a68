"""Kubernetes manifests per SKU: a Deployment and Service, or a KServe ``InferenceService``.

Each runs the SKU's image by digest on nodes with the SKU's labels, asks for the SKU's extended
resource (``nvidia.com/gpu``, ``amd.com/gpu`` ...), requests memory from the measured peak, and
probes the entry point's health endpoints. Deployments and Services are validated offline, in
strict mode, with the schemas ``kubernetes-validate`` bundles. ``InferenceService`` is a custom
resource: it is checked against KServe's own CRD schema (vendored in ``mlopt/schemas/``, made
strict), and its pod part against the Kubernetes Pod schema, strictly, by wrapping it in a Pod.

Every pod meets Pod Security "restricted" (non-root, no capabilities, RuntimeDefault seccomp, a
read-only root file system with emptyDir volumes for /tmp and engine caches), requests the CPU a
node of the SKU can allocate, and may name image pull secrets.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mlopt.core.errors import BackendUnavailable, BadInput
from mlopt.package.serving import (
    ENGINE_CACHE,
    RUN_AS,
    Deployable,
    ServingOptions,
    is_jit,
    memory_limit,
    memory_request,
)

PORT_NAME = "http"
_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
KSERVE_SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "kserve-inferenceservice-v1beta1.json"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
TMP = "/tmp"
# Restricted Pod Security: non-root, no privilege escalation, no capabilities, the runtime's seccomp
# profile, a read-only root file system (the server writes only to /tmp and the engine cache, both
# emptyDir volumes). The pod's fsGroup makes a mounted engine-cache claim writable by that user.
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
# A node keeps CPU for the kubelet and the OS (GKE, EKS and AKS reserve 6% of the first core, 1% of
# the second, 0.5% of cores 3-4 and 0.25% of the rest) and its DaemonSets (kube-proxy, the CNI, log
# agents) request about 100m more: a pod requesting all 2000m of a 2-vCPU node never schedules.
DAEMONSET_MILLICPU = 100


@dataclass(frozen=True)
class KubeOptions:
    """Kubernetes-only knobs (``mlopt export k8s|kserve`` flags)."""

    pull_secrets: tuple[str, ...] = ()  # imagePullSecrets of every pod
    engine_cache_claim: str | None = None  # a PersistentVolumeClaim for on-device engines (default: emptyDir)
    grace_seconds: int = 30  # terminationGracePeriodSeconds: the server drains on SIGTERM within it

    def __post_init__(self) -> None:
        for name in (*self.pull_secrets, *([self.engine_cache_claim] if self.engine_cache_claim else [])):
            if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
                raise BadInput(f"{name!r} is not a Kubernetes object name (lowercase letters, digits, '-' and '.')")
        if self.grace_seconds < 1:
            raise BadInput(f"termination grace period {self.grace_seconds} s must be at least 1 s")


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


def workload(d: Deployable, image: str, options: ServingOptions, kube: KubeOptions = KubeOptions()) -> Workload:
    """The pod, labels and annotations of one deployable running ``image``."""
    name = object_name(d)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": d.model.name[:63],
              "app.kubernetes.io/version": f"v{d.entry.version}", "app.kubernetes.io/managed-by": "mlopt",
              "mlopt.dev/sku": d.sku.name}
    _, source = memory_request(d)
    _, limit_source = memory_limit(d, options)
    annotations = {"mlopt.dev/artifact": d.artifact.key, "mlopt.dev/backend": d.backend,
                   "mlopt.dev/precision": d.entry.precision or "", "mlopt.dev/memory-request-from": source,
                   "mlopt.dev/memory-limit-from": limit_source}
    if d.sku.requirements.driver:
        annotations["mlopt.dev/min-driver"] = d.sku.requirements.driver
    pod: dict[str, Any] = {"containers": [_container(d, image, options)],
                           "securityContext": _copy(POD_SECURITY), "terminationGracePeriodSeconds": kube.grace_seconds}
    if kube.pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in kube.pull_secrets]
    if d.sku.kubernetes.node_selector:
        pod["nodeSelector"] = dict(d.sku.kubernetes.node_selector)
    if d.sku.kubernetes.resource:
        pod["tolerations"] = [{"key": d.sku.kubernetes.resource, "operator": "Exists", "effect": "NoSchedule"}]
    pod["volumes"] = _volumes(d, kube)
    return Workload(name, image, labels, annotations, pod)


def _volumes(d: Deployable, kube: KubeOptions) -> list[dict[str, Any]]:
    """/tmp, and for an on-device engine its cache: an emptyDir (built once per pod; a hostPath is
    refused by Pod Security "baseline"), or a claim the replicas share when one is named."""
    out: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if is_jit(d.backend):
        source = ({"persistentVolumeClaim": {"claimName": kube.engine_cache_claim}} if kube.engine_cache_claim
                  else {"emptyDir": {}})
        out.append({"name": "engine-cache", **source})
    return out


def cpu_request(d: Deployable) -> str:
    """CPU to request: the instance's threads, at most what a node of the SKU can allocate (rounded
    down to 100m), so a 2-vCPU SKU asks for 1800m. No CPU limit: a limit throttles the runtime's
    thread pool in the middle of a batch, and the request already reserves the cores."""
    want = d.threads * 1000
    if d.sku.vcpus:
        want = min(want, allocatable_millicpu(d.sku.vcpus) // 100 * 100)
    return f"{max(100, want)}m"


def allocatable_millicpu(vcpus: int) -> int:
    """Millicores a node with ``vcpus`` leaves to pods after the kubelet's reservation and DaemonSets."""
    reserved = 60 + 10 * min(max(vcpus - 1, 0), 1) + 5 * min(max(vcpus - 2, 0), 2) + 2.5 * max(vcpus - 4, 0)
    return vcpus * 1000 - math.ceil(reserved) - DAEMONSET_MILLICPU


def _container(d: Deployable, image: str, options: ServingOptions) -> dict[str, Any]:
    mem, _ = memory_request(d)
    limit, _ = memory_limit(d, options)
    requests = {"cpu": cpu_request(d), "memory": _mebibytes(mem)}
    limits = {"memory": _mebibytes(limit)}  # covers the largest batch the server accepts
    if d.sku.kubernetes.resource:
        limits[d.sku.kubernetes.resource] = "1"
    jit = is_jit(d.backend)
    mounts = [{"name": "tmp", "mountPath": TMP}] + ([{"name": "engine-cache", "mountPath": ENGINE_CACHE}] if jit else [])
    return {
        "name": "model", "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": PORT_NAME, "containerPort": options.port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        # ready (not live) means the model, or its on-device engine, is loaded: a JIT engine is
        # built on the first start, so it has up to 20 minutes
        "startupProbe": _probe("/v2/health/ready", period=10, failures=120 if jit else 30),
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        "securityContext": _copy(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }


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

    Where the pod needs node selectors or tolerations (every catalog SKU) it runs in
    ``RawDeployment`` mode: a plain Deployment, which takes them, the startup probe and the pod's
    security context as they are. Otherwise it is left to the cluster's default mode; Knative
    (serverless) takes one port named ``http1``, probes on that port by number, and no startup
    probe, pod security context or grace period (it gates those behind feature flags)."""
    c = _copy(w.pod["containers"][0])
    c["name"] = "kserve-container"
    c["ports"] = [{"name": "http1", "containerPort": options.port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        c[probe]["httpGet"]["port"] = options.port
    pod = {k: _copy(v) for k, v in w.pod.items() if k != "containers"}
    annotations = dict(w.annotations)
    if "nodeSelector" in pod or "tolerations" in pod:
        annotations[DEPLOYMENT_MODE] = "RawDeployment"
    else:
        c.pop("startupProbe")
        for key in ("securityContext", "terminationGracePeriodSeconds"):
            pod.pop(key, None)
    predictor = {"minReplicas": options.replicas, "maxReplicas": max(options.replicas, options.max_replicas),
                 **pod, "containers": [c]}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": w.name, "labels": w.labels, "annotations": annotations},
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
    """Validate an InferenceService against KServe's own CRD schema (vendored, ``KSERVE_SCHEMA_FILE``),
    strictly as ``kubectl --validate=strict`` would (unknown fields are errors); then its name, and
    its pod part as a strict Kubernetes Pod (which also checks quantities)."""
    import jsonschema

    try:
        jsonschema.validate(doc, kserve_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise BadInput(f"InferenceService: invalid at {where or '(root)'}: {e.message}") from None
    name = doc["metadata"].get("name", "")
    if not re.match(_DNS_LABEL, name) or len(name) > 63:
        raise BadInput(f"InferenceService: name {name!r} is not a DNS-1123 label")
    predictor = doc["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {k: predictor[k] for k in _POD_KEYS if k in predictor}}
    validate_k8s(pod, version)


_POD_KEYS = ("containers", "nodeSelector", "tolerations", "volumes", "securityContext", "imagePullSecrets",
             "terminationGracePeriodSeconds")


@cache
def kserve_schema() -> dict[str, Any]:
    """The vendored InferenceService schema, made strict: an object that lists its properties (and
    does not preserve unknown fields) takes no others."""
    schema = json.loads(KSERVE_SCHEMA_FILE.read_text())
    _close(schema)
    return schema


def _close(node: Any) -> None:
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for v in node.values():
            _close(v)
    elif isinstance(node, list):
        for v in node:
            _close(v)


def _copy(doc: Any) -> Any:
    return json.loads(json.dumps(doc))


def _kv() -> tuple[Any, Any]:
    try:
        import kubernetes_validate
        import kubernetes_validate.utils as utils
    except ImportError:
        raise BackendUnavailable("kubernetes-validate is missing", hint="pip install 'mlopt[serve]'") from None
    return kubernetes_validate, utils
