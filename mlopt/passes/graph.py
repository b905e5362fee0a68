"""graph-optimize: portable clean-up every backend reads (standard ONNX in, standard ONNX out)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mlopt.core.model import Model
from mlopt.core.spec import Strict
from mlopt.passes import PassContext, register, save_onnx


class GraphOptimizePass(Strict):
    """Portable graph clean-up: constant folding, dead-code and identity removal, shape inference.

    The result is standard ONNX that every backend reads.
    """

    kind: Literal["graph-optimize"]
    name: str | None = Field(None, description="Label of this step in reports (defaults to the kind).")
    on_violation: Literal["fail", "skip"] | None = Field(None, description="Overrides accuracy.on_violation.")
    fold_constants: bool = Field(True, description="Fold constant subgraphs into initializers.")


@register("graph-optimize", config=GraphOptimizePass, changes_outputs=False)
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
    out = save_onnx(proto, ctx.workdir / "model.onnx")
    return model.derive(out, module_fn=model.module_fn), {"nodes_before": before, "nodes_after": len(proto.graph.node)}
