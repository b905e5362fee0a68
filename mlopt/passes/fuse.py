"""fuse-transformer: ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu ...).

A BERT-style encoder exported op by op runs each attention as a dozen MatMul/Transpose/Softmax
nodes; fused, it is one ``com.microsoft`` ``Attention`` kernel, and residual + LayerNorm and bias +
GELU become one kernel each. Put it before ``quantize`` (int8-dynamic): the quantizer then sees the
fused graph, which is the "ONNX Runtime fused + dynamic int8" anchor.

Two fusers, tried in turn (``fuser: auto``):
- ONNX Runtime's ``onnxruntime.transformers.optimizer.optimize_model`` (``model_type: bert``). Its
  patterns match the TorchScript exporter's graphs; on graphs from ``torch.onnx.export(dynamo=True)``
  (what mlopt's ingest writes) it fuses GELU but no attention (seen with onnxruntime 1.32).
- onnxscript's ``rewriter.ort_fusions.optimize_for_ort``: the same ``com.microsoft`` operators,
  matched on the dynamo exporter's graphs.
``auto`` tries them in that order, stops at the first that fuses attention, and keeps the result with
the most fused attention nodes, then the most fused operators.

The pass keeps outputs (checked numerically against its input by the pipeline, with the tolerance
``mlopt.compiler.validate.PASS_TOLERANCES['fuse-transformer']``). A graph without a transformer
pattern is left unchanged, and the details say ``fusions: 0``.

The fused graph holds ``com.microsoft`` contrib operators. ONNX Runtime runs them; OpenVINO's ONNX
frontend (2026.4) reads Attention, MultiHeadAttention, SkipLayerNormalization and BiasGelu, and its
build of the fused fp32 graph validates; TVM's ONNX frontend reads none, so a TVM build of a fused
model fails with the operators named (``UnsupportedOperator``), recorded as a warning on that candidate
while the SKU's other builds stand. (After ``quantize`` int8-dynamic, fused or not, OpenVINO's run of
the graph is closer to fp32 than ONNX Runtime's reference run, and its build fails validation with the
difference named, also a warning: seen on the tiny BERT of the tests.)
The result is ONNX only: a later training pass (prune, distill) cannot re-export it, so it must come
after them (the recipe's pass-order check says so).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import Field

from mlopt.core.model import Model
from mlopt.core.spec import Strict
from mlopt.passes import PassContext, register, save_onnx

CONTRIB = "com.microsoft"
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
Fuser = Literal["onnxruntime", "onnxscript"]


class FuseTransformerPass(Strict):
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu) for BERT-style models.

    The fused graph runs on ONNX Runtime and OpenVINO; TVM cannot read its contrib operators.
    """

    kind: Literal["fuse-transformer"]
    name: str | None = Field(None, description="Label of this step in reports (defaults to the kind).")
    on_violation: Literal["fail", "skip"] | None = Field(None, description="Overrides accuracy.on_violation.")
    model_type: Literal["bert"] = Field("bert", description="ONNX Runtime optimizer's model type (BERT-style encoders).")
    num_heads: int = Field(0, ge=0, description="Attention heads (0: detected from the graph).")
    hidden_size: int = Field(0, ge=0, description="Hidden size (0: detected from the graph).")
    opt_level: Literal[0, 1, 2] = Field(
        0, description="ONNX Runtime graph optimizations the optimizer applies before its fusions (0: none, the "
        "session applies them at load; 99 is refused: it writes a layout for this machine's CPU).")
    fuser: Literal["auto", "onnxruntime", "onnxscript"] = Field(
        "auto", description="auto: ONNX Runtime's optimizer, then onnxscript's ORT fusions when it fused no "
        "attention (graphs from the dynamo exporter); keeps the result with the most fusions.")


