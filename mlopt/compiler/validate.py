"""Validation: a build's (or a pass's) outputs compared with the reference, within a tolerance.

The tolerance is chosen in one place, from (backend, precision): a float build gets its backend's
tolerance from ``TOLERANCES``; a reduced-precision build (int8, fp16, bf16) legitimately differs from
the reference by rounding, so its absolute tolerance scales with the outputs (``REDUCED_PRECISION_ATOL``).
A mismatch raises ``ValidationMismatch`` naming the output and the difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlopt.compiler.feeds import Runner, run_onnx
from mlopt.core.artifact import Validation
from mlopt.core.errors import ValidationMismatch
from mlopt.core.model import Model
from mlopt.core.spec import Strict


class Tolerance(Strict):
    """How far outputs may differ from the reference (numpy ``allclose``), and why that far."""

    atol: float
    rtol: float
    # reduced precision: an output beyond atol still passes when its relative L2 error ||got - ref|| / ||ref||
    # is at most this and no element is off by more than OUTLIER x atol (rounding accumulates through a deep
    # network's layers; a broken kernel or layout is off by about 100%)
    rel_l2: float | None = None
    why: str = ""


PASSES = "passes"  # the table's key for passes that keep outputs (checked on ONNX Runtime CPU)
DEFAULT = Tolerance(atol=1e-4, rtol=1e-3)

# float builds, by backend; a backend not named here gets DEFAULT
TOLERANCES: dict[str, Tolerance] = {
    "onnxruntime": DEFAULT,
    "tvm": DEFAULT,
    # OpenVINO's largest differences measured on the examples (f32 hint, AVX-512 CPU): digits 2.9e-6,
    # EfficientNet-Lite0 7.6e-6, MiniLM 1.9e-7. Without the hint an AVX512-BF16 CPU ran bf16: 0.08 and 0.1.
    "openvino": DEFAULT,
    "tensorrt": Tolerance(atol=2e-2, rtol=2e-2),  # fp16 engines
    "migraphx": Tolerance(atol=2e-2, rtol=2e-2),
    PASSES: DEFAULT,
}

# Passes that keep outputs but swap subgraphs for other kernels, by pass kind (others get TOLERANCES[PASSES]).
# Fused fp32 attention / SkipLayerNorm / BiasGelu reorder sums and mask with a finite filler instead of
# finfo.min: the largest difference seen was 1.2e-6 (a tiny BERT, outputs up to 3.4) and 1.1e-7 (MiniLM's
# normalised embeddings). A wrong fusion (heads, mask, scale) is off by percents, far beyond these bounds.
PASS_TOLERANCES: dict[str, Tolerance] = {
    "fuse-transformer": Tolerance(atol=1e-4, rtol=1e-3, rel_l2=1e-5,
                                  why="fused fp32 kernels: allclose, or relative L2 error at most 1e-5 with no "
                                      "element beyond 4 x atol"),
}

# Reduced-precision builds legitimately differ from the reference by rounding: an int8 kernel rounds
# where the reference's QDQ graph computes in float, an fp16 engine rounds every product. Their check
# guards against broken code (wrong layout, missing op), scaled to the outputs; accuracy is judged by
# the evaluation data and the budget, not here.
REDUCED_PRECISION_ATOL = {"int8": 0.05, "float16": 0.01, "bfloat16": 0.02}  # x max |reference output|
# relative L2 error a reduced-precision build may show overall: int8 kernels (ONNX Runtime's QLinear fusions,
# OpenVINO's u8/i8 layers) round differently from the reference's float QDQ graph at every layer, and it
# accumulates through depth (NNCF int8 MiniLM, six layers: 0.051 on ONNX Runtime, 0.063 on OpenVINO, with
# its Spearman above the fp32 model's); broken code is off by the order of the output (relative L2 ~1)
REDUCED_PRECISION_REL_L2 = {"int8": 0.10, "float16": 0.01, "bfloat16": 0.02}
OUTLIER = 4.0  # the largest single-element difference a reduced-precision build may show, in atols


def tolerance(backend: str, precision: str, quantized: bool, ref: dict[str, np.ndarray]) -> Tolerance:
    """The tolerance of a ``backend`` build of ``precision`` (``quantized``: the model has QDQ nodes)
    against the reference outputs ``ref``."""
    base = TOLERANCES.get(backend, DEFAULT)
    kinds = [k for k in REDUCED_PRECISION_ATOL if k in precision]
    if quantized and "int8" not in kinds:
        kinds.append("int8")
    if not kinds:
        return base
    frac = max(REDUCED_PRECISION_ATOL[k] for k in kinds)
    rel = max(REDUCED_PRECISION_REL_L2[k] for k in kinds)
    scale = max(float(np.max(np.abs(v))) for v in ref.values())
    return Tolerance(atol=max(base.atol, frac * scale), rtol=base.rtol, rel_l2=rel,
                     why=f"{'/'.join(kinds)} build: atol {frac:g} x max|reference| ({scale:.3g}), or relative "
                         f"L2 error at most {rel:g} with no element beyond {OUTLIER:g} x atol")


def check_close(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float, rtol: float, where: str,
                rel_l2: float | None = None) -> float:
    """Raise ``ValidationMismatch`` naming the first output beyond tolerance; return the max abs diff."""
    worst = 0.0
    for (rname, r), (gname, g) in zip(ref.items(), got.items()):
        r64, g64 = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if r64.shape != g64.shape:
            raise ValidationMismatch(gname, float("inf"), atol, rtol, f"{where} (shape {g64.shape} vs {r64.shape})")
        diff = float(np.max(np.abs(r64 - g64))) if r64.size else 0.0
        if not np.isfinite(diff) or not (np.allclose(g64, r64, atol=atol, rtol=rtol)
                                         or _close_in_l2(r64, g64, diff, atol, rel_l2)):
            raise ValidationMismatch(gname, diff, atol, rtol, where, _l2_note(r64, g64, rel_l2))
        worst = max(worst, diff)
    return worst


def relative_l2(ref: np.ndarray, got: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (0 for two zero arrays)."""
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(got - ref))
    return err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))


