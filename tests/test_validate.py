"""Validation's one room: the tolerance table, the comparison, the typed mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlopt.compiler import validate
from mlopt.compiler.feeds import onnx_runner, ort_not_implemented
from mlopt.compiler.validate import DEFAULT, PASSES, REDUCED_PRECISION_ATOL, TOLERANCES, Tolerance, tolerance
from mlopt.core.errors import ValidationMismatch
from mlopt.core.model import Model
from mlopt.targets.backends import BACKENDS
from conftest import tiny_onnx

REF = {"y": np.array([[3.0, -8.0, 1.0]], dtype=np.float32)}  # max |reference| = 8


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_float_builds_get_their_backends_tolerance(backend: str) -> None:
    tol = tolerance(backend, "float32", False, REF)
    assert tol == TOLERANCES[backend] and tol.why == ""


def test_every_backend_and_the_passes_are_in_the_table() -> None:
    assert set(BACKENDS) | {PASSES} == set(TOLERANCES)
    assert TOLERANCES["onnxruntime"] == TOLERANCES[PASSES] == Tolerance(atol=1e-4, rtol=1e-3)
    assert TOLERANCES["tensorrt"] == Tolerance(atol=2e-2, rtol=2e-2)
    assert tolerance("a-new-backend", "float32", False, REF) == DEFAULT


@pytest.mark.parametrize("precision, kinds, frac, rel", [
    ("int8", "int8", 0.05, 0.1), ("float16", "float16", 0.01, 0.01),
    ("bfloat16", "float16/bfloat16", 0.02, 0.02),  # matched by name, so bfloat16 also reads as float16
    ("int8+float16", "int8/float16", 0.05, 0.1)])
def test_reduced_precision_builds_get_an_atol_scaled_by_the_outputs(precision: str, kinds: str, frac: float,
                                                                    rel: float) -> None:
    tol = tolerance("onnxruntime", precision, False, REF)
    assert tol.atol == pytest.approx(frac * 8) and tol.rtol == 1e-3
    assert tol.why.startswith(f"{kinds} build: atol {frac:g} x max|reference| (8), or relative L2 error at most {rel:g}")
    assert tol.rel_l2 == rel


def test_a_quantized_model_is_int8_whatever_the_build_reports() -> None:
    tol = tolerance("tvm", "float32", True, REF)  # TVM runs a QDQ graph in float
    assert tol.atol == pytest.approx(REDUCED_PRECISION_ATOL["int8"] * 8) and tol.why.startswith("int8 build")


def test_the_scaled_atol_never_goes_below_the_backends() -> None:
    tiny = {"y": np.array([1e-3], dtype=np.float32)}
    assert tolerance("tensorrt", "float16", False, tiny).atol == 2e-2


def test_validate_returns_a_validation_and_a_mismatch_is_typed(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m.onnx")
    model = Model(name="m", onnx_path=path, inputs=(), outputs=("y",), digest="d")
    feed = {"x": np.ones((2, 4), dtype=np.float32)}
    v = validate.validate(onnx_runner(path), model, feed, "onnxruntime", "float32")
    assert v.status == "passed" and v.max_abs_diff == 0.0 and (v.atol, v.rtol) == (1e-4, 1e-3)
    assert "reason" not in v.model_dump(exclude_unset=True)
    wrong = lambda f: {"y": onnx_runner(path)(f)["y"] + 1.0}  # noqa: E731
    with pytest.raises(ValidationMismatch, match="onnxruntime build: output 'y' differs") as e:
        validate.validate(wrong, model, feed, "onnxruntime", "float32")
    failed = validate.failed(e.value)
    assert failed.status == "failed" and failed.max_abs_diff == pytest.approx(1.0)
    assert (failed.atol, failed.rtol) == (1e-4, 1e-3) and failed.reason == str(e.value)


def test_a_failed_reduced_precision_validation_records_the_tolerance_it_broke(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m.onnx")
    model = Model(name="m", onnx_path=path, inputs=(), outputs=("y",), digest="d")
    feed = {"x": np.ones((2, 4), dtype=np.float32)}
    ref = onnx_runner(path)(feed)
    scale = float(np.max(np.abs(ref["y"])))
    wrong = lambda f: {"y": onnx_runner(path)(f)["y"] + 1.0 + scale}  # noqa: E731
    with pytest.raises(ValidationMismatch) as e:
        validate.validate(wrong, model, feed, "onnxruntime", "int8")
    assert validate.failed(e.value).atol == pytest.approx(max(1e-4, 0.05 * scale))
    assert f"atol={validate.failed(e.value).atol:g}" in str(e.value)


def test_shape_mismatch_names_the_output() -> None:
    with pytest.raises(ValidationMismatch, match=r"here \(shape \(1, 2\) vs \(1, 3\)\): output 'y' differs"):
        validate.check_close(REF, {"y": np.zeros((1, 2))}, 1e-4, 1e-3, "here")


def test_not_implemented_is_onnx_runtimes_exception_type(tmp_path: Path) -> None:
    """The pass gate catches this type (a bf16 Gemm has no CPU kernel), not a message's text."""
    import onnx
    from onnx import TensorProto as T, helper as h

    g = h.make_graph([h.make_node("Gemm", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", T.BFLOAT16, [2, 2])],
                     [h.make_tensor_value_info("y", T.BFLOAT16, [2, 2])], [h.make_tensor("w", T.BFLOAT16, [2, 2], [1, 2, 3, 4])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(tmp_path / "bf16.onnx"))
    with pytest.raises(ort_not_implemented(), match="NOT_IMPLEMENTED"):
        onnx_runner(tmp_path / "bf16.onnx", optimize=True)


def test_reduced_precision_passes_on_relative_l2_but_not_with_an_outlier_or_a_broken_layout() -> None:
    rng = np.random.default_rng(0)
    ref = {"y": rng.standard_normal((4, 500)) * 2}
    tol = tolerance("onnxruntime", "int8", False, ref)
    noisy = {"y": ref["y"] + rng.standard_normal((4, 500)) * 0.04}  # 2% rounding noise, some elements past atol
    noisy["y"][0, 0] = ref["y"][0, 0] + 1.5 * tol.atol
    assert not np.allclose(noisy["y"], ref["y"], atol=tol.atol, rtol=tol.rtol)
    assert validate.check_close(ref, noisy, tol.atol, tol.rtol, "b", tol.rel_l2) == pytest.approx(1.5 * tol.atol)
    outlier = {"y": noisy["y"].copy()}
    outlier["y"][1, 1] += 5 * tol.atol  # one element far off: a wrong kernel, not rounding
    with pytest.raises(ValidationMismatch, match="relative L2 error"):
        validate.check_close(ref, outlier, tol.atol, tol.rtol, "b", tol.rel_l2)
    transposed = {"y": ref["y"].reshape(500, 4).T.copy()}  # a layout bug: same values, wrong places
    with pytest.raises(ValidationMismatch):
        validate.check_close(ref, transposed, tol.atol, tol.rtol, "b", tol.rel_l2)
    with pytest.raises(ValidationMismatch):  # float builds keep the elementwise rule alone
        validate.check_close(ref, noisy, 1e-4, 1e-3, "b")


# ------------------------------------------------------------------ exit codes by one rule


def _fail_validation_of(monkeypatch: pytest.MonkeyPatch, backends: set[str]) -> None:
    """Builds of these backends fail validation, as a wrong kernel would; the others are checked as usual."""
    real = validate.validate

    def some_wrong(runner, model, feed, backend, precision):
        if backend in backends:
            raise ValidationMismatch("output", 0.5, 1e-4, 1e-3, f"{backend} build")
        return real(runner, model, feed, backend, precision)

    monkeypatch.setattr(validate, "validate", some_wrong)


def test_a_sku_with_a_validated_build_is_exit_0_and_the_failed_one_a_warning(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from conftest import HOST, digits_recipe
    from mlopt.cli import app

    _fail_validation_of(monkeypatch, {"openvino"})
    recipe = digits_recipe(tmp_path, targets=[HOST], backends={"cpu": ["onnxruntime", "openvino"]}, passes=[])
    res = CliRunner().invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["status"] == "ok" and m["errors"] == []
    assert [w.split(":")[0] for w in m["warnings"]] == [f"{HOST}/openvino"] and "differs" in m["warnings"][0]
    assert m["entries"][0]["chosen_backend"] == "onnxruntime"
    assert "warning:" in res.output


def test_a_graph_failing_every_runnable_validation_ships_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from conftest import ARM, HOST, digits_recipe
    from mlopt.cli import app

    _fail_validation_of(monkeypatch, {"onnxruntime"})
    recipe = digits_recipe(tmp_path, targets=[HOST, ARM], backends=["onnxruntime"], passes=[])
    res = CliRunner().invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 3, res.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    arm = next(e for e in m["entries"] if e["sku"] == ARM)
    assert arm["chosen_backend"] is None and arm["artifact"] is None
    assert arm["candidates"][0]["status"] == "built"  # built, kept in the store, but not what the SKU ships
    assert any(e.startswith(f"{ARM}: not chosen: every build of this graph that ran here ({HOST})") for e in m["errors"])
