"""The Dockerfile build context equivalent to a built-in image, for teams that build their own
(``docker build``, ``buildah build``, ``podman build``, or mlopt's ``--builder`` option).

The context holds the same files as the image's layers: ``model/`` (hard links to the store's
files where the file system allows), ``serving/``, ``entry.py``, ``mlopt_runtime/`` (the loaders
entry.py calls) and, with a runtime folder, ``runtime/``. The Dockerfile pins the base by digest. A builder's layers carry its own timestamps,
so its image digest differs from the built-in one; the files inside are the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlopt.core.refs import LayoutRef, parse_base
from mlopt.core.util import inside
from mlopt.package.base import BaseImage
from mlopt.package.contents import SITE_PACKAGES, artifact_files, serving_files
from mlopt.package.oci import FileEntry
from mlopt.package.serving import (
    ENTRY_PATH,
    IMAGE_ROOT,
    MODEL_DIR,
    RUN_AS,
    RUNTIME_PATH,
    SERVING_DIR,
    Deployable,
    ServingOptions,
    staged,
)


def write_context(d: Deployable, base: BaseImage, folder: Path, serving: ServingOptions, runtime: Path | None,
                  labels: dict[str, str]) -> Path:
    """Write the build context of one image into ``folder`` (replacing what was there); ``runtime``: the
    image's runtime folder (Python packages), if it has one. It is written beside ``folder`` and
    renamed into place, so a failure leaves the previous context (or none), never half of one."""
    with staged(folder) as tmp:
        for f in [*artifact_files(d), *serving_files(d, serving)]:
            _place(f, inside(tmp, _context_path(f.path)), tmp)
        if runtime:
            shutil.copytree(runtime, tmp / "runtime", symlinks=True)
        (tmp / "Dockerfile").write_text(dockerfile(base, labels, serving.port,
                                                   SITE_PACKAGES if runtime else None, runtime_notes(d)))
    return folder


def _context_path(path: str) -> str:
    """An image path's place in the context: entry.py, model/..., serving/..., mlopt_runtime/..."""
    return "entry.py" if path == ENTRY_PATH else path[len(IMAGE_ROOT) + 1:]


# TVM's PyPI wheel carries the CUDA runtime plugin but no HIP one: a ROCm build's image needs a TVM
# runtime built with ROCm on a ROCm base image (the runtime alone: no LLVM, a few MB).
ROCM_TVM_RUNTIME = [
    "# This is a TVM ROCm (gfx) build: the PyPI apache-tvm wheel has no HIP runtime. Build TVM's runtime",
    "# with ROCm on this ROCm base image instead of installing the wheel, for example:",
    "#   RUN git clone --recursive --depth 1 --branch v{version} https://github.com/apache/tvm /tmp/tvm \\",
    "#    && cmake -S /tmp/tvm -B /tmp/tvm/build -DUSE_ROCM=ON -DUSE_LLVM=OFF -DCMAKE_BUILD_TYPE=Release \\",
    "#    && cmake --build /tmp/tvm/build --target tvm_runtime -j \\",
    "#    && TVM_LIBRARY_PATH=/tmp/tvm/build python3 -m pip install /tmp/tvm/python && rm -rf /tmp/tvm",
    "# and run with TVM_USE_RUNTIME_LIB=1 (serving/requirements.txt then needs no apache-tvm line).",
]


def runtime_notes(d: Deployable) -> list[str]:
    """Dockerfile comment lines on what this build's runtime needs beyond requirements.txt."""
    entry = d.artifact.path / "tvm_entry.json"
    if d.backend != "tvm" or not entry.is_file():
        return []
    info = json.loads(entry.read_text())
    if info.get("device") != "rocm":
        return []
    version = info.get("runtime", {}).get("version", "0.27.0").split(".post")[0]
    return [line.replace("{version}", version) for line in ROCM_TVM_RUNTIME]


def _place(f: FileEntry, dest: Path, root: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if f.link is not None:
        dest.symlink_to(f.link)
    elif f.data is not None:
        dest.write_bytes(f.data)
    else:
        src = inside(root, _context_path(f.hardlink)) if f.hardlink is not None else f.source
        assert src is not None
        try:
            dest.hardlink_to(src)
        except OSError:
            shutil.copyfile(src, dest)
        if f.mode & 0o111:
            dest.chmod(0o755)


def base_from(base: BaseImage) -> str:
    """The FROM line's image: a registry base pinned by digest; a layout base as buildah names it."""
    ref = parse_base(base.name)
    if isinstance(ref, LayoutRef):
        return base.name
    return f"{ref.name}@{base.digest}"


def image_env(site_packages: str | None) -> dict[str, str]:
    """The environment mlopt's images set: where serve.json is, unbuffered logs, no bytecode writes
    (the root file system may be read-only), HOME on the writable /tmp (the user has no home)."""
    return {"MLOPT_SERVING": f"{SERVING_DIR}/serve.json", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/tmp", **({"PYTHONPATH": site_packages} if site_packages else {})}


def dockerfile(base: BaseImage, labels: dict[str, str], port: int, site_packages: str | None,
               notes: list[str] | None = None) -> str:
    """The Dockerfile of the image: same files, environment, entry point and labels."""
    serve = f"{SERVING_DIR}/serve.json"
    env = image_env(site_packages)
    lines = [
        "# Written by mlopt: the image `mlopt image build` makes without a daemon, as a Dockerfile.",
        "# An oci:PATH base is read by buildah and podman; with docker, pass --build-arg BASE_IMAGE=...",
        f"ARG BASE_IMAGE={base_from(base)}",
        "FROM ${BASE_IMAGE}",
        f"COPY model/ {MODEL_DIR}/",
        *([f"COPY runtime/ {site_packages}/"] if site_packages else []),
        f"COPY serving/ {SERVING_DIR}/",
        f"COPY entry.py {ENTRY_PATH}",
        f"COPY {RUNTIME_PATH[len(IMAGE_ROOT) + 1:]}/ {RUNTIME_PATH}/",
        "# The entry point needs python3, numpy and the build's runtime (serving/requirements.txt) in the base image",
        "# or the runtime folder; with network access: RUN python3 -m pip install -r /opt/mlopt/serving/requirements.txt",
        *(notes or []),
        "ENV " + " ".join(f"{k}={json.dumps(v)}" for k, v in env.items()),
        "LABEL " + " \\\n      ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in sorted(labels.items())),
        f"EXPOSE {port}",
        "WORKDIR /opt/mlopt",
        "# a non-root user (no passwd entry needed); the files above are root's and read-only to it",
        f"USER {RUN_AS}:{RUN_AS}",
        f'ENTRYPOINT ["python3", "{ENTRY_PATH}"]',
        f'CMD ["--serving", "{serve}"]',
    ]
    return "\n".join(lines) + "\n"
