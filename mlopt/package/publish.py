"""Pushing built images to a registry (``HOST/REPO``, one tag per image), with the registry HTTP
API (default) or ``skopeo``; and the image and serving options a recipe's sections give (``mlopt
compile --push`` is ``mlopt.compiler.publish``, which uses both).

Blobs go first, the manifest last, so a failure leaves no tag pointing at a partial image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlopt.core.util import Log
from mlopt.core.errors import BackendUnavailable, BadInput, RegistryError
from mlopt.package.auth import docker_config_path
from mlopt.package.image import BuiltImage, ImageOptions, read_record, record_in_manifest, write_record
from mlopt.package.oci import OCI_MANIFEST, Descriptor, Layout
from mlopt.core.refs import ImageRef, check_tag, parse_repository, plain_http
from mlopt.package.registry import Registry
from mlopt.package.serving import ServingOptions

PUSHERS = ("http", "skopeo")


@dataclass(frozen=True)
class PushOptions:
    registry: str  # HOST/REPO
    via: str = "http"
    chunk_bytes: int = 0  # 0: each blob in one streamed PATCH


def push_images(out: Path, options: PushOptions, log: Log = print, skus: tuple[str, ...] = (),
                manifest_path: Path | None = None) -> list[BuiltImage]:
    """Push the images recorded in ``out/images.json`` (those of ``skus`` when given); record the
    pushed references in the manifest at ``manifest_path`` when given."""
    dest = parse_repository(options.registry)
    if options.via not in PUSHERS:
        raise BadInput(f"unknown pusher {options.via!r}; choose from {', '.join(PUSHERS)}")
    images = [i for i in read_record(out) if not skus or i.sku in skus]
    if not images:
        raise BadInput(f"no built images in {out}", hint="run `mlopt image build MANIFEST` first")
    layout = Layout(out / "oci")
    for img in images:
        ref = dest.with_tag(img.tag)
        digest = push_one(layout, img.tag, ref, options)
        pushed = str(ref.with_digest(digest))
        img.pushed = [p for p in img.pushed if p.split("@")[0].rsplit(":", 1)[0] != ref.name] + [pushed]
        log(f"[push] {img.sku}: {ref} {digest[:19]}")
    write_record(out, images)
    if manifest_path is not None:
        record_in_manifest(manifest_path, images)
    return images


def push_one(layout: Layout, tag: str, dest: ImageRef, options: PushOptions) -> str:
    """Push one tagged image of ``layout`` to ``dest`` (whose tag is set); returns the manifest digest."""
    check_tag(tag, dest.name)
    desc = layout.resolve(tag)
    if options.via == "skopeo":
        return _skopeo(layout, tag, dest, desc)
    return _http(layout, desc, dest, options.chunk_bytes)


def _http(layout: Layout, desc: Descriptor, dest: ImageRef, chunk_bytes: int) -> str:
    manifest_bytes = layout.read_bytes(desc.digest)
    manifest = json.loads(manifest_bytes)
    reg = Registry(dest.registry, chunk_bytes=chunk_bytes)
    for blob in [Descriptor.from_json(manifest["config"])] + [Descriptor.from_json(d) for d in manifest["layers"]]:
        path = layout.blob_path(blob.digest)
        if not path.is_file():
            raise BadInput(f"blob {blob.digest} is missing from {layout.root}; the image is incomplete",
                           hint="build it again with `mlopt image build`")
        if not reg.blob_exists(dest.repository, blob.digest):
            reg.upload_blob(dest.repository, blob, path)
    assert dest.tag is not None
    return reg.put_manifest(dest.repository, dest.tag, manifest_bytes, manifest.get("mediaType") or OCI_MANIFEST)


def _skopeo(layout: Layout, tag: str, dest: ImageRef, desc: Descriptor) -> str:
    exe = shutil.which("skopeo")
    if exe is None:
        raise BackendUnavailable("skopeo is not installed", hint="apt-get install skopeo, or push with --via http")
    problems = layout.verify_tag(tag)
    if problems:
        raise BadInput(f"image {tag} in {layout.root} is damaged: {problems[0]}; nothing was pushed",
                       hint="build it again with `mlopt image build`")
    with tempfile.TemporaryDirectory() as tmp:
        digest_file = Path(tmp) / "digest"
        cmd = [exe, "copy", "--retry-times", "1", "--digestfile", str(digest_file), "--preserve-digests"]
        if plain_http(dest.registry):
            cmd.append("--dest-tls-verify=false")
        if docker_config_path().is_file():
            cmd += ["--dest-authfile", str(docker_config_path())]
        res = subprocess.run(cmd + [f"oci:{layout.root}:{tag}", f"docker://{dest}"], capture_output=True, text=True)
        if res.returncode != 0:
            raise _skopeo_error(dest, res.stderr or res.stdout)
        return digest_file.read_text().strip() or desc.digest


def _skopeo_error(dest: ImageRef, text: str) -> RegistryError:
    low = text.lower()
    last = text.strip().splitlines()[-1][:300] if text.strip() else "no output"
    if "connection refused" in low or "no such host" in low or "i/o timeout" in low:
        return RegistryError(f"registry {dest.registry} is unreachable (skopeo): {last}")
    if "unauthorized" in low or "authentication required" in low:
        return RegistryError(f"registry {dest.registry} refused the credentials for {dest.repository} "
                             f"(from {docker_config_path()}): {last}",
                             hint=f"check them with `docker login {dest.registry}`")
    return RegistryError(f"skopeo could not push to {dest}: {last}")


def serving_options(s: Any) -> ServingOptions:
    """ServingOptions from a recipe's ``serving:`` section."""
    return ServingOptions(s.latency_sla_ms, s.port, s.replicas, s.max_replicas, s.unmeasured_max_batch)


def image_options(img: Any, serving: Any, out: Path) -> ImageOptions:
    """ImageOptions from a recipe's ``image:`` and ``serving:`` sections."""
    return ImageOptions(out, img.base_image, dict(img.base_images), img.runtime_dir, dict(img.runtime_dirs), img.tag,
                        img.builder, img.compress, serving=serving_options(serving))
