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



def concrete_shapes(plan: dict[str, Any], batch: int, at: str = "opt") -> dict[str, list[int]]:
    """Each input's shape with the batch axis bound to ``batch`` and other named axes from the plan (a
    ranged axis at its ``at`` end: min, opt or max)."""
    ranged = {k: r[at] for k, r in plan.get("ranges", {}).items()}
    bound = {**plan["dims"], **ranged, plan["batch_axis"]: batch}
    shapes = {}
    for spec in plan["inputs"]:
        missing = [d for d in spec["shape"] if isinstance(d, str) and d not in bound]
        if missing:
            raise EngineError(f"input {spec['name']!r}: the plan gives no size for axis {missing[0]!r}")
        shapes[spec["name"]] = [d if isinstance(d, int) else int(bound[d]) for d in spec["shape"]]
    return shapes


def shape_profile(plan: dict[str, Any]) -> dict[str, dict[str, list[int]]]:
    """TensorRT optimization profile: the smallest batch with each ranged axis at its min; the largest
    batch at the ranges' opt; the largest batch at their max (other axes fixed at their size)."""
    low, high = min(plan["batches"]), max(plan["batches"])
    small, opt, large = concrete_shapes(plan, low, "min"), concrete_shapes(plan, high), concrete_shapes(plan, high, "max")
    dynamic = [s["name"] for s in plan["inputs"] if any(isinstance(d, str) for d in s["shape"])]
    return {n: {"min": small[n], "opt": opt[n], "max": large[n]} for n in dynamic}


def dynamic_dims(plan: dict[str, Any], batch: int) -> dict[str, list[tuple[int, int, int]]]:
    """Each input's dimensions as (min, max, opt) for ``batch``: a ranged axis spans its range, every
    other dimension is fixed (min = max)."""
    lo, opt, hi = (concrete_shapes(plan, batch, at) for at in ("min", "opt", "max"))
    return {n: list(zip(lo[n], hi[n], opt[n])) for n in opt}


def batch_of(plan: dict[str, Any], feed: dict[str, np.ndarray]) -> int:
    for spec in plan["inputs"]:
        if plan["batch_axis"] in spec["shape"]:
            return int(feed[spec["name"]].shape[spec["shape"].index(plan["batch_axis"])])
    return int(plan["batches"][0])


def input_dtypes(plan: dict[str, Any]) -> dict[str, np.dtype]:
    return {s["name"]: np.dtype(s["dtype"]) for s in plan["inputs"]}
