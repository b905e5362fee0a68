"""quantize: int8 static (QDQ) and dynamic, weight-only int4/int8, fp16, and an accuracy-aware search.

QDQ is the int8 form ONNX Runtime, OpenVINO and TVM read. The search tries a space of configurations
(precision, per-channel or per-tensor, calibration method, the most sensitive nodes left in float),
measures each candidate's accuracy and latency on every judging backend (``PassContext.judges``), and
keeps the fastest (candidate, backend) inside the budget, the fp32 model included: fp32 on OpenVINO can
beat int8 on ONNX Runtime. The winning backend is named in the details' ``judged_on``.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from mlopt.core.errors import BadInput
from mlopt.core.model import Model
from mlopt.core.spec import Strict
from mlopt.core.util import scratch_cwd
from mlopt.passes import Judge, PassContext, register
from mlopt.passes.nncf_quant import NNCF_MODES, quantize_nncf

if TYPE_CHECKING:
    import numpy as np

# The compute-heavy ops, plus those that are exact in int8 and keep a chain of convolutions in int8
# (no Dequantize/Quantize between them). Quantizing every op (Add, Softmax ...) collapses accuracy.
STATIC_OPS = ["Conv", "MatMul", "Gemm", "Relu", "Clip", "MaxPool", "GlobalAveragePool", "AveragePool"]
DYNAMIC_OPS = ["MatMul", "Gemm"]
CONV_SHARE_LIMIT = 0.5  # int8-dynamic is refused when convolutions hold more of the weights than this
QDQ_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (their axis attribute) need opset 13
JUDGED_ON = "judged_on"  # details key: the backend whose figures chose the pass's output (the gate judges on it)


class QuantSearch(Strict):
    """The space the accuracy-aware search tries; every combination is one candidate, judged on each
    CPU backend of the recipe's targets that runs here (ONNX Runtime, OpenVINO)."""

    per_channel: list[bool] = Field(default_factory=lambda: [True, False])
    calibration: list[Literal["minmax", "entropy", "percentile"]] = Field(default_factory=lambda: ["minmax", "percentile"])
    keep_float: list[int] = Field(
        default_factory=lambda: [0, 2, 4, 8],
        description="How many of the most sensitive nodes (per-node sensitivity analysis) stay in float.",
    )
    precisions: list[Literal["int8-static", "int8-dynamic", "bf16", "nncf-ptq", "nncf-accuracy-control"]] = Field(
        default_factory=lambda: ["int8-static"], description="Precisions to try besides the configured mode "
        "(nncf-ptq and nncf-accuracy-control: one candidate each, NNCF's own placement; see mode).")
    max_candidates: int = Field(24, gt=0, description="Stop after this many candidates.")


class QuantizePass(Strict):
    """Quantization or precision conversion of the ONNX model (ONNX Runtime's quantization tools)."""

    kind: Literal["quantize"]
    name: str | None = None
    on_violation: Literal["fail", "skip"] | None = None
    mode: Literal["int8-static", "int8-dynamic", "weight-only", "fp16", "bf16", "nncf-ptq", "nncf-accuracy-control"] = Field(
        "int8-static", description="int8-static: QDQ with calibration; int8-dynamic: MatMul/Gemm weights int8, "
        "activations quantized at run time; weight-only: int4/int8 MatMul weights; fp16/bf16: float precision; "
        "nncf-ptq: NNCF's post-training int8 (QDQ that ONNX Runtime and OpenVINO both run in int8; see preset, "
        "model_type); nncf-accuracy-control: NNCF's int8 that returns the most harmful quantizers to float until "
        "the evaluation metric drops at most accuracy.max_drop (needs data.evaluation).")
    per_channel: bool = Field(True, description="Per-channel (True) or per-tensor weight scales.")
    calibration: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="Calibration method.")
    calibration_batches: int = Field(8, gt=0, description="Calibration batches taken from data.calibration.")
    op_types: list[str] | None = Field(None, description="Operator types to quantize (default: the mode's).")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names left in float.")
    float_input_channels: int = Field(
        0, ge=0, description="int8-static: Conv layers with at most this many input channels per group (an "
        "image's first layer) stay in float; int8 kernels are slow on such thin inputs.")
    weight_bits: Literal[4, 8] = Field(4, description="weight-only: bits per weight.")
    block_size: int = Field(32, ge=16, description="weight-only: weights per scale (a power of two).")
    keep_io_types: bool = Field(True, description="fp16/bf16: keep float32 inputs and outputs.")
    preset: Literal["performance", "mixed"] | None = Field(
        None, description="nncf-*: performance (symmetric weights and activations) or mixed (asymmetric "
        "activations); default: mixed for model_type transformer, else performance.")
    model_type: Literal["transformer"] | None = Field(
        None, description="nncf-*: transformer keeps LayerNorm, Softmax and residual adds of BERT-style models in "
        "float (NNCF's transformer patterns).")
    search: bool = Field(False, description="Accuracy-aware search: keep the fastest candidate inside the budget.")
    search_space: QuantSearch = Field(default_factory=QuantSearch)

    @model_validator(mode="after")
    def _check(self) -> "QuantizePass":
        if self.search and self.mode not in ("int8-static", "int8-dynamic"):
            raise ValueError("search: true needs mode int8-static or int8-dynamic")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size} must be a power of two")
        return self


