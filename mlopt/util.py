"""Small helpers shared across stages."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

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
