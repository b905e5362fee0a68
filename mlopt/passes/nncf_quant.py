"""NNCF's post-training int8 quantization of the ONNX model: the ``nncf-ptq`` and ``nncf-accuracy-control``
modes of the quantize pass.

NNCF's ONNX backend writes QDQ ONNX (int8 weights behind DequantizeLinear, u8/i8 activations), so the result
is an ONNX model like any other quantize mode's: ONNX Runtime runs it, and OpenVINO converts its QDQ pairs
into int8 kernels (its runtime graph shows u8 convolutions and fully connected layers). NNCF's quantizer
placement differs from ONNX Runtime's (it knows OpenVINO's fusions, and with ``model_type: transformer`` it
leaves LayerNorm, Softmax and the residual adds in float), which is why it is worth a candidate of its own.

Accuracy control (``nncf.quantize_with_accuracy_control``) quantizes, then returns the quantizers that hurt
the recipe's metric most to float until the drop is within the recipe's ``accuracy.max_drop``. The recipe's
metric may be a whole-set figure (a Spearman over all word pairs), so the whole evaluation set is judged by it,
and the quantizers are ranked by how far they move each evaluation batch's outputs (``_validation_fn``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from mlopt.core.errors import BackendUnavailable, BadInput
from mlopt.passes import PassContext

# The quantize pass's config (mlopt.passes.quantize.QuantizePass); not imported, as quantize imports this module.
QuantizePass = Any

NNCF_MODES = ("nncf-ptq", "nncf-accuracy-control")


def quantize_nncf(source: Path, cfg: QuantizePass, ctx: PassContext, exclude: list[str], out: Path) -> dict[str, Any]:
    """``source`` (ONNX at opset 13 or newer) quantized by NNCF into ``out``; ``exclude`` names nodes left in float."""
    import onnx

    if ctx.calibration is None:
        raise BadInput(f"quantize {cfg.mode} needs data.calibration (a module:function or .npz)")
    nncf = _nncf()
    feeds = ctx.calibration.feeds[: cfg.calibration_batches]
    common = {"subset_size": len(feeds), "preset": _preset(nncf, cfg.preset), "model_type": _model_type(nncf, cfg),
              "ignored_scope": nncf.IgnoredScope(names=list(exclude), validate=False)}
    proto = onnx.load(str(source))
    with _quiet():
        if cfg.mode == "nncf-ptq":
            q = nncf.quantize(proto, nncf.Dataset(feeds), **common)
        else:
            q = _with_accuracy_control(nncf, proto, nncf.Dataset(feeds), cfg, ctx, common)
    onnx.save(q, str(out))
    return {"calibration_batches": len(feeds), "preset": cfg.preset, "model_type": cfg.model_type,
            "nncf": nncf.__version__, **({"max_drop": ctx.max_drop} if cfg.mode == "nncf-accuracy-control" else {})}


def _nncf() -> Any:
    try:
        import nncf
    except ImportError as e:
        raise BackendUnavailable(f"the quantize modes {', '.join(NNCF_MODES)} need NNCF, which is not installed "
                                 f"({e})", hint="pip install 'mlopt[nncf]' (nncf 3.4)") from None
    return nncf


def _preset(nncf: Any, preset: str | None) -> Any:
    return None if preset is None else nncf.QuantizationPreset(preset)


def _model_type(nncf: Any, cfg: QuantizePass) -> Any:
    return nncf.ModelType.TRANSFORMER if cfg.model_type == "transformer" else None


@contextlib.contextmanager
def _quiet() -> Any:
    """NNCF's progress bars go to stderr (stdout may carry a command's output), its INFO lines nowhere."""
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        nncf_logger.setLevel(level)


def _with_accuracy_control(nncf: Any, proto: Any, calib: Any, cfg: QuantizePass, ctx: PassContext,
                           common: dict[str, Any]) -> Any:
    if ctx.evaluate is None or ctx.evaluation is None:
        raise BadInput("quantize nncf-accuracy-control needs data.evaluation: its metric judges the quantizers")
    feeds = list(ctx.evaluation.feeds)
    validate = _validation_fn(ctx, feeds, _outputs(ctx.workdir / "nncf-reference.onnx", proto, feeds))
    items = nncf.Dataset(list(range(len(feeds))), lambda i: feeds[i])
    return nncf.quantize_with_accuracy_control(
        proto, calib, items, validate, max_drop=ctx.max_drop, drop_type=nncf.DropType.ABSOLUTE, **common)


def _validation_fn(ctx: PassContext, feeds: list[dict[str, Any]], reference: list[dict[str, Any]]) -> Any:
    """NNCF's ``validation_fn(model, batch indices) -> (metric, value per batch)``.

    On the whole evaluation set the metric is the recipe's (``ctx.evaluate``): that is what NNCF holds to
    ``max_drop``. The recipe's metric may exist only for the whole set (a Spearman over all word pairs), so on
    the few batches NNCF ranks quantizers with, and per batch, the figure is how close the outputs stay to the
    float model's: minus the normalized squared error (higher is better, as NNCF wants). NNCF's own ranking by
    output error exists only for OpenVINO models, not ONNX ones."""
    import numpy as np

    path = ctx.workdir / "nncf-validate.onnx"
    assert ctx.evaluate is not None

    def validate(model: Any, items: Iterable[int]) -> tuple[float, list[float]]:
        idx = list(items)
        outs = _outputs(path, model, [feeds[i] for i in idx])
        per_batch = [-_nmse(o, reference[i]) for o, i in zip(outs, idx)]
        if len(idx) < len(feeds):
            return float(np.mean(per_batch)), per_batch
        return ctx.evaluate(path), per_batch

    return validate


def _outputs(path: Path, proto: Any, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``proto`` saved to ``path`` and run on each feed (ONNX Runtime, as the reference runs)."""
    import onnx

    from mlopt.runtime.ort import onnx_file

    onnx.save(proto, str(path))
    run = onnx_file(path, threads=1)
    return [run(f) for f in feeds]


def _nmse(got: dict[str, Any], want: dict[str, Any]) -> float:
    """The normalized squared error of each output, averaged: |got - want|^2 / |want|^2."""
    import numpy as np

    errs = [float(np.sum((np.asarray(got[k], np.float64) - w) ** 2) / max(np.sum(np.asarray(w, np.float64) ** 2), 1e-30))
            for k, w in want.items()]
    return float(np.mean(errs))
