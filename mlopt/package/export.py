"""``mlopt export triton|k8s|kserve``: serving configs for every SKU of a manifest, written to a folder.

    OUT/<sku>/<model>/config.pbtxt, OUT/<sku>/<model>/1/...   a Triton model repository per SKU
    OUT/<sku>/deployment.yaml, OUT/<sku>/service.yaml        Kubernetes, image by digest
    OUT/<sku>/inferenceservice.yaml                          KServe v1beta1

Every file is validated before it is written (Triton's ModelConfig, kubernetes-validate strict, KServe's
CRD schema); a failure leaves no partial output folder behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlopt.core.errors import BadInput
from mlopt.manifest import read_manifest
from mlopt.core.util import Log, inside
from mlopt.package import kube, triton
from mlopt.package.image import BuiltImage, read_record
from mlopt.core.refs import parse_repository
from mlopt.package.serving import Deployable, ServingOptions, deployables, removed_on_failure
from mlopt.store import Store
from mlopt.targets.catalog import load_catalog



@dataclass(frozen=True)
class ExportOptions:
    out: Path
    serving: ServingOptions = field(default_factory=ServingOptions)
    store: str | None = None  # default: the manifest's
    catalog: str | None = None
    skus: tuple[str, ...] = ()
    images: Path | None = None  # folder with images.json (default: image/ beside the manifest)
    registry: str | None = None  # HOST/REPO for images built but not pushed
    k8s_version: str | None = None  # default: the newest kubernetes-validate knows
    kube: kube.KubeOptions = field(default_factory=kube.KubeOptions)  # pull secrets, engine cache claim


def _load(manifest_path: Path, options: ExportOptions, log: Log) -> list[Deployable]:
    manifest = read_manifest(manifest_path)
    items, skipped = deployables(manifest, Store(options.store or manifest.store), load_catalog(options.catalog),
                                 options.skus)
    for reason in skipped:
        log(f"[export] skipped {reason}")
    return items


def export_triton(manifest_path: Path, options: ExportOptions, log: Log = print) -> list[Path]:
    """One Triton model repository per SKU; returns the model folders."""
    folders = []
    items = _load(manifest_path, options, log)
    with removed_on_failure(options.out):
        for d in items:
            folders.append(triton.write_repository(d, inside(options.out, d.sku.name), options.serving))
            log(f"[export] {d.sku.name}: {folders[-1]}/config.pbtxt")
    return folders


def export_kubernetes(manifest_path: Path, options: ExportOptions, kind: str, log: Log = print) -> list[Path]:
    """Deployment + Service (``kind`` "k8s") or an InferenceService ("kserve") per SKU."""
    images = read_record(options.images or Path(manifest_path).parent / "image")
    made = []  # every document is made and validated before any is written
    for d in _load(manifest_path, options, log):
        w = kube.workload(d, image_ref(d, images, options.registry), options.serving, options.kube)
        made.append((d, _documents(w, options, kind)))
    written = []
    with removed_on_failure(options.out):
        for d, docs in made:
            folder = inside(options.out, d.sku.name)
            folder.mkdir(parents=True, exist_ok=True)
            for name, doc in docs.items():
                # a JSON round trip unshares the label dicts, so the YAML has no &anchors
                inside(folder, name).write_text(yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False))
                written.append(folder / name)
            log(f"[export] {d.sku.name}: {', '.join(str(folder / n) for n in docs)}")
    return written


def _documents(w: kube.Workload, options: ExportOptions, kind: str) -> dict[str, dict[str, Any]]:
    if kind == "kserve":
        isvc = kube.inference_service(w, options.serving)
        kube.validate_kserve(isvc, options.k8s_version)
        return {"inferenceservice.yaml": isvc}
    if kind != "k8s":
        raise BadInput(f"unknown export kind {kind!r}; choose from triton, k8s, kserve")
    docs = {"deployment.yaml": kube.deployment(w, options.serving), "service.yaml": kube.service(w, options.serving)}
    for doc in docs.values():
        kube.validate_k8s(doc, options.k8s_version)
    return docs


def image_ref(d: Deployable, images: list[BuiltImage], registry: str | None) -> str:
    """The image of a deployable by digest: where it was pushed, else in ``registry``."""
    built = [i for i in images if i.sku == d.sku.name and i.artifact == d.artifact.key]
    if not built:
        raise BadInput(f"no image built for {d.slug}", hint="run `mlopt image build MANIFEST` (and push it) first")
    img = built[-1]
    if registry:
        return f"{parse_repository(registry).name}@{img.digest}"
    if not img.pushed:
        raise BadInput(f"the image of {d.slug} was not pushed, so it has no registry name",
                       hint="run `mlopt image push MANIFEST --registry HOST/REPO`, or pass --registry")
    return _by_digest(img.pushed[-1])


def _by_digest(pushed: str) -> str:
    """HOST/REPO:TAG@sha256:... -> HOST/REPO@sha256:..."""
    name, _, digest = pushed.partition("@")
    repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    return f"{repo}@{digest}"
