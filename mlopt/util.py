"""Small helpers shared across stages."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


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
