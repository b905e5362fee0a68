"""One OCI image per (model, SKU): the SKU's base image plus a layer holding the artifact and a
layer holding its serving config and the entry point, written daemonless into an OCI layout.

Output folder (default: ``image/`` beside the manifest)::

    oci/                  an OCI image layout; one tag per image, ``v{version}-{sku}`` by default
    context/<tag>/        the equivalent Dockerfile build context, for teams that build their own
    images.json           what was built (tag, digest, base, artifact) and where it was pushed

Image contents: ``/opt/mlopt/model/`` (the artifact's files and ``artifact.json``),
``/opt/mlopt/serving/`` (``serve.json``, ``requirements.txt``, a Triton model repository under
``triton/`` whose model files are hard links to ``model/``'s: real files, stored once), ``/opt/mlopt/entry.py`` with the
``mlopt.runtime`` package it calls beside it (``/opt/mlopt/mlopt_runtime/``), and, with a runtime
folder, ``/opt/mlopt/site-packages/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlopt import __version__ as mlopt_version
from mlopt.core.errors import BadInput
from mlopt.manifest import ImageRecord, Manifest, read_manifest, write_manifest
from mlopt.package.base import BaseImage, load_base
from mlopt.package.contents import SITE_PACKAGES, artifact_files, runtime_files, serving_files
from mlopt.package.context import image_env, write_context
from mlopt.package.oci import (
    GZIP_LEVEL,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    Layer,
    Layout,
    canonical_json,
)
from mlopt.core.refs import check_tag
from mlopt.package.serving import (
    ENTRY_PATH,
    IMAGE_ROOT,
    RUN_AS,
    SERVING_DIR,
    Deployable,
    ServingOptions,
    deployables,
    removed_on_failure,
)
from mlopt.store import Store
from mlopt.targets.catalog import load_catalog
from mlopt.core.util import Log, NAME_RULE, inside, is_safe_name

RECORD = "images.json"
LABEL = "dev.mlopt"


@dataclass(frozen=True)
class ImageOptions:
    """How images are built (the recipe's ``image:`` section plus flags)."""

    out: Path
    base_image: str | None = None  # for every SKU, over the catalog's
    base_images: dict[str, str] = field(default_factory=dict)  # per SKU, over base_image
    runtime_dir: str | None = None  # a folder of Python packages for /opt/mlopt/site-packages
    runtime_dirs: dict[str, str] = field(default_factory=dict)
    tag: str = "v{version}-{sku}"
    builder: str = "builtin"
    compress: bool = True
    skus: tuple[str, ...] = ()
    serving: ServingOptions = field(default_factory=ServingOptions)


@dataclass
class BuiltImage:
    """One built image, as recorded in images.json."""

    model: str
    version: int
    sku: str
    backend: str
    tag: str
    digest: str
    artifact: str
    base: str
    base_digest: str
    builder: str
    pushed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_images(manifest_path: Path, store: Store | None, options: ImageOptions, log: Log = print,
                 catalog: str | None = None) -> list[BuiltImage]:
    """Build an image for every deployable entry of the manifest at ``manifest_path`` (``mlopt image
    build``); record each image in its entry of that manifest."""
    manifest = read_manifest(manifest_path)
    built = build_manifest_images(manifest, store, options, log, catalog)
    record_images(manifest, built)
    write_manifest(manifest, Path(manifest_path))
    return built


def build_manifest_images(manifest: Manifest, store: Store | None, options: ImageOptions, log: Log = print,
                          catalog: str | None = None) -> list[BuiltImage]:
    """Build an image for every deployable entry of ``manifest`` (store: the manifest's by default) and
    record them in ``options.out``'s images.json; the manifest is the caller's to record them in."""
    store = store or Store(manifest.store)
    items, skipped = deployables(manifest, store, load_catalog(catalog), options.skus)
    for reason in skipped:
        log(f"[image] skipped {reason}")
    # every tag and base image is resolved before any image is written
    tags = {d.slug: image_tag(options.tag, d) for d in items}
    _unique_tags(tags, options.tag)
    with removed_on_failure(options.out):
        layout = Layout(options.out / "oci", create=True)
        cache: dict[tuple[str, str], BaseImage] = {}
        bases = {d.slug: _base(d, layout, options, cache, log) for d in items}
        built = [_build_one(d, tags[d.slug], layout, bases[d.slug], options, log) for d in items]
        write_record(options.out, built)
    return built


def _unique_tags(tags: dict[str, str], template: str) -> None:
    """Two builds may not share a tag (a build matrix's manifest holds several models per SKU)."""
    seen: dict[str, str] = {}
    for slug, tag in tags.items():
        if tag in seen:
            raise BadInput(f"--tag {template!r} gives {seen[tag]} and {slug} the same tag {tag!r}",
                           hint="put {model} in the tag template, e.g. --tag '{model}-v{version}-{sku}'")
        seen[tag] = slug


def record_in_manifest(manifest_path: Path, images: list[BuiltImage]) -> None:
    """Write each image's digest (and where it was pushed) into its entry of the manifest file, atomically."""
    manifest = read_manifest(manifest_path)
    record_images(manifest, images)
    write_manifest(manifest, Path(manifest_path))


def record_images(manifest: Manifest, images: list[BuiltImage]) -> None:
    """Set each entry's image record (digest, base, where it was pushed) from the image built for it."""
    by_key = {(i.model, i.version, i.sku): i for i in images}
    for entry in manifest.entries:
        img = by_key.get((entry.model, entry.version, entry.sku))
        if img is not None:
            entry.image = ImageRecord(tag=img.tag, digest=img.digest, base=img.base, base_digest=img.base_digest,
                                      pushed=list(img.pushed))


def _base(d: Deployable, layout: Layout, options: ImageOptions, cache: dict[tuple[str, str], BaseImage],
          log: Log) -> BaseImage:
    text = base_image_for(d, options)
    if (text, d.sku.machine) not in cache:
        log(f"[image] base {text} for {d.sku.machine}")
        cache[(text, d.sku.machine)] = load_base(text, d.sku.machine, layout)
    return cache[(text, d.sku.machine)]


def image_tag(template: str, d: Deployable) -> str:
    """The tag of a deployable's image from a template with {model} {version} {sku} {backend}."""
    try:
        tag = template.format(model=d.model.name, version=d.entry.version, sku=d.sku.name, backend=d.backend)
    except (KeyError, IndexError, ValueError) as e:
        raise BadInput(f"--tag {template!r}: {e}; placeholders are {{model}} {{version}} {{sku}} {{backend}}") from None
    if not is_safe_name(tag):  # a tag is also a folder name (context/<tag>)
        raise BadInput(f"{d.slug}: image tag {tag!r} must be {NAME_RULE}", hint="fix --tag or the model name")
    return check_tag(tag, f"{d.slug}")


def _build_one(d: Deployable, tag: str, layout: Layout, base: BaseImage, options: ImageOptions, log: Log) -> BuiltImage:
    labels = image_labels(d, base)
    runtime = options.runtime_dirs.get(d.sku.name) or options.runtime_dir
    context = write_context(d, base, inside(options.out, "context", tag), options.serving, runtime, labels)
    if options.builder == "builtin":
        desc = assemble(d, base, layout, options, labels)
        layout.tag(tag, desc)
    else:
        from mlopt.package.builders import build_with

        desc = build_with(options.builder, context, layout, tag)
    log(f"[image] {d.sku.name}: {layout.root}:{tag} {desc.digest[:19]} ({options.builder})")
    return BuiltImage(d.model.name, d.entry.version, d.sku.name, d.backend, tag, desc.digest, d.artifact.key,
                      base.name, base.digest, options.builder)


def base_image_for(d: Deployable, options: ImageOptions) -> str:
    """The base image of a SKU: per-SKU override, then the global one, then the catalog's."""
    found = options.base_images.get(d.sku.name) or options.base_image or d.sku.base_image
    if not found:
        raise BadInput(f"SKU {d.sku.name} has no base image in the catalog",
                       hint="give --base-image (or image.base_image / image.base_images in the recipe)")
    return found


def assemble(d: Deployable, base: BaseImage, layout: Layout, options: ImageOptions,
             labels: dict[str, str]) -> Descriptor:
    """Write the layers, config and manifest of one image (not tagged); returns the manifest's descriptor."""
    level = GZIP_LEVEL if options.compress else None
    layers = [layout.write_layer(artifact_files(d), level)]
    runtime = options.runtime_dirs.get(d.sku.name) or options.runtime_dir
    if runtime:
        layers.append(layout.write_layer(runtime_files(Path(runtime)), level))
    layers.append(layout.write_layer(serving_files(d, options.serving), level))
    config = image_config(d, base, layers, labels, bool(runtime), options.serving.port)
    config_desc = layout.put_bytes(canonical_json(config), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_json(),
                "layers": [b.to_json() for b in base.layers] + [layer.descriptor.to_json() for layer in layers],
                "annotations": labels}
    platform = {"os": config.get("os", "linux"), "architecture": config["architecture"]}
    desc = layout.put_bytes(canonical_json(manifest), OCI_MANIFEST)
    return Descriptor(desc.media_type, desc.digest, desc.size, platform=platform)


def image_labels(d: Deployable, base: BaseImage) -> dict[str, str]:
    """OCI annotations (``org.opencontainers.image.*``) and mlopt's own, on the config and manifest."""
    art = d.artifact.meta
    labels = {
        "org.opencontainers.image.title": d.model.name,
        "org.opencontainers.image.version": f"v{d.entry.version}",
        "org.opencontainers.image.created": art.get("created", ""),
        "org.opencontainers.image.description": f"{d.model.name} v{d.entry.version} for {d.sku.name} "
                                                f"({d.backend}, {d.entry.precision}), built by mlopt",
        "org.opencontainers.image.base.name": base.name,
        "org.opencontainers.image.base.digest": base.digest,
        f"{LABEL}.model": d.model.name, f"{LABEL}.model.version": str(d.entry.version),
        f"{LABEL}.artifact.key": d.artifact.key, f"{LABEL}.artifact.digest": art.get("content_digest", ""),
        f"{LABEL}.sku": d.sku.name, f"{LABEL}.sku.arch": d.sku.arch, f"{LABEL}.backend": d.backend,
        f"{LABEL}.precision": d.entry.precision or "", f"{LABEL}.compiled": d.compiled or "",
        f"{LABEL}.recipe.digest": d.manifest.recipe.digest, f"{LABEL}.version": mlopt_version,
    }
    req = d.sku.requirements
    if req.driver:
        labels[f"{LABEL}.requires.driver"] = req.driver
    for name, version in sorted(req.runtimes.items()):  # the SKU's minimums
        labels[f"{LABEL}.requires.runtime.{name}"] = version
    for name, version in sorted(art.get("toolchain", {}).items()):  # what made the artifact
        if version != "absent":
            labels[f"{LABEL}.built-with.{name}"] = version
    return labels


def image_config(d: Deployable, base: BaseImage, layers: list[Layer], labels: dict[str, str],
                 runtime: bool, port: int) -> dict[str, Any]:
    """The image config: the base's, with mlopt's entry point, environment, port, labels and layers,
    run as a non-root user (``RUN_AS``; the image's files are root's, readable by it)."""
    cfg = json.loads(json.dumps(base.config))
    c = cfg.get("config") or {}
    cfg["config"] = c
    ours = image_env(SITE_PACKAGES if runtime else None)
    env = [e for e in c.get("Env") or [] if e.split("=", 1)[0] not in ours]
    c.update({"Env": env + [f"{k}={v}" for k, v in ours.items()], "User": f"{RUN_AS}:{RUN_AS}",
              "Entrypoint": ["python3", ENTRY_PATH], "Cmd": ["--serving", f"{SERVING_DIR}/serve.json"],
              "WorkingDir": IMAGE_ROOT, "ExposedPorts": {**(c.get("ExposedPorts") or {}), f"{port}/tcp": {}},
              "Labels": {**(c.get("Labels") or {}), **labels}})
    created = labels["org.opencontainers.image.created"] or cfg.get("created", "")
    cfg["created"] = created
    rootfs = cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [layer.diff_id for layer in layers]
    names = ["artifact"] + (["runtime"] if runtime else []) + ["serving config and entry point"]
    cfg["history"] = list(cfg.get("history") or []) + [
        {"created": created, "created_by": f"mlopt {mlopt_version} image build: {n}", "comment": d.slug} for n in names]
    return cfg


def write_record(out: Path, images: list[BuiltImage]) -> Path:
    """Merge ``images`` into ``out/images.json`` (an image replaces the record of the same tag)."""
    kept = [i for i in read_record(out) if i.tag not in {b.tag for b in images}]
    path = out / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(json.dumps({"layout": "oci", "images": [i.to_json() for i in kept + images]}, indent=2))
    tmp.replace(path)
    return path


def read_record(out: Path) -> list[BuiltImage]:
    """The images recorded in ``out/images.json`` (empty when there is none)."""
    path = out / RECORD
    if not path.is_file():
        return []
    try:
        return [BuiltImage(**i) for i in json.loads(path.read_text())["images"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is not an mlopt images record: {e}", hint="build again with `mlopt image build`") from None
