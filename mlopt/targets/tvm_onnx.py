"""TVM's ONNX frontend as the TVM backend and its tuner use it: the operator check before a build,
and the import that names a frontend failure instead of passing its many exception types on."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from mlopt.core.errors import ModelImportFailed, UnsupportedType
from mlopt.core.model import type_text
from mlopt.core.util import package_version


def check_ops(proto: Any, rewritable: frozenset[str] = frozenset()) -> None:
    """Refuse a model with operators the frontend cannot lower and mlopt does not rewrite first
    (``rewritable``), naming them all (before any build)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | set(rewritable)
    missing = sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx") and n.op_type not in known})
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if missing or foreign:
        raise ModelImportFailed(
            f"TVM cannot import this model: TVM {package_version('apache-tvm')}'s ONNX frontend has no "
            f"{', '.join(missing + foreign)}", hint=OTHER_BACKEND + ", or replace the operator in the model")


# Output element types TVM has no dtype for (ONNX STRING); ingest already refuses such inputs.
NO_TVM_DTYPE = {8}


def check_outputs(proto: Any) -> None:
    """Refuse outputs the Relax VM cannot return as one tensor each: strings, sequences, optionals, maps."""
    for out in proto.graph.output:
        tensor = out.type.HasField("tensor_type")
        if not tensor or out.type.tensor_type.elem_type in NO_TVM_DTYPE:
            raise UnsupportedType(
                f"output {out.name!r} is {type_text(out.type)}; mlopt's TVM backend returns numeric tensors "
                f"(TVM {package_version('apache-tvm')} has no {'string dtype' if tensor else 'such value'})",
                hint="use the onnxruntime backend for this model")


def import_onnx(proto: Any, shapes: dict[str, list[int | str]] | None, from_onnx: Any) -> Any:
    """The Relax module of ``proto`` with the inputs' ``shapes`` where given (a name is a symbolic axis,
    one variable per name); a frontend failure is ModelImportFailed naming the node it failed on."""
    try:
        return from_onnx(proto, shape_dict=_relax_shapes(shapes), keep_params_in_input=False)
    except Exception as e:  # the frontend raises many types; name the failure, keep the message
        text = str(e).strip().splitlines()
        node = failed_node(e.__traceback__)
        raise ModelImportFailed(
            f"TVM cannot import this model: its ONNX frontend failed{f' on {node}' if node else ''} "
            f"({type(e).__name__}: {(text[0] if text else '')[:300]})",
            hint=OTHER_BACKEND + ", or give the model's dynamic axes fixed sizes in benchmark.dims") from None


OTHER_BACKEND = "use the onnxruntime or openvino backend for this model"


def failed_node(tb: TracebackType | None) -> str:
    """The ONNX node the frontend was converting when it raised ("Resize node 'up1'"), from the innermost
    frame of the traceback holding a ``node`` NodeProto (the frontend's conversion loop); "" if none."""
    found = ""
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if hasattr(node, "op_type") and hasattr(node, "output"):
            name = node.name or (node.output[0] if node.output else "")
            found = f"{node.op_type} node {name!r}"
        tb = tb.tb_next
    return found


def _relax_shapes(shapes: dict[str, list[int | str]] | None) -> dict[str, list[Any]] | None:
    """Shapes with each named axis as one TIR variable shared by every input that has it."""
    if shapes is None:
        return None
    import tvm

    var = getattr(tvm, "tirx", None) or tvm.tir
    axes: dict[str, Any] = {}
    return {name: [axes.setdefault(d, var.Var(d, "int64")) if isinstance(d, str) else int(d) for d in dims]
            for name, dims in shapes.items()}


def static_onnx(source: Path, shapes: dict[str, list[int | str]], dest: Path) -> Path:
    """``source`` with its inputs' dimensions fixed to ``shapes``, then constant-folded by ONNX Runtime's
    basic (standard-operator) optimizations: the ``Shape``/``Gather``/``Concat`` chains that compute shapes
    fold to constants, which TVM's frontend needs where it cannot carry a symbolic shape through them."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(source))
    for inp in proto.graph.input:
        if inp.name not in shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        for d, value in zip(dims, shapes[inp.name]):
            if isinstance(value, int):
                d.Clear()
                d.dim_value = value
    fixed = dest.with_suffix(".fixed.onnx")
    onnx.save(proto, str(fixed))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dest)
    opts.log_severity_level = 3
    ort.InferenceSession(str(fixed), opts, providers=["CPUExecutionProvider"])
    fixed.unlink()
    return dest
