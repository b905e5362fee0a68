"""A model TVM's ONNX frontend cannot import: the failure names the op and node, and a build reports it
once for the model, however many TVM SKUs it targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ARM, HOST, X86_V4, tiny_onnx, write_recipe
from mlopt.cli import app
from mlopt.core.errors import ModelImportFailed

runner = CliRunner()


def test_frontend_failure_names_the_op_and_node() -> None:
    """A MaxPool whose height and width stay symbolic: TVM's frontend raises a bare TypeError deep inside;
    mlopt names the node it was converting and says what to do."""
    pytest.importorskip("tvm")
    from onnx import TensorProto, helper
    from tvm.relax.frontend.onnx import from_onnx

    from mlopt.targets.tvm_onnx import import_onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pool = helper.make_node("MaxPool", ["x"], ["y"], name="pool1", kernel_shape=[2, 2], auto_pad="SAME_UPPER",
                            strides=[2, 2])
    model = helper.make_model(helper.make_graph([pool], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelImportFailed) as e:
        import_onnx(model, {"x": ["batch", 1, "h", "w"]}, from_onnx)
    assert "TVM cannot import this model" in e.value.message and "MaxPool node 'pool1'" in e.value.message
    assert e.value.exit_code == 4 and "benchmark.dims" in (e.value.hint or "")


def test_failed_import_is_one_warning_for_every_tvm_sku(tmp_path: Path) -> None:
    """Celu, which TVM's frontend lacks: the host, x86-64-v4 and aarch64 TVM candidates each fail with a
    pointer, the manifest has one warning naming the op and the SKUs, and ONNX Runtime ships (exit 0)."""
    pytest.importorskip("tvm")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "celu", "model": {"source": str(tiny_onnx(tmp_path / "celu.onnx", op="Celu"))},
        "targets": ["host", X86_V4, ARM], "backends": ["onnxruntime", "tvm"],
        "benchmark": {"batch_sizes": [1], "warmup": 1, "runs": 3, "max_seconds": 1.0, "threads": 1},
        "output": str(tmp_path / "out"), "store": str(tmp_path / "store")})
    res = runner.invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    about = [w for w in m["warnings"] if "cannot import this model" in w]
    assert len(about) == 1, m["warnings"]
    assert "Celu" in about[0] and "onnxruntime or openvino" in about[0]
    tvm = {e["sku"]: next(c for c in e["candidates"] if c["backend"] == "tvm") for e in m["entries"]}
    tried = [sku for sku, c in tvm.items() if c["status"] == "failed"]
    assert HOST in tried and X86_V4 in tried  # aarch64 too, where a cross linker is installed
    assert about[0].endswith(")") and f"skipped on SKUs {', '.join(tried)}" in about[0]
    for sku in tried:
        assert "reported once" in tvm[sku]["reason"] and "Celu" not in tvm[sku]["reason"]
    assert not any(w.startswith(f"{sku}/tvm") for w in m["warnings"] for sku in tried)
    assert res.output.count("TVM cannot import this model") == 2  # the log line once, the warning once
    host = next(e for e in m["entries"] if e["sku"] == HOST)
    assert host["chosen_backend"] == "onnxruntime"