@register("quantize", config=QuantizePass, changes_outputs=True)
def quantize(model: Model, cfg: QuantizePass, ctx: PassContext) -> tuple[Model, dict[str, Any]]:
    """Run one quantization, or the accuracy-aware search over many."""
    if cfg.search:
        out, details = _search(model, cfg, ctx)
    else:
        out = ctx.workdir / "model.onnx"
        details = _apply(model, cfg, ctx, cfg.exclude_nodes, out)
    return model.derive(out), details


def _apply(model: Model, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    fn = {"int8-static": _static, "int8-dynamic": _dynamic, "weight-only": _weight_only,
          "fp16": _float16, "bf16": _bfloat16, "nncf-ptq": _nncf, "nncf-accuracy-control": _nncf}[cfg.mode]
    details = fn(model, cfg, ctx, exclude, out)
    return {"mode": cfg.mode, "excluded": exclude, **details, **_counts(out)}


# ---------------------------------------------------------------- the modes


def _preprocessed(model: Model, ctx: PassContext) -> Path:
    """quant_pre_process (shape inference, graph clean-up) once per pass, on the model at opset 13 or newer."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = ctx.workdir / "preprocessed.onnx"
    if not pre.exists():
        source = upgraded_opset(model.onnx_path, ctx)
        with scratch_cwd():
            quant_pre_process(str(source.resolve()), str(pre.resolve()), skip_symbolic_shape=True)
    return pre


def onnx_opset(path: Path) -> int:
    """The default-domain opset of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgraded_opset(path: Path, ctx: PassContext) -> Path:
    """``path`` itself at opset 13 or newer; below that, the model converted to opset 13 by
    ``onnx.version_converter`` and checked numerically against the original (QDQ's per-channel
    ``axis`` needs 13: ONNX Runtime writes it, and an older graph is then invalid). A conversion that
    fails or changes the outputs keeps the original, and per-channel is then refused (``_per_channel``)."""
    import numpy as np
    import onnx
    from onnx import version_converter

    if onnx_opset(path) >= QDQ_OPSET:
        return path
    out = ctx.workdir / f"opset{QDQ_OPSET}.onnx"
    if out.exists():
        return out
    try:
        proto = version_converter.convert_version(onnx.load(str(path)), QDQ_OPSET)
        onnx.save(proto, str(out))
        feed = _probe_feed(path, ctx)
        want, got = _run_onnx(path, feed), _run_onnx(out, feed)
        bad = [k for k in want if not np.allclose(got[k], want[k], rtol=1e-4, atol=1e-5, equal_nan=True)]
        if bad:
            raise ValueError(f"outputs {bad} changed")
    except Exception as e:  # the converter's own errors are many and untyped: any of them keeps the original
        out.unlink(missing_ok=True)
        ctx.log(f"[quantize] opset {onnx_opset(path)} -> {QDQ_OPSET} conversion not used ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); per-tensor scales only")
        return path
    ctx.log(f"[quantize] model converted from opset {onnx_opset(path)} to {QDQ_OPSET} (outputs checked)")
    return out


def _probe_feed(path: Path, ctx: PassContext) -> dict[str, np.ndarray]:
    """The first calibration batch, or zeros of the model's own static input shapes (dynamic dims 1)."""
    import numpy as np
    import onnx
    from onnx import helper

    if ctx.calibration is not None:
        return ctx.calibration.feeds[0]
    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    feed = {}
    for i in proto.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
        feed[i.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feed


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the recipe's calibration batches."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _static(model: Model, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if ctx.calibration is None:
        raise BadInput("quantize int8-static needs data.calibration (a module:function or .npz)")
    feeds = ctx.calibration.feeds[: cfg.calibration_batches]
    ops = cfg.op_types or STATIC_OPS
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    cache = ctx.workdir / f"calibration-{cfg.calibration}-{'-'.join(sorted(ops))}.json"
    pre = _preprocessed(model, ctx)
    per_channel = _per_channel(cfg.per_channel, pre)
    thin = thin_convs(pre, cfg.float_input_channels)
    exclude = sorted(set(exclude) | set(thin))
    with scratch_cwd():
        quantize_static(
            str(pre.resolve()), str(out.resolve()), _Reader(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops, per_channel=per_channel, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=exclude, calibrate_method=method,
            calibration_cache_path=str(cache.resolve()), extra_options={"CalibMovingAverage": cfg.calibration == "minmax"},
        )
    return {"per_channel": per_channel, "calibration": cfg.calibration, "calibration_batches": len(feeds),
            "op_types": ops, "thin_convs_in_float": thin, "opset": onnx_opset(pre)}


def _per_channel(wanted: bool, pre: Path) -> bool:
    """Per-channel scales where asked and the graph's opset allows them (13: DequantizeLinear's axis)."""
    return wanted and onnx_opset(pre) >= QDQ_OPSET


def thin_convs(path: Path, max_channels: int) -> list[str]:
    """Conv nodes whose weights have at most ``max_channels`` input channels per group."""
    import onnx

    if max_channels <= 0:
        return []
    proto = onnx.load(str(path))
    dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "Conv" and len(dims.get(n.input[1], [])) == 4 and dims[n.input[1]][1] <= max_channels]


def _nncf(model: Model, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    source = upgraded_opset(model.onnx_path, ctx)
    return {**quantize_nncf(source, cfg, ctx, exclude, out), "opset": onnx_opset(source)}


def _dynamic(model: Model, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = cfg.op_types or DYNAMIC_OPS
    share = conv_weight_share(model.onnx_path)
    if share > CONV_SHARE_LIMIT or "Conv" in ops:
        raise BadInput(
            f"quantize int8-dynamic refused: convolutions hold {share:.0%} of this model's weights, and ONNX "
            "Runtime runs dynamically quantized convolutions (ConvInteger) slower than float",
            hint="use mode: int8-static (QDQ) for convolutional models",
        )
    pre = _preprocessed(model, ctx)
    per_channel = _per_channel(cfg.per_channel, pre)
    with scratch_cwd():
        quantize_dynamic(str(pre.resolve()), str(out.resolve()), weight_type=QuantType.QInt8,
                         per_channel=per_channel, op_types_to_quantize=ops, nodes_to_exclude=exclude)
    return {"per_channel": per_channel, "op_types": ops, "conv_weight_share": round(share, 4)}


def _weight_only(model: Model, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto, rewritten = gemm_to_matmul(onnx.load(str(model.onnx_path)))
    q = MatMulNBitsQuantizer(proto, bits=cfg.weight_bits, block_size=cfg.block_size,
                             is_symmetric=True, accuracy_level=4, nodes_to_exclude=exclude)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return {"bits": cfg.weight_bits, "block_size": cfg.block_size, "gemm_rewritten": rewritten}


def gemm_to_matmul(proto: Any) -> tuple[Any, int]:
    """Rewrite Gemm(A, constant B, C) as MatMul + Add, so MatMul-only quantizers see Linear layers."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    nodes, count = [], 0
    for n in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        simple = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if n.op_type != "Gemm" or not simple or n.input[1] not in inits:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w = w.T if attrs.get("transB", 0) else w
        name = f"{n.input[1]}_matmul"
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
        mm_out = f"{n.output[0]}_mm" if len(n.input) > 2 and n.input[2] else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], name], [mm_out], name=f"{n.name}_matmul"))
        if mm_out != n.output[0]:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}_bias"))
        count += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for n in proto.graph.node for i in n.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return proto, count


def _float16(model: Model, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(model.onnx_path)), keep_io_types=cfg.keep_io_types,
                                     node_block_list=exclude or None)
    onnx.save(proto, str(out))
    return {"keep_io_types": cfg.keep_io_types}


def _bfloat16(model: Model, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    """bf16 weights and compute: the fp16 conversion's graph with every float16 retyped to bfloat16."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    tmp = ctx.workdir / "fp16.onnx"
    _float16(model, cfg, ctx, exclude, tmp)
    proto = onnx.load(str(tmp))
    for init in proto.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            arr = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(_bf16_tensor(arr, init.name))
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
    for vi in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
    onnx.save(proto, str(out))
    return {"keep_io_types": cfg.keep_io_types}


def _bf16_tensor(arr: np.ndarray, name: str) -> Any:
    import numpy as np
    from onnx import TensorProto, helper

    bits = (arr.astype(np.float32).view(np.uint32) + 0x7FFF + ((arr.view(np.uint32) >> 16) & 1)) >> 16
    t = helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape, vals=bits.astype(np.uint16).tobytes(), raw=True)
    return t


def conv_weight_share(path: Path) -> float:
    """Fraction of the weights (initializer elements) that feed Conv nodes."""
    import numpy as np
    import onnx

    proto = onnx.load(str(path))
    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    conv = sum(sizes.get(n.input[1], 0) for n in proto.graph.node if n.op_type == "Conv" and len(n.input) > 1)
    mm = sum(sizes.get(x, 0) for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") for x in n.input)
    return conv / (conv + mm) if conv + mm else 0.0


def _counts(path: Path) -> dict[str, Any]:
    """What the quantized graph holds: QDQ pairs, integer ops, and int8 weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto

    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    zero_points = {n.input[2] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    zero_points |= {x for n in proto.graph.node if n.op_type in ("MatMulInteger", "ConvInteger") for x in n.input[2:]}
    int8 = sum(1 for i in proto.graph.initializer if i.data_type in (TensorProto.INT8, TensorProto.UINT8)
               and int(np.prod(i.dims)) > 1 and i.name not in zero_points)
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "integer_ops": sum(ops.count(o) for o in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
                                                       "MatMulNBits", "QLinearConv", "QLinearMatMul")),
            "int8_weight_tensors": int8}


# ---------------------------------------------------------------- the search


def _search(model: Model, cfg: QuantizePass, ctx: PassContext) -> tuple[Path, dict[str, Any]]:
    """Every candidate of the space, and the model as it came (fp32) beside them, each judged on every
    backend of ``ctx.judges``; a candidate that fails on all of them is recorded with its reasons and skipped.
    The fastest (candidate, backend) inside the budget wins, fp32 included."""
    if not ctx.judges or ctx.reference is None:
        raise BadInput("quantize search: true needs data.evaluation to judge candidates")
    space = cfg.search_space
    t0 = time.perf_counter()
    ranking = _sensitivity(model, cfg, ctx) if max(space.keep_float) > 0 else []
    candidates = [_judge(ctx, {"id": "fp32", "mode": "fp32", "per_channel": None, "calibration": None,
                               "kept_float": None}, model.onnx_path)]
    base = {**cfg.model_dump(), "search": False}
    for k, (mode, pc, calib, keep) in enumerate(_space(cfg)):
        if k >= space.max_candidates:
            break
        if mode == "int8-dynamic" and conv_weight_share(model.onnx_path) > CONV_SHARE_LIMIT:
            continue
        one = QuantizePass.model_validate({**base, "mode": mode, "per_channel": pc, "calibration": calib})
        out = ctx.workdir / f"candidate-{k}.onnx"
        exclude = sorted(set(cfg.exclude_nodes) | set(ranking[:keep]))
        cand = {"id": k, "mode": mode, "per_channel": pc, "calibration": calib if mode == "int8-static" else None,
                "kept_float": keep}
        candidates.append(_judge(ctx, cand, out, lambda: _apply(model, one, ctx, exclude, out)))
    chosen = _pick(candidates)
    for c in candidates:
        c["chosen"] = c is chosen
        c["pareto"] = "failed" not in c and not any(
            "failed" not in o and o["latency_ms"] < c["latency_ms"] and o["accuracy"] >= c["accuracy"] for o in candidates)
    ctx.log(_table(candidates, ctx.reference, list(ctx.judges)))
    final = ctx.workdir / "model.onnx"
    _keep(model.onnx_path if chosen["id"] == "fp32" else ctx.workdir / f"candidate-{chosen['id']}.onnx", final)
    for p in ctx.workdir.glob("candidate-*.onnx"):
        p.unlink()
    details = {"search": {"candidates": candidates, "sensitivity": ranking[: max(space.keep_float)],
                          "backends": list(ctx.judges), "seconds": round(time.perf_counter() - t0, 1),
                          "chosen": chosen["id"], "backend": chosen["backend"]},
               "mode": chosen["mode"], JUDGED_ON: chosen["backend"], **_counts(final)}
    return final, details


def _judge(ctx: PassContext, cand: dict[str, Any], path: Path, make: Any = None) -> dict[str, Any]:
    """``cand`` with each backend's accuracy and latency (``make`` writes ``path`` first) and, as its own
    figures, those of its best backend (``_best``); or with the reason it failed: a quantizer or runtime
    error in one candidate, or on one backend, never ends the search."""
    assert ctx.reference is not None
    try:
        if make is not None:
            make()
    except BadInput:
        raise  # the recipe's own fault (no calibration data ...): every candidate would fail alike
    except Exception as e:  # the quantizer's errors are many and untyped
        return _failed(ctx, cand, _reason(e))
    per = {name: _figures(judge, path, ctx) for name, judge in ctx.judges.items()}
    ok = {name: f for name, f in per.items() if "failed" not in f}
    if not ok:
        return _failed(ctx, {**cand, "backends": per}, "; ".join(f"{n}: {f['failed']}" for n, f in per.items()))
    name, best = _best(ok)
    ctx.log(f"[quantize] candidate {cand['id']}: {cand['mode']} per_channel={cand['per_channel']} "
            f"calib={cand['calibration']} keep_float={cand['kept_float']} -> " + ", ".join(
                f"{n} " + (f"failed ({f['failed'][:80]})" if "failed" in f else
                           f"accuracy {f['accuracy']:.4f}, {f['latency_ms']:.2f} ms") for n, f in per.items()))
    return {**cand, "backends": per, "backend": name, "accuracy": best["accuracy"],
            "drop": round(ctx.reference - best["accuracy"], 5), "latency_ms": best["latency_ms"],
            "within_budget": best["within_budget"]}


def _figures(judge: Judge, path: Path, ctx: PassContext) -> dict[str, Any]:
    """One backend's figures for ``path``, or why that backend could not run it."""
    assert ctx.reference is not None
    try:
        f = judge(path)
    except BadInput:
        raise
    except Exception as e:  # ONNX Runtime's and OpenVINO's errors are many and untyped
        return {"failed": _reason(e)}
    return {"accuracy": round(f.accuracy, 5), "latency_ms": round(f.latency_ms, 4),
            "within_budget": ctx.reference - f.accuracy <= ctx.max_drop + 1e-12}


def _best(ok: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A candidate's figure: its fastest backend inside the budget, else its most accurate one."""
    inside = {n: f for n, f in ok.items() if f["within_budget"]}
    if inside:
        return min(inside.items(), key=lambda kv: kv[1]["latency_ms"])
    return max(ok.items(), key=lambda kv: kv[1]["accuracy"])


def _failed(ctx: PassContext, cand: dict[str, Any], reason: str) -> dict[str, Any]:
    ctx.log(f"[quantize] candidate {cand['id']} ({cand['mode']}) failed: {reason}")
    return {**cand, "failed": reason}


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _keep(src: Path, final: Path) -> None:
    """The chosen candidate as the pass's output (the fp32 model is written anew, its weights inline)."""
    import onnx

    if src.parent == final.parent:
        src.rename(final)
    else:
        onnx.save(onnx.load(str(src)), str(final))


def _space(cfg: QuantizePass) -> list[tuple[str, bool, str, int]]:
    s = cfg.search_space
    modes = list(dict.fromkeys([cfg.mode, *s.precisions]))
    out = []
    for mode in modes:
        if mode in NNCF_MODES:  # one candidate: NNCF places its quantizers (and accuracy control its float layers)
            out.append((mode, True, cfg.calibration, 0))
            continue
        calibs = s.calibration if mode == "int8-static" else [cfg.calibration]
        for pc, calib, keep in itertools.product(s.per_channel, calibs, sorted(s.keep_float)):
            out.append((mode, pc, calib, keep))
    return out


def _pick(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest candidate inside the budget; failing that, the most accurate (the gate then judges it)."""
    judged = [c for c in candidates if "failed" not in c]
    if not judged:
        raise BadInput("quantize search: every candidate failed, the fp32 model too: " + candidates[0]["failed"])
    inside = [c for c in judged if c["within_budget"]]
    if inside:
        return min(inside, key=lambda c: c["latency_ms"])
    return max(judged, key=lambda c: c["accuracy"])


def _sensitivity(model: Model, cfg: QuantizePass, ctx: PassContext) -> list[str]:
    """Quantizable nodes, most sensitive first: the output error when only that node is quantized."""
    import onnx

    ops = cfg.op_types or (STATIC_OPS if cfg.mode == "int8-static" else DYNAMIC_OPS)
    pre = onnx.load(str(_preprocessed(model, ctx)))
    names = [n.name for n in pre.graph.node if n.op_type in ops and n.name]
    feed = (ctx.calibration.feeds[0] if ctx.calibration is not None else None)
    if feed is None:
        return []
    ref = next(iter(_run_onnx(model.onnx_path, feed).values()))
    errors = {}
    for name in names:
        one = QuantizePass.model_validate({**cfg.model_dump(), "search": False})
        out = ctx.workdir / "sensitivity.onnx"
        _apply(model, one, ctx, [n for n in names if n != name], out)  # only this node quantized
        got = next(iter(_run_onnx(out, feed).values()))
        errors[name] = _cos_error(ref, got)
    ctx.log(f"[quantize] sensitivity of {len(names)} nodes; most sensitive: "
            + ", ".join(f"{n} ({errors[n]:.2e})" for n in sorted(errors, key=errors.get, reverse=True)[:4]))
    return sorted(errors, key=errors.get, reverse=True)


def _run_onnx(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run of an ONNX file as the reference runs it (ONNX Runtime CPU, basic optimizations, one thread)."""
    from mlopt.runtime.ort import onnx_file

    return onnx_file(path, threads=1)(feed)


def _cos_error(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    cos = np.sum(a2 * b2, 1) / np.maximum(np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1), 1e-12)
    return float(np.mean(1 - cos))


def _table(cands: list[dict[str, Any]], reference: float, backends: list[str]) -> str:
    """The search as a table: one row per candidate, one accuracy/latency column per backend."""
    lines = [f"[quantize] search: {len(cands)} candidates (reference {reference:.4f}); * chosen, p Pareto-optimal; "
             "per backend: accuracy and ms",
             "   id  mode          per_ch  calib       float  " + "".join(f"{b[:16]:<18}" for b in backends)
             + "best"]
    for c in sorted(cands, key=lambda c: c.get("latency_ms", float("inf"))):
        mark = ("*" if c["chosen"] else " ") + ("p" if c["pareto"] else " ")
        head = (f"{mark}{c['id']:>4}  {c['mode']:<12}  {str(c['per_channel']):<6}  {str(c['calibration']):<10}"
                f"  {str(c['kept_float']):>5}  ")
        per = c.get("backends", {})
        cells = "".join(f"{_cell(per[b]) if b in per else '-':<18}" for b in backends)
        tail = (f"failed: {c['failed'][:60]}" if "failed" in c and not per else
                "failed on every backend" if "failed" in c else
                f"{c['backend']} {c['drop']:+.4f}")
        lines.append(head + cells + tail)
    return "\n".join(lines)


def _cell(f: dict[str, Any]) -> str:
    return "failed" if "failed" in f else f"{f['accuracy']:.4f} {f['latency_ms']:8.2f}"
