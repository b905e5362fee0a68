"""What a cluster runs for a plan: per pool a Deployment, Service, HPA and PodDisruptionBudget; one
PriorityClass per priority class; per model a Gateway API ``HTTPRoute`` with weighted backendRefs.

    OUT/pools/<pool>/{deployment,service,hpa,pdb}.yaml
    OUT/priorityclasses.yaml
    OUT/httproutes/<model>.yaml

The pod of a pool is made by ``mlopt.package.kube.workload`` from the manifest entry (image by
digest, the SKU's resources, node selector and tolerations from the catalog), with the market's
node label (on-demand or spot), the model's PriorityClass and a spread over zones added. Built-in kinds are validated
offline, strictly, with kubernetes-validate (``kube.validate_k8s``). HTTPRoute is a custom resource
whose CRD schema is not available offline here: it is checked against ``HTTPROUTE_SCHEMA``, the
Gateway API v1 fields written here with the CRD's limits (16 backendRefs a rule, weights 0..1e6).

The HPA scales on a per-pod request rate (``mlopt_inference_requests_per_second``), which needs a
metrics adapter (prometheus-adapter) exposing the serving runtime's request counter.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from mlopt.core.errors import BadInput
from mlopt.core.util import inside
from mlopt.manifest import Manifest, read_manifest
from mlopt.package import kube
from mlopt.package.serving import Deployable, ServingOptions
from mlopt.plan.inputs import PRIORITIES
from mlopt.plan.result import ModelPlan, Plan, PoolPlan
from mlopt.store import Artifact
from mlopt.targets.catalog import load_catalog

RATE_METRIC = "mlopt_inference_requests_per_second"
_DNS = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_NAME = {"type": "string", "pattern": _DNS, "maxLength": 63}
_BACKEND_REF = {"type": "object", "additionalProperties": False, "required": ["name", "port"],
                "properties": {"name": _NAME, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                               "weight": {"type": "integer", "minimum": 0, "maximum": 1_000_000}}}
_MATCH = {"type": "object", "additionalProperties": False, "properties": {"path": {
    "type": "object", "additionalProperties": False, "required": ["type", "value"],
    "properties": {"type": {"enum": ["Exact", "PathPrefix"]},
                   "value": {"type": "string", "pattern": "^/", "maxLength": 1024}}}}}
HTTPROUTE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Gateway API v1 HTTPRoute (the fields mlopt writes, with the CRD's limits)",
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                     "properties": {"name": _NAME, "labels": {"type": "object",
                                                              "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["parentRefs", "rules"], "properties": {
            "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 253}}}},
            "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                "type": "object", "additionalProperties": False, "required": ["backendRefs"],
                "properties": {"matches": {"type": "array", "maxItems": 64, "items": _MATCH},
                               "backendRefs": {"type": "array", "minItems": 1, "maxItems": 16,
                                               "items": _BACKEND_REF}}}}}},
    },
}


def dns_name(text: str) -> str:
    """A DNS-1123 label: lower case, at most 63 characters (a hash keeps long names distinct)."""
    base = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return base if len(base) <= 63 else base[:54].rstrip("-") + "-" + hashlib.sha256(base.encode()).hexdigest()[:8]


@lru_cache(maxsize=32)
def _manifest(path: str) -> Manifest:
    return read_manifest(Path(path))


def deployable(pool: PoolPlan, catalog: str | None) -> Deployable:
    """The pool's build as a ``Deployable``, from its manifest entry (no store needed: the pod is
    made from the manifest's artifact reference and measurement)."""
    manifest = _manifest(pool.manifest)
    entry = manifest.entries[pool.entry]
    c = next(c for c in entry.candidates if c.artifact and c.artifact.key == pool.artifact_key)
    entry = entry.model_copy(update={"chosen_backend": c.backend, "artifact": c.artifact, "precision": c.precision,
                                     "measurement": c.measurement})
    model = next(m for m in manifest.models if m.name == entry.model and m.version == entry.version)
    artifact = Artifact(key=c.artifact.key, path=Path(c.artifact.path), meta={})
    return Deployable(manifest, model, entry, load_catalog(catalog).get(pool.sku), artifact, c.compiled)


