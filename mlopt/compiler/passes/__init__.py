"""Passes: ``Model -> Model`` plus a report. An explicit registry; unknown kinds list what exists.

Each pass's config model lives in ``mlopt.recipes.schema`` (so recipes validate when they load);
the modules of this package register the code that runs each kind. Heavy libraries are imported
inside the pass functions, so importing the registry is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlopt.core.model import Model
from mlopt.core.errors import UnknownName
from mlopt.recipes.schema import DistillPass, GraphOptimizePass, PrunePass, QuantizePass

PASS_CONFIGS: dict[str, type] = {
    "graph-optimize": GraphOptimizePass,
    "quantize": QuantizePass,
    "prune": PrunePass,
    "distill": DistillPass,
}

# Passes that change outputs are judged by the accuracy budget; the others are checked numerically.
CHANGES_OUTPUTS: dict[str, bool] = {"graph-optimize": False, "quantize": True, "prune": True, "distill": True}
# Passes that train the PyTorch module (they need a PyTorch source and run before quantization).
TORCH_PASSES = frozenset({"prune", "distill"})


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the model: a work folder, the recipe's data, and judges."""

    workdir: Path
    calibration: Any = None  # mlopt.compiler.data.Batches, or None when the recipe has no calibration data
    evaluate: Callable[[Path], float] | None = None  # metric of an ONNX file on the evaluation data
    reference: float | None = None  # the original model's metric
    max_drop: float = 0.0
    latency: Callable[[Path], float] | None = None  # ms: geometric mean of p50 over the plan's batch sizes
    log: Callable[[str], None] = field(default=lambda _: None)
    export: Callable[[Any, Path], Model] | None = None  # nn.Module -> ONNX Model, checked like ingest


PassFn = Callable[[Model, Any, PassContext], tuple[Model, dict[str, Any]]]
PASSES: dict[str, PassFn] = {}


def register(kind: str) -> Callable[[PassFn], PassFn]:
    """Register the function that runs pass ``kind``; a kind is registered once."""
    def deco(fn: PassFn) -> PassFn:
        if kind in PASSES:
            raise ValueError(f"pass {kind!r} is registered twice")
        if kind not in PASS_CONFIGS:
            raise ValueError(f"pass {kind!r} has no config model in mlopt.recipes.schema")
        PASSES[kind] = fn
        return fn
    return deco


def get_pass(kind: str) -> PassFn:
    if kind not in PASSES:
        raise UnknownName(f"unknown pass {kind!r}; choose from {', '.join(sorted(PASSES))}")
    return PASSES[kind]


def save_onnx(proto: Any, out: Path) -> Path:
    """Save a ModelProto; weights go to an external file past protobuf's 2 GB limit."""
    import onnx

    if proto.ByteSize() > 1_800_000_000:
        onnx.save(proto, str(out), save_as_external_data=True, location=out.name + ".data")
    else:
        onnx.save(proto, str(out))
    return out


from mlopt.compiler.passes import distill, graph, prune, quantize  # noqa: E402,F401  (registers the passes)