def _close_in_l2(ref: np.ndarray, got: np.ndarray, diff: float, atol: float, rel_l2: float | None) -> bool:
    return rel_l2 is not None and diff <= OUTLIER * atol and relative_l2(ref, got) <= rel_l2


def _l2_note(ref: np.ndarray, got: np.ndarray, rel_l2: float | None) -> str:
    return "" if rel_l2 is None else f"; relative L2 error {relative_l2(ref, got):.3g}, allowed {rel_l2:g}"


def validate(runner: Runner, model: Model, feed: dict[str, np.ndarray], backend: str, precision: str) -> Validation:
    """A ``backend`` build (``runner``) of ``model`` against the reference run of its ONNX file on ``feed``."""
    ref = run_onnx(model.onnx_path, feed)
    tol = tolerance(backend, precision, model.is_quantized, ref)
    diff = check_close(ref, runner(feed), tol.atol, tol.rtol, f"{backend} build", tol.rel_l2)
    return Validation(status="passed", max_abs_diff=diff, atol=tol.atol, rtol=tol.rtol,
                      **({"reason": tol.why} if tol.why else {}))


def check_pass(kind: str, old: Path, new: Path, feed: dict[str, np.ndarray]) -> float:
    """A pass that keeps outputs: the new model's outputs against the old one's on ``feed``."""
    tol = PASS_TOLERANCES.get(kind, TOLERANCES[PASSES])
    return check_close(run_onnx(old, feed), run_onnx(new, feed), tol.atol, tol.rtol, f"pass {kind}", tol.rel_l2)


def failed(e: ValidationMismatch) -> Validation:
    """The record of a mismatch, with the tolerance it broke."""
    return Validation(status="failed", max_abs_diff=e.max_abs_diff, atol=e.atol, rtol=e.rtol, reason=str(e))


def not_run(reason: str) -> Validation:
    """The record of a build this machine cannot run (validated where it runs)."""
    return Validation(status="not-run", reason=reason)
