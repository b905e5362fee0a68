"""The OpenVINO backend: IR builds for CPU and Intel GPU SKUs, numerics against ONNX Runtime, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HOST, tiny_onnx
from typer.testing import CliRunner

from mlopt.cli import app
from mlopt.compiler.ingest import read_onnx, run_onnx
from mlopt.core.errors import UnsupportedOperator
from mlopt.targets.backends import BuildRequest, get_backend
from mlopt.targets.catalog import load_catalog

pytest.importorskip("openvino")
runner = CliRunner()


def _build(tmp: Path, onnx_path: Path, sku: str = HOST) -> tuple[dict, Path]:
    model = read_onnx(onnx_path, [], "tiny")
    req = BuildRequest(model=model, sku=load_catalog().get(sku), threads=2, tuning_trials=0, tuning_timeout_s=1,
                       tuning_dir=tmp / "tuning", batch_axis="batch", dims={})
    out = tmp / f"art-{sku}"
    out.mkdir()
    return get_backend("openvino").build(req, out), out


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4)).astype(np.float32)


def test_cpu_build_matches_onnxruntime_at_every_batch(tmp_path: Path) -> None:
    """One build with a dynamic batch axis runs batch 1 and 8, both equal to ONNX Runtime's outputs."""
    model = tiny_onnx(tmp_path / "m.onnx", op="Sigmoid")
    meta, art = _build(tmp_path, model)
    assert meta["precision"] == "float32" and meta["format"] == "openvino-ir"
    assert meta["details"]["input_shapes"] == {"x": "[?,4]"} and not meta["details"]["compress_to_fp16"]
    config = json.loads((art / meta["config"]).read_text())
    assert config["device"] == "CPU" and config["config"] == {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
    run = get_backend("openvino").load(art, meta, threads=1)
    for batch in (1, 8):
        got = run({"x": _x(batch, batch)})
        assert list(got) == ["y"] and got["y"].shape == (batch, 3)
        np.testing.assert_allclose(got["y"], run_onnx(model, {"x": _x(batch, batch)})["y"], atol=1e-6, rtol=1e-5)


def test_load_keeps_fp32_and_the_callers_threads(tmp_path: Path) -> None:
    """The CPU plugin would pick bf16 on AVX512-BF16/AMX CPUs; the build asks for f32 explicitly."""
    import openvino as ov

    meta, art = _build(tmp_path, tiny_onnx(tmp_path / "m.onnx"))
    config = json.loads((art / meta["config"]).read_text())
    compiled = ov.Core().compile_model(str(art / meta["entry"]), "CPU", {**config["config"], "INFERENCE_NUM_THREADS": 1})
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in {"<Type: 'float32'>", "f32"}
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_artifact_runs_with_its_own_script(tmp_path: Path) -> None:
    """run_openvino.py in the artifact needs only numpy and openvino: inputs.npz -> outputs.npz."""
    model = tiny_onnx(tmp_path / "m.onnx")
    _, art = _build(tmp_path, model)
    np.savez(tmp_path / "in.npz", x=_x(3))
    out = subprocess.run([sys.executable, str(art / "run_openvino.py"), str(tmp_path / "in.npz"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["y"], run_onnx(model, {"x": _x(3)})["y"], atol=1e-6)


def test_external_data_model_converts(tmp_path: Path) -> None:
    import onnx

    src = tiny_onnx(tmp_path / "src.onnx")
    (tmp_path / "ext").mkdir()
    ext = tmp_path / "ext" / "m.onnx"
    onnx.save(onnx.load(str(src)), str(ext), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "ext" / "m.onnx.data").is_file()
    meta, art = _build(tmp_path, ext)
    got = get_backend("openvino").load(art, meta, threads=1)({"x": _x(2)})
    np.testing.assert_allclose(got["y"], run_onnx(src, {"x": _x(2)})["y"], atol=1e-6)


def test_int8_qdq_model_runs_in_int8(tmp_path: Path) -> None:
    """A QDQ model from onnxruntime's quantize_static converts; the MatMul runs in u8 and matches ORT."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Calib(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": _x(4, seed)} for seed in range(4)])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    q = tmp_path / "q.onnx"
    quantize_static(str(tiny_onnx(tmp_path / "m.onnx")), str(q), Calib(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    meta, art = _build(tmp_path, q)
    assert meta["details"]["qdq_nodes"] >= 4
    got = get_backend("openvino").load(art, meta, threads=1)({"x": _x(8)})
    np.testing.assert_allclose(got["y"], run_onnx(q, {"x": _x(8)})["y"], atol=1e-4, rtol=1e-3)
    assert "u8" in _runtime_precisions(art / meta["entry"])


def _runtime_precisions(xml: Path) -> set[str]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()}


def test_intel_gpu_sku_gets_fp16_ir_built_here_not_run(tmp_path: Path) -> None:
    import openvino as ov

    if any(d.startswith("GPU") for d in ov.Core().available_devices):
        pytest.skip("this machine has an Intel GPU: the build runs here")
    avail = get_backend("openvino").availability(load_catalog().get("max-1550"), host_runs_sku=False)
    assert (avail.build, avail.run) == ("cross", False) and "GPU plugin" in avail.reason
    model = tiny_onnx(tmp_path / "m.onnx")
    meta, art = _build(tmp_path, model, "max-1550")
    _, cpu_art = _build(tmp_path, model, "cpu-x86-64-v4")
    assert meta["precision"] == "float16" and meta["details"]["compress_to_fp16"]
    config = json.loads((art / meta["config"]).read_text())
    assert config["device"] == "GPU" and config["config"]["INFERENCE_PRECISION_HINT"] == "f16"
    assert "INFERENCE_NUM_THREADS" not in config["config"]
    assert 'element_type="f16"' in (art / "model.xml").read_text()
    assert (art / "model.bin").stat().st_size < (cpu_art / "model.bin").stat().st_size


def test_availability_per_sku() -> None:
    backend, cat = get_backend("openvino"), load_catalog()
    assert backend.availability(cat.get("cpu-x86-64-v3"), host_runs_sku=True).build == "here"
    cross = backend.availability(cat.get("cpu-x86-64-v4"), host_runs_sku=False)
    assert (cross.build, cross.run) == ("cross", False) and cross.reason
    arm = backend.availability(cat.get("cpu-aarch64-neoverse-v1"), host_runs_sku=False)
    assert (arm.build, arm.run) == ("cross", False) and "portable" in arm.reason
    for sku in ("h100", "mi300x"):
        no = backend.availability(cat.get(sku), host_runs_sku=False)
        assert (no.build, no.run) == ("no", False) and no.reason


def test_missing_package_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    avail = get_backend("openvino").availability(load_catalog().get("cpu-x86-64-v4"), host_runs_sku=True)
    assert avail.build == "no" and "mlopt[openvino]" in avail.reason


def test_unconvertible_model_raises_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ingest refuses unregistered domains (exit 2); here the backend's own refusal is tested past that check
    monkeypatch.setattr("mlopt.compiler.ingest._check_opsets", lambda proto, path: None)
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    proto.ir_version = 8
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(UnsupportedOperator, match="OpenVINO cannot convert"):
        _build(tmp_path, tmp_path / "bad.onnx")


def test_mlopt_import_does_not_import_openvino() -> None:
    code = "import mlopt.cli, mlopt.targets.openvino, sys; print('openvino' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_compile_measures_openvino_beside_onnxruntime(tmp_path: Path) -> None:
    """`mlopt compile` on the host SKU: the openvino candidate is built, validated and measured."""
    assert "openvino" in load_catalog().get(HOST).backends
    model = tiny_onnx(tmp_path / "m.onnx")
    res = runner.invoke(app, ["compile", str(model), "--target", "host", "--backend", "onnxruntime",
                              "--backend", "openvino", "--batch-sizes", "1,4", "--runs", "5", "--warmup", "1",
                              "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    entry = json.loads(res.stdout)["entries"][0]
    cand = next(c for c in entry["candidates"] if c["backend"] == "openvino")
    assert cand["status"] == "built" and cand["compiled"] == "here" and cand["precision"] == "float32"
    assert cand["validation"]["status"] == "passed" and cand["validation"]["max_abs_diff"] < 1e-5
    assert [b["batch_size"] for b in cand["measurement"]["batches"]] == [1, 4]
    assert cand["measurement"]["provenance"]["libraries"]["openvino"]
    assert {"model.xml", "model.bin", "ov_config.json", "run_openvino.py"} <= set(cand["artifact"]["files"])
    assert entry["chosen_backend"] in {"onnxruntime", "openvino"}


def test_ir_names_do_not_depend_on_what_was_converted_before(tmp_path: Path) -> None:
    """OpenVINO names some operations from a process-wide counter; the IR must not carry it."""
    import openvino as ov

    from mlopt.targets.openvino import stable_names

    first, other = tiny_onnx(tmp_path / "a.onnx", op="Relu"), tiny_onnx(tmp_path / "b.onnx", op="Sigmoid", seed=1)
    xml = []
    for k in range(2):
        ov.convert_model(str(other))  # advances OpenVINO's counter between the two conversions
        model = ov.convert_model(str(first))
        stable_names(model, first)
        ov.save_model(model, str(tmp_path / f"ir{k}.xml"))
        xml.append((tmp_path / f"ir{k}.xml").read_bytes())
    assert xml[0] == xml[1]