def pool_workload(plan: Plan, pool: PoolPlan, model: ModelPlan, image: str) -> tuple[kube.Workload, ServingOptions]:
    """The pool's pod: ``kube.workload`` plus its market's nodes, PriorityClass and batch settings."""
    options = ServingOptions(latency_sla_ms=model.p99_sla_ms, replicas=pool.replicas, max_replicas=pool.replicas,
                             server_overhead_ms=pool.server_overhead_ms)
    w = kube.workload(deployable(pool, plan.catalog), image, options)
    name = dns_name(f"{pool.model}-{pool.backend}-{pool.precision or ''}-{pool.sku}-{pool.market}")
    labels = {**w.labels, "app.kubernetes.io/name": name, "mlopt.dev/market": pool.market}
    notes = {**w.annotations, "mlopt.dev/max-batch": str(pool.max_batch),
             "mlopt.dev/queue-delay-us": str(pool.queue_delay_us)}
    pod = {**w.pod, "nodeSelector": {**w.pod.get("nodeSelector", {}), plan.capacity_type_label: pool.market},
           "priorityClassName": priority_class_name(model.priority),
           # replicas spread over the fleet's zones, so a zone outage takes as few as it can
           "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                          "whenUnsatisfiable": "ScheduleAnyway",
                                          "labelSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}]}
    return replace(w, name=name, labels=labels, annotations=notes, pod=pod), options


def priority_class_name(priority: str) -> str:
    return f"mlopt-{priority}"


def hpa(w: kube.Workload, pool: PoolPlan, model: ModelPlan) -> dict[str, Any]:
    """autoscaling/v2: from the replicas the mean rate needs (plus one for N+1) to the planned peak's."""
    low = math.ceil(model.mean_rps * pool.weight / pool.replica_capacity_rps) + (1 if model.n_plus_one else 0)
    target = pool.peak_rps / pool.replicas
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": w.name, "labels": w.labels},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": w.name},
                     "minReplicas": max(1, min(low, pool.replicas)), "maxReplicas": pool.replicas,
                     "metrics": [{"type": "Pods", "pods": {"metric": {"name": RATE_METRIC},
                                                           "target": {"type": "AverageValue",
                                                                      "averageValue": f"{int(target * 1000)}m"}}}]}}


def pdb(w: kube.Workload) -> dict[str, Any]:
    """policy/v1: at most one replica down at a time (what N+1 is sized for)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": w.name, "labels": w.labels},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": w.name}}}}


def priority_classes(plan: Plan) -> list[dict[str, Any]]:
    """scheduling.k8s.io/v1 PriorityClasses of the plan's priority classes."""
    return [{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
             "metadata": {"name": priority_class_name(p)}, "value": PRIORITIES[p], "globalDefault": False,
             "description": f"mlopt plan: models of the {p} class"}
            for p in sorted({m.priority for m in plan.models}, key=lambda p: -PRIORITIES[p])]


def http_route(plan: Plan, model: ModelPlan, services: dict[str, str], port: int) -> dict[str, Any]:
    """A Gateway API HTTPRoute sending the model's requests to its pools' Services by weight."""
    refs = [{"name": services[name], "port": port, "weight": max(1, round(w * 1000))}
            for name, w in model.weights.items()]
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": dns_name(model.model), "labels": {"app.kubernetes.io/managed-by": "mlopt"}},
            "spec": {"parentRefs": [{"name": plan.gateway}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": f"/v2/models/{model.model}"}}],
                                "backendRefs": refs}]}}


def validate_http_route(doc: dict[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.validate(doc, HTTPROUTE_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise BadInput(f"HTTPRoute {doc['metadata'].get('name')}: invalid at {where or '(root)'}: {e.message}") from None


def image_of(pool: PoolPlan, placeholder: bool) -> str:
    if pool.image:
        return pool.image
    if not placeholder:
        raise BadInput(f"pool {pool.name} has no pushed image (a build other than the entry's chosen one, or one "
                       "not pushed)", hint="push the build's image (`mlopt image push`), or write placeholders")
    return f"placeholder.invalid/mlopt/{dns_name(pool.name)}@sha256:{'0' * 64}"


def write_k8s(plan: Plan, out_dir: Path, placeholder: bool = False, k8s_version: str | None = None) -> list[Path]:
    """Validate and write every object of the plan under ``out_dir``; returns the files written.
    A pool without a pushed image is an error, or with ``placeholder`` an invalid-registry image."""
    models = {m.model: m for m in plan.models}
    files: dict[str, list[dict[str, Any]]] = {}
    services: dict[str, str] = {}
    port = ServingOptions().port
    for pool in plan.pools:
        w, options = pool_workload(plan, pool, models[pool.model], image_of(pool, placeholder))
        docs = {"deployment": kube.deployment(w, options), "service": kube.service(w, options),
                "hpa": hpa(w, pool, models[pool.model]), "pdb": pdb(w)}
        for kind, doc in docs.items():
            kube.validate_k8s(doc, k8s_version)
            files[f"pools/{w.name}/{kind}.yaml"] = [doc]
        services[pool.name] = w.name
    files["priorityclasses.yaml"] = priority_classes(plan)
    for doc in files["priorityclasses.yaml"]:
        kube.validate_k8s(doc, k8s_version)
    for m in plan.models:
        route = http_route(plan, m, services, port)
        validate_http_route(route)
        files[f"httproutes/{route['metadata']['name']}.yaml"] = [route]
    return [_write(out_dir, rel, docs) for rel, docs in files.items()]


def _write(out_dir: Path, rel: str, docs: list[dict[str, Any]]) -> Path:
    path = inside(out_dir, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a JSON round trip unshares the label dicts, so the YAML has no &anchors
    path.write_text(yaml.safe_dump_all([json.loads(json.dumps(d)) for d in docs], sort_keys=False))
    return path
