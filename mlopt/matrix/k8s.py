"""The k8s executor: one Kubernetes Job per task, validated offline; ``kubectl apply -f`` submits them.

Each Job runs ``mlopt compile RECIPE --target SKU`` in the mlopt image. A GPU SKU's Job asks for the
SKU's extended resource (``nvidia.com/gpu`` ...) and carries its node selector, so it runs on that
GPU and measures there; with ``placement: anywhere`` it carries neither (a cross-compile). A CPU
SKU's Job carries the SKU's node selector (architecture, instance type) so that it is measured on
that CPU. The artifact store is a PersistentVolumeClaim (``STORE_CLAIM``) mounted at ``/store``;
each task's manifest goes to ``/store/matrix/<recipe>--<sku>/``. The recipe path is the one given
on the command line, relative to the container's working directory ``/workspace`` when it was
relative here, so the image (or a volume) must hold the recipes' folders there.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from mlopt.core.errors import BadInput
from mlopt.matrix.tasks import MatrixConfig, Task

STORE_CLAIM = "mlopt-store"
STORE_MOUNT = "/store"
WORKDIR = "/workspace"
_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


def write_jobs(tasks: list[Task], config: MatrixConfig, out: Path) -> list[Path]:
    """Write and validate one Job manifest per task under ``out/jobs``; return their paths."""
    from mlopt.package.kube import validate_k8s

    if not config.image:
        raise BadInput("the k8s executor needs the image that runs mlopt",
                       hint="pass --image REPO:TAG (an image with mlopt and the recipes' folders under /workspace)")
    folder = out / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        job = job_manifest(task, config)
        validate_k8s(job)
        path = folder / f"{job['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        paths.append(path)
    return paths


def job_name(task: Task) -> str:
    """A DNS-1123 name for the task's Job (at most 63 characters, unique per task)."""
    digest = hashlib.sha256(task.id.encode()).hexdigest()[:6]
    base = _NAME_CHARS.sub("-", f"mlopt-{task.recipe_name}-{task.sku.name}".lower()).strip("-")
    return f"{base[:56].rstrip('-')}-{digest}"


def job_manifest(task: Task, config: MatrixConfig) -> dict[str, Any]:
    """A batch/v1 Job that builds ``task`` in the mlopt image."""
    labels = {"app.kubernetes.io/name": "mlopt", "app.kubernetes.io/component": "build-matrix",
              "app.kubernetes.io/managed-by": "mlopt", "mlopt.dev/recipe": task.recipe_name[:63],
              "mlopt.dev/sku": task.sku.name}
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [_container(task, config)],
                           "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": STORE_CLAIM}}]}
    on_device = task.sku.kind == "cpu" or config.placement != "anywhere"
    if on_device and task.sku.kubernetes.node_selector:
        pod["nodeSelector"] = dict(task.sku.kubernetes.node_selector)
    if on_device and task.sku.kubernetes.resource:
        pod["tolerations"] = [{"key": task.sku.kubernetes.resource, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(task), "namespace": config.namespace, "labels": labels,
                     "annotations": {"mlopt.dev/task": task.id, "mlopt.dev/recipe-path": task.recipe_path}},
        "spec": {"backoffLimit": config.retries, "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def _container(task: Task, config: MatrixConfig) -> dict[str, Any]:
    threads = task.recipe["benchmark"]["threads"]
    resources: dict[str, Any] = {"requests": {"cpu": str(threads)}}
    if task.sku.kubernetes.resource and (task.sku.kind == "cpu" or config.placement != "anywhere"):
        resources["limits"] = {task.sku.kubernetes.resource: "1"}
    args = ["compile", _recipe_arg(task.recipe_path), "--target", task.sku.name, "--store", STORE_MOUNT,
            "--out", f"{STORE_MOUNT}/matrix/{task.slug}"]
    if config.catalog:
        args += ["--catalog", _recipe_arg(str(Path(config.catalog).resolve()))]
    return {"name": "mlopt", "image": config.image, "imagePullPolicy": "IfNotPresent", "command": ["mlopt"],
            "args": args,
            "workingDir": WORKDIR, "env": [{"name": "MLOPT_STORE", "value": STORE_MOUNT}],
            "resources": resources, "volumeMounts": [{"name": "store", "mountPath": STORE_MOUNT}],
            "securityContext": {"allowPrivilegeEscalation": False}}


def _recipe_arg(path: str) -> str:
    """The recipe path as the container sees it: relative to the working directory when it is here."""
    p = Path(path)
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return p.as_posix()
