"""What the engine loaders share: their errors, the plan's shape helpers and the library import.
Standard library and numpy only."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import numpy as np

from . import Unavailable

PLAN_FILE = "engine_plan.json"


class EngineError(Exception):
    """A failure the entry point reports as a message and an exit code."""

    exit_code = 1


class EngineUnavailable(EngineError, Unavailable):
    """The engine library or a matching GPU is missing here."""

    exit_code = 4


class EngineUnreadable(EngineError):
    """The library cannot load an engine file (corrupt, or built by something else)."""



def log(message: str) -> None:
    print(f"engine_entry: {message}", file=sys.stderr, flush=True)



def import_library(module: str, needs: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailable(f"{module} is not importable ({e}); this build needs {needs}") from None



def concrete_shapes(plan: dict[str, Any], batch: int) -> dict[str, list[int]]:
    """Each input's shape with the batch axis bound to ``batch`` and other named axes from the plan."""
    bound = {**plan["dims"], plan["batch_axis"]: batch}
    shapes = {}
    for spec in plan["inputs"]:
        missing = [d for d in spec["shape"] if isinstance(d, str) and d not in bound]
        if missing:
            raise EngineError(f"input {spec['name']!r}: the plan gives no size for axis {missing[0]!r}")
        shapes[spec["name"]] = [d if isinstance(d, int) else int(bound[d]) for d in spec["shape"]]
    return shapes


def shape_profile(plan: dict[str, Any]) -> dict[str, dict[str, list[int]]]:
    """TensorRT optimization profile: the smallest batch, then the largest as both opt and max."""
    low, high = min(plan["batches"]), max(plan["batches"])
    small, large = concrete_shapes(plan, low), concrete_shapes(plan, high)
    dynamic = [s["name"] for s in plan["inputs"] if any(isinstance(d, str) for d in s["shape"])]
    return {n: {"min": small[n], "opt": large[n], "max": large[n]} for n in dynamic}


def batch_of(plan: dict[str, Any], feed: dict[str, np.ndarray]) -> int:
    for spec in plan["inputs"]:
        if plan["batch_axis"] in spec["shape"]:
            return int(feed[spec["name"]].shape[spec["shape"].index(plan["batch_axis"])])
    return int(plan["batches"][0])


def input_dtypes(plan: dict[str, Any]) -> dict[str, np.dtype]:
    return {s["name"]: np.dtype(s["dtype"]) for s in plan["inputs"]}
