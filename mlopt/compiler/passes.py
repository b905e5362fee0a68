"""Passes: ``Model -> Model`` plus a report. An explicit registry; unknown kinds list what exists.

Each pass's config model lives in ``mlopt.recipes.schema`` (so recipes validate when they load);
this module maps a config's ``kind`` to the code that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlopt.compiler.model import Model
from mlopt.errors import UnknownName
from mlopt.recipes.schema import GraphOptimizePass

PASS_CONFIGS: dict[str, type] = {"graph-optimize": GraphOptimizePass}


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the model: a work folder and the recipe's data."""

    workdir: Path
    calibration: Any = None  # mlopt.compiler.data.Batches or None


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


# When a pass changes the model's outputs (quantization, pruning) the accuracy gate judges it;
# graph-optimize is semantics-preserving, so its outputs are checked numerically instead.
CHANGES_OUTPUTS: dict[str, bool] = {"graph-optimize": False}


@register("graph-optimize")
def graph_optimize(model: Model, cfg: GraphOptimizePass, ctx: PassContext) -> tuple[Model, dict[str, Any]]:
    """Constant folding, dead-node removal and shape inference (onnxscript's optimizer)."""
    import onnx
    import onnxscript.optimizer

    proto = onnx.load(str(model.onnx_path))
    before = len(proto.graph.node)
    if cfg.fold_constants:
        proto = onnxscript.optimizer.optimize(proto, num_iterations=2)
    else:
        onnxscript.optimizer.remove_unused_nodes(proto)
    proto = onnx.shape_inference.infer_shapes(proto)
    out = ctx.workdir / "model.onnx"
    _save(proto, out)
    after = len(proto.graph.node)
    return model.derive(out), {"nodes_before": before, "nodes_after": after}


def _save(proto: Any, out: Path) -> None:
    import onnx

    if proto.ByteSize() > 1_800_000_000:
        onnx.save(proto, str(out), save_as_external_data=True, location=out.name + ".data")
    else:
        onnx.save(proto, str(out))
