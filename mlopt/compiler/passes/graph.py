"""graph-optimize: portable clean-up every backend reads (standard ONNX in, standard ONNX out)."""

from __future__ import annotations

from typing import Any

from mlopt.core.model import Model
from mlopt.compiler.passes import PassContext, register, save_onnx
from mlopt.recipes.schema import GraphOptimizePass


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
    out = save_onnx(proto, ctx.workdir / "model.onnx")
    return model.derive(out, module_fn=model.module_fn), {"nodes_before": before, "nodes_after": len(proto.graph.node)}
