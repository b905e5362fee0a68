"""TVM's ONNX frontend as the TVM backend and its tuner use it: the operator check before a build,
and the import that names a frontend failure instead of passing its many exception types on."""

from __future__ import annotations

from typing import Any

from mlopt.core.errors import UnsupportedOperator
from mlopt.core.util import package_version


def check_ops(proto: Any) -> None:
    """Refuse a model with operators the frontend cannot lower, naming them all (before any build)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    missing = sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx") and n.op_type not in known})
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if missing or foreign:
        raise UnsupportedOperator(
            f"TVM {package_version('apache-tvm')}'s ONNX frontend cannot lower {', '.join(missing + foreign)}",
            hint="use the onnxruntime backend for this model, or replace the operator in the model",
        )


def import_onnx(proto: Any, shapes: dict[str, list[int]] | None, from_onnx: Any) -> Any:
    """The Relax module of ``proto`` (static ``shapes`` where given); a frontend failure is UnsupportedOperator."""
    try:
        return from_onnx(proto, shape_dict=shapes, keep_params_in_input=False)
    except Exception as e:  # the frontend raises many types; name the failure, keep the message
        raise UnsupportedOperator(f"TVM's ONNX frontend failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
