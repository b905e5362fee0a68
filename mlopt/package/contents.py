"""What an image's layers hold, as file entries: the artifact (``/opt/mlopt/model/``), a runtime folder
(``/opt/mlopt/site-packages/``), and the serving files (``serve.json``, ``requirements.txt``, the
Triton repository, ``entry.py`` and the ``mlopt_runtime`` package whose loaders it calls). The
built-in image (``image.py``) and the Dockerfile context (``context.py``) are both made from these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlopt.core.errors import BadInput
from mlopt.core.util import inside
from mlopt.package import triton
from mlopt.package.oci import FileEntry
from mlopt.package.serving import (
    ENTRY_PATH,
    IMAGE_ROOT,
    MODEL_DIR,
    RUNTIME_PATH,
    SERVING_DIR,
    Deployable,
    ServingOptions,
    requirements,
    serve_spec,
)
from mlopt.store import ARTIFACT_META

SITE_PACKAGES = f"{IMAGE_ROOT}/site-packages"


def artifact_files(d: Deployable) -> list[FileEntry]:
    """The artifact's files (streamed from the store) and its artifact.json."""
    files = [FileEntry(f"{MODEL_DIR}/{rel}", source=inside(d.artifact.path, rel)) for rel in sorted(d.artifact.meta["files"])]
    return files + [FileEntry(f"{MODEL_DIR}/{ARTIFACT_META}", source=d.artifact.path / ARTIFACT_META)]


def runtime_files(folder: Path) -> list[FileEntry]:
    """Every file and symlink of a runtime folder (Python packages), keeping executable bits."""
    if not folder.is_dir():
        raise BadInput(f"runtime folder {folder} does not exist",
                       hint="make one with: pip install --target DIR --platform manylinux2014_x86_64 "
                            "--only-binary=:all: -r requirements.txt")
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out.append(FileEntry(f"{SITE_PACKAGES}/{rel}", link=str(p.readlink())))
        elif p.is_file():
            out.append(FileEntry(f"{SITE_PACKAGES}/{rel}", source=p, mode=0o755 if p.stat().st_mode & 0o111 else 0o644))
    return out


def serving_files(d: Deployable, options: ServingOptions) -> list[FileEntry]:
    """serve.json, requirements.txt, the Triton repository (links into the model folder), entry.py
    and the mlopt_runtime package whose loaders it calls."""
    from mlopt import runtime
    from mlopt.package import entry

    spec = serve_spec(d, options)
    repo = f"{SERVING_DIR}/triton/{d.model.name}"
    files = [FileEntry(f"{SERVING_DIR}/serve.json", data=json.dumps(spec, indent=2, sort_keys=True).encode()),
             FileEntry(f"{SERVING_DIR}/requirements.txt", data=requirements(d).encode()),
             FileEntry(f"{repo}/config.pbtxt", data=triton.config_text(d, options).encode()),
             FileEntry(ENTRY_PATH, source=Path(entry.__file__), mode=0o755),
             *(FileEntry(f"{RUNTIME_PATH}/{p.name}", source=p) for p in runtime.sources())]
    files += [_link(f"{repo}/1/{p.name}", f"{MODEL_DIR}/{p.name}") for p in triton.version_files(d)]
    extra = triton.python_backend_files(d, options)  # Triton's Python backend runs the build through entry.py
    files += [FileEntry(f"{repo}/1/{name}", data=data) for name, data in sorted(extra.items())]
    if extra:
        files.append(_link(f"{repo}/1/mlopt_entry.py", ENTRY_PATH))
        files.append(_link(f"{repo}/1/{runtime.SHIPPED_NAME}", RUNTIME_PATH))
    return files


def _link(path: str, target: str) -> FileEntry:
    """A relative symlink, so it also resolves in the Dockerfile context (same folder layout)."""
    return FileEntry(path, link=os.path.relpath(target, os.path.dirname(path)))
