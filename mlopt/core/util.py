"""Small helpers shared across stages."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from mlopt.core.errors import BadInput

Log = Callable[[str], None]
"""Where a stage writes its progress lines (``print``, the CLI's stderr console, a matrix task's log)."""

_CWD_LOCK = threading.RLock()  # the working directory is the process's: one scratch folder at a time


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or "absent"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python objects and file descriptor 1) to stderr.

    Libraries print progress bars and tables to stdout (MetaSchedule, ONNX Runtime's calibrators);
    with ``--json`` stdout must carry the manifest alone.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run library calls inside a private, temporary working directory, removed afterwards.

    Some write scratch files into the current directory: ONNX Runtime's symbolic shape inference
    saves ``sym_shape_infer_temp.onnx`` and a uuid-named ``.data`` file there when it gives up. A
    user's working directory (or a checkout) must never collect them. Give such calls absolute paths.
    """
    with _CWD_LOCK, tempfile.TemporaryDirectory(prefix="mlopt-scratch-") as tmp:
        before = os.getcwd()
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(before)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""One rule for every name that becomes a path or an image tag: letters, digits, '.', '_', '-', starting
with a letter or digit (so never '.', '..' or a separator), up to 128 characters."""
NAME_RULE = "letters, digits, '.', '_' or '-' (up to 128), starting with a letter or digit"


def is_safe_name(value: str) -> bool:
    """Whether ``value`` follows ``NAME_PATTERN``."""
    return re.fullmatch(NAME_PATTERN, value) is not None


def inside(base: str | os.PathLike[str], *parts: str | os.PathLike[str]) -> Path:
    """``base/parts...`` resolved, refused (``BadInput``) when it would leave ``base``: a '..', an
    absolute part or a symlink pointing out of the folder."""
    root = Path(base).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        shown = "/".join(str(p) for p in parts)
        raise BadInput(f"{shown!r} would be written outside {root}",
                       hint=f"use names made of {NAME_RULE}")
    return path
