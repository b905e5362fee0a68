"""Base images: read from a registry or an OCI layout on disk, for one platform, and their layer
blobs brought into the layout being built (streamed from the registry, hard-linked or copied from
a layout), so the built layout is complete on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlopt.core.errors import BadInput, RegistryError
from mlopt.package.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    TO_OCI,
    Descriptor,
    Layout,
    select_platform,
)
from mlopt.core.refs import ImageRef, LayoutRef, parse_base
from mlopt.package.registry import Registry

ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class BaseImage:
    """A base image for one platform: its name, manifest digest, config and layers (OCI types)."""

    name: str
    digest: str
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]


def load_base(text: str, machine: str, into: Layout) -> BaseImage:
    """Resolve ``text`` (``oci:PATH[:TAG]`` or a registry reference) for ``machine`` (x86_64,
    aarch64) and copy its layers into ``into``. A base that does not exist is a RegistryError."""
    ref = parse_base(text)
    arch = ARCHES.get(machine, machine)
    if isinstance(ref, LayoutRef):
        return _from_layout(ref, arch, into)
    return _from_registry(ref, arch, into)


def _from_layout(ref: LayoutRef, arch: str, into: Layout) -> BaseImage:
    if not (ref.path / "index.json").is_file():
        raise RegistryError(f"base image {ref} does not exist: {ref.path} is not an OCI image layout",
                            hint="give --base-image oci:PATH[:TAG] of a folder with oci-layout and index.json")
    src = Layout(ref.path)
    try:
        desc = src.resolve(ref.tag)
    except BadInput as e:
        raise RegistryError(f"base image {ref} does not exist: {e.message}") from None
    if desc.media_type in INDEX_TYPES:
        desc = select_platform(src.read_json(desc.digest), "linux", arch, f"base image {ref}")
    manifest = src.read_json(desc.digest)
    config, layers = _parts(manifest, src.read_json, str(ref))
    _check_arch(config, arch, str(ref))
    for layer in layers:
        into.import_blob(src.blob_path(layer.digest), layer)
    return BaseImage(str(ref), desc.digest, config, layers)


def _from_registry(ref: ImageRef, arch: str, into: Layout) -> BaseImage:
    reg = Registry(ref.registry)
    data, media, digest = reg.get_manifest(ref.repository, ref.reference)
    doc = json.loads(data)
    media = media if media in (*INDEX_TYPES, *MANIFEST_TYPES) else doc.get("mediaType", "")
    if media in INDEX_TYPES:
        chosen = select_platform(doc, "linux", arch, f"base image {ref}")
        data, media, digest = reg.get_manifest(ref.repository, chosen.digest)
        doc = json.loads(data)

    def read_json(blob_digest: str) -> dict[str, Any]:
        if not into.has_blob(blob_digest):
            with into.blob_writer() as w:
                reg.fetch_blob(ref.repository, Descriptor("", blob_digest, 0), w)
        return into.read_json(blob_digest)

    config, layers = _parts(doc, read_json, str(ref))
    _check_arch(config, arch, str(ref))
    for layer in layers:
        if not into.has_blob(layer.digest):
            with into.blob_writer() as w:
                reg.fetch_blob(ref.repository, layer, w)
    name = f"{ref.name}:{ref.tag}" if ref.tag else ref.name
    return BaseImage(name, digest, config, layers)


def _parts(manifest: dict[str, Any], read_json: Any, where: str) -> tuple[dict[str, Any], tuple[Descriptor, ...]]:
    """The config document and the layers (with OCI media types) of an image manifest."""
    if "config" not in manifest or "layers" not in manifest:
        raise BadInput(f"base image {where}: its manifest is not an image manifest (schema 1 is not supported)")
    layers = []
    for d in manifest["layers"]:
        desc = Descriptor.from_json(d)
        if desc.media_type not in TO_OCI:
            raise BadInput(f"base image {where}: layer type {desc.media_type} is not supported (foreign or zstd layer)")
        layers.append(Descriptor(TO_OCI[desc.media_type], desc.digest, desc.size, desc.annotations))
    config = read_json(manifest["config"]["digest"])
    if len(config.get("rootfs", {}).get("diff_ids", [])) != len(layers):
        raise BadInput(f"base image {where}: its config lists {len(config.get('rootfs', {}).get('diff_ids', []))} "
                       f"layers, its manifest {len(layers)}")
    return config, tuple(layers)


def _check_arch(config: dict[str, Any], arch: str, where: str) -> None:
    have = config.get("architecture")
    if have and have != arch:
        raise BadInput(f"base image {where} is for {config.get('os', 'linux')}/{have}, the SKU needs linux/{arch}",
                       hint="give a multi-platform base or one for the SKU's architecture (image.base_images in the "
                            "recipe sets one per SKU), or build only some SKUs with --sku")
