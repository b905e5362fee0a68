"""This machine's timing lock: a timed loop holds it alone; build-matrix tasks hold it shared.

A latency measured while another build compiles on the same cores measures the load, not the
build (one busy process beside it doubles MiniLM's p50 on two cores, 12 ms to 24 ms, enough to
change the chosen backend). So every timed loop takes the lock exclusively, and each build-matrix
task holds it shared while it runs: a task that wants to time waits until the other tasks here are
timing, waiting, or done. A task gives up its share while it waits for another process (a step another task
is making), so two tasks can never wait for each other. ``flock(2)`` locks go with the process, so
a killed worker releases its share.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_HELD: dict[str, IO[Any] | None] = {"file": None}  # this process's shared hold, while a matrix task runs


def _path() -> Path:
    return Path(tempfile.gettempdir()) / f"mlopt-host-{os.getuid()}.lock"


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Hold the lock shared while a build-matrix task runs in this process."""
    with open(_path(), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        _HELD["file"] = f
        try:
            yield
        finally:
            _HELD["file"] = None
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def timing() -> Iterator[None]:
    """Hold the lock alone while timing: no other build or timed loop of a matrix runs here meanwhile."""
    held = _HELD["file"]
    with contextlib.ExitStack() as stack:
        f = held if held is not None else stack.enter_context(open(_path(), "a+"))
        fcntl.flock(f, fcntl.LOCK_EX)  # converts this task's share when it holds one
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_SH if held is not None else fcntl.LOCK_UN)


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Give up this task's share while it waits for another process."""
    held = _HELD["file"]
    if held is not None:
        fcntl.flock(held, fcntl.LOCK_UN)
    try:
        yield
    finally:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_SH)
