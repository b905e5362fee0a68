"""External image builders for ``--builder``: buildah, podman or docker buildx build the Dockerfile
context instead of mlopt's built-in writer, and their image lands in the same OCI layout under the
same tag, so pushing and exporting work alike. The built-in writer stays the default and needs
none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlopt.core.errors import BackendUnavailable, BadInput
from mlopt.package.oci import INDEX_TYPES, Descriptor, Layout

BUILDERS = ("builtin", "buildah", "podman", "docker")


def commands(builder: str, context: Path, layout: Path, tag: str, scratch: Path) -> list[list[str]]:
    """The command lines that build ``context`` and leave the image in ``layout`` (or ``scratch``)."""
    local = f"localhost/mlopt-build:{tag}"
    if builder in ("buildah", "podman"):
        return [[builder, "build", "--format", "oci", "--timestamp", "0", "-t", local, str(context)],
                [builder, "push", local, f"oci:{layout}:{tag}"],
                [builder, "rmi", local]]
    if builder == "docker":
        return [["docker", "buildx", "build", "--build-arg", "SOURCE_DATE_EPOCH=0",
                 "--output", f"type=oci,dest={scratch},tar=false", str(context)]]
    raise BadInput(f"unknown builder {builder!r}; choose from {', '.join(BUILDERS)}")


def build_with(builder: str, context: Path, layout: Layout, tag: str) -> Descriptor:
    """Build with an external tool; returns the descriptor ``tag`` names in ``layout`` afterwards."""
    if shutil.which(builder) is None:
        raise BackendUnavailable(f"image builder {builder!r} is not installed",
                                 hint="leave out --builder to use mlopt's built-in daemonless builder")
    with tempfile.TemporaryDirectory(prefix="mlopt-buildx-") as tmp:
        scratch = Path(tmp) / "oci"
        for cmd in commands(builder, context, layout.root, tag, scratch):
            _run(cmd, builder)
        if builder == "docker":
            _import(Layout(scratch), layout, tag)
    return layout.resolve(tag)


def _run(cmd: list[str], builder: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise BackendUnavailable(f"{builder} failed ({' '.join(cmd[:3])} ...): {' / '.join(tail)[:400]}",
                                 hint="run the command by hand in the context folder to see why, "
                                      "or use the built-in builder")


def _import(src: Layout, dest: Layout, tag: str) -> None:
    """Copy the single image of ``src`` (a buildx OCI output) into ``dest`` under ``tag``."""
    manifests = src.index().get("manifests", [])
    if len(manifests) != 1:
        raise BackendUnavailable(f"docker buildx wrote {len(manifests)} images; expected one")
    desc = Descriptor.from_json(manifests[0])
    if desc.media_type in INDEX_TYPES:
        raise BackendUnavailable("docker buildx wrote a multi-platform index; build one platform")
    manifest = json.loads(src.read_bytes(desc.digest))
    for d in [manifest["config"], *manifest["layers"]]:
        dest.import_blob(src.blob_path(d["digest"]), Descriptor.from_json(d))
    dest.import_blob(src.blob_path(desc.digest), desc)
    dest.tag(tag, Descriptor(desc.media_type, desc.digest, desc.size))
