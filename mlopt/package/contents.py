"""What an image's layers hold, as file entries: the artifact (``/opt/mlopt/model/``), a runtime folder
(``/opt/mlopt/site-packages/``), and the serving files (``serve.json``, ``requirements.txt``, the
Triton repository, ``entry.py`` and the ``mlopt_runtime`` package whose loaders it calls). The
built-in image (``image.py``) and the Dockerfile context (``context.py``) are both made from these.
"""

from __future__ import annotations

import json
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
    """The artifact's files (streamed from the store) and its artifact.json, plus the Triton
    repository's model files as hard links to them: in the same layer, so the repository holds real
    files (a copied folder keeps them) without storing the bytes twice."""
    files = [FileEntry(f"{MODEL_DIR}/{rel}", source=inside(d.artifact.path, rel)) for rel in sorted(d.artifact.meta["files"])]
    files.append(FileEntry(f"{MODEL_DIR}/{ARTIFACT_META}", source=d.artifact.path / ARTIFACT_META))
    repo = triton_repo(d)
    return files + [FileEntry(f"{repo}/1/{p.name}", hardlink=f"{MODEL_DIR}/{p.name}") for p in triton.version_files(d)]


def triton_repo(d: Deployable) -> str:
    """The image path of the deployable's Triton model folder."""
    return f"{SERVING_DIR}/triton/{d.model.name}"


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
    """serve.json, requirements.txt, the Triton repository's config (its model files are in the
    artifact layer), entry.py and the mlopt_runtime package whose loaders it calls."""
    from mlopt import runtime
    from mlopt.package import entry

    spec = serve_spec(d, options)
    repo = triton_repo(d)
    sources = runtime.sources()
    files = [FileEntry(f"{SERVING_DIR}/serve.json", data=json.dumps(spec, indent=2, sort_keys=True).encode()),
             FileEntry(f"{SERVING_DIR}/requirements.txt", data=requirements(d).encode()),
             FileEntry(f"{repo}/config.pbtxt", data=triton.config_text(d, options).encode()),
             FileEntry(ENTRY_PATH, source=Path(entry.__file__), mode=0o755),
             *(FileEntry(f"{RUNTIME_PATH}/{p.name}", source=p) for p in sources)]
    extra = triton.python_backend_files(d, options)  # Triton's Python backend runs the build through entry.py
    files += [FileEntry(f"{repo}/1/{name}", data=data) for name, data in sorted(extra.items())]
    if extra:  # hard links to entry.py and the runtime package of this same layer: real files, stored once
        files.append(FileEntry(f"{repo}/1/mlopt_entry.py", hardlink=ENTRY_PATH, mode=0o755))
        files += [FileEntry(f"{repo}/1/{runtime.SHIPPED_NAME}/{p.name}", hardlink=f"{RUNTIME_PATH}/{p.name}")
                  for p in sources]
    return files
