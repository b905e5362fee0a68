"""What runs a build, with nothing of mlopt's compiler: one loader per backend, each importing only
the standard library, numpy and its own runtime library (lazily).

Validation and measurement, the memory probe, ``run_tvm.py``, the image entry point, the Triton
Python model and ``bench/gpu_check.py`` all load builds through ``load``. Images, Triton model
folders and artifacts that run without mlopt ship this package as is, under the top-level name
``mlopt_runtime`` (``ship``); that is why its modules import each other relatively and import
nothing else from mlopt.

A loader module (named by its backend's ``BackendSpec.loader``, and in an image's ``serve.json``)
defines ``load(folder, meta, threads=None) -> Runner``: ``folder`` holds the
build's files, ``meta`` is its metadata (``artifact.json``'s, or an image's ``serve.json``), and the
device it runs on (CPU, CUDA, ROCm) comes from the build's own files, never from a literal.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import isa

if TYPE_CHECKING:
    import numpy as np

SHIPPED_NAME = "mlopt_runtime"  # the package's name where it ships without mlopt
EXIT_UNAVAILABLE = 4  # mlopt's exit code for "toolchain or device unavailable"

Runner = Callable[[dict[str, "np.ndarray"]], dict[str, "np.ndarray"]]


class Unavailable(RuntimeError):
    """The build's runtime library or device is missing here (exit 4)."""

    exit_code = EXIT_UNAVAILABLE


def loader(name: str) -> Any:
    """The loader module ``name`` of this package (a backend's ``BackendSpec.loader``: ``ort``,
    ``tvm`` ...), imported now."""
    modules = sorted(p.stem for p in sources() if p.stem != "__init__")
    module = importlib.import_module(f"{__name__}.{name}") if name in modules else None
    if not callable(getattr(module, "load", None)):
        raise Unavailable(f"no runtime loader {name!r} here; this mlopt_runtime has {', '.join(modules)}")
    return module


def load(name: str, folder: Path, meta: Mapping[str, Any], threads: int | None = None) -> Runner:
    """A runner for the build in ``folder`` from loader ``name`` (its CPU needs checked before
    anything loads)."""
    isa.require(meta.get("requires"), f"build {Path(folder).name} ({meta.get('sku', '?')}/{name})")
    return loader(name).load(Path(folder), meta, threads)


def sources() -> list[Path]:
    """The package's source files, as shipped (the scripts that call it ship on their own)."""
    here = Path(__file__).resolve().parent
    return sorted(p for p in here.glob("*.py"))


def ship(dest: Path) -> Path:
    """Copy this package into ``dest/mlopt_runtime`` (replacing what was there); returns that folder."""
    target = dest / SHIPPED_NAME
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for src in sources():
        shutil.copyfile(src, target / src.name)
    return target


def script(name: str) -> Path:
    """A script shipped beside a build that calls this package (``run_tvm.py``, ``engine_entry.py``)."""
    return Path(__file__).resolve().parent / "scripts" / name