@register("fuse-transformer", config=FuseTransformerPass, changes_outputs=False, onnx_only=True)
def fuse_transformer(model: Model, cfg: FuseTransformerPass, ctx: PassContext) -> tuple[Model, dict[str, Any]]:
    """Fuse attention, residual LayerNorm and bias GELU subgraphs into ONNX Runtime contrib operators."""
    import onnx

    original = onnx.load(str(model.onnx_path))
    tries: dict[str, dict[str, Any]] = {}
    for name in _fusers(cfg):
        tries[name] = _attempt(name, original, cfg)
        if _rank(tries[name])[0]:  # attention fused: the next fuser is not needed
            break
    best = max(tries, key=lambda n: _rank(tries[n]))
    proto, details = tries[best]["proto"], _details(original, tries, best)
    if proto is None or not details["fusions"]:
        ctx.log("[fuse-transformer] no transformer pattern fused; model unchanged")
        proto, details = original, {**details, "fuser": None, "note": "no transformer pattern found; model unchanged"}
    else:
        ctx.log(f"[fuse-transformer] {best}: " + ", ".join(f"{k} {v}" for k, v in details["fused_ops"].items()))
    out = save_onnx(proto, ctx.workdir / "model.onnx")
    return model.derive(out), details


def _fusers(cfg: FuseTransformerPass) -> list[Fuser]:
    return ["onnxruntime", "onnxscript"] if cfg.fuser == "auto" else [cfg.fuser]


def _attempt(name: Fuser, original: Any, cfg: FuseTransformerPass) -> dict[str, Any]:
    """One fuser's result: the fused proto, its own statistics, and the contrib operators it left."""
    try:
        proto, stats = (_onnxruntime if name == "onnxruntime" else _onnxscript)(original, cfg)
    except Exception as e:  # the fusers' errors are many and untyped: a graph they cannot read is not fused
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return {"proto": None, "statistics": {}, "fused_ops": {}, "error": f"{type(e).__name__}: {first}"}
    return {"proto": proto, "statistics": {k: v for k, v in stats.items() if v}, "fused_ops": contrib_ops(proto)}


def _onnxruntime(original: Any, cfg: FuseTransformerPass) -> tuple[Any, dict[str, int]]:
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    # the optimizer logs every pattern it does not find at WARNING; its statistics say what it fused
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    m = optimize_model(_copy(original), model_type=cfg.model_type, num_heads=cfg.num_heads,
                       hidden_size=cfg.hidden_size, opt_level=cfg.opt_level, use_gpu=False)
    return m.model, m.get_fused_operator_statistics()


def _onnxscript(original: Any, cfg: FuseTransformerPass) -> tuple[Any, dict[str, int]]:
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused, stats = optimize_for_ort(ir.serde.deserialize_model(_copy(original)))
    return ir.serde.serialize_model(fused), stats


def _copy(proto: Any) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def contrib_ops(proto: Any) -> dict[str, int]:
    """``com.microsoft`` operators in the graph, by type (what a backend must read to run it)."""
    return dict(sorted(Counter(n.op_type for n in proto.graph.node if n.domain == CONTRIB).items()))


def _rank(attempt: dict[str, Any]) -> tuple[int, int]:
    ops = attempt["fused_ops"]
    return sum(ops.get(k, 0) for k in ATTENTION_OPS), sum(ops.values())


def _details(original: Any, tries: dict[str, dict[str, Any]], best: str) -> dict[str, Any]:
    """What the report shows: the chosen fuser, the contrib operators it left, heads, and every try."""
    before = contrib_ops(original)
    chosen = tries[best]
    fused = {k: v - before.get(k, 0) for k, v in chosen["fused_ops"].items() if v > before.get(k, 0)}
    return {"fuser": best, "fusions": sum(fused.values()), "fused_ops": fused,
            "attention_fused": _rank(chosen)[0] - _rank({"fused_ops": before})[0],
            "num_heads": _heads(chosen["proto"]), "nodes_before": len(original.graph.node),
            "nodes_after": len(chosen["proto"].graph.node) if chosen["proto"] is not None else None,
            "tries": {n: {k: v for k, v in t.items() if k != "proto"} for n, t in tries.items()}}


def _heads(proto: Any) -> int | None:
    """num_heads of the fused attention nodes (what the fuser detected or was given)."""
    if proto is None:
        return None
    for n in proto.graph.node:
        if n.domain == CONTRIB and n.op_type in ATTENTION_OPS:
            return next((a.i for a in n.attribute if a.name == "num_heads"), None)
    return None
