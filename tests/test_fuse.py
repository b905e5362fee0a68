"""fuse-transformer: ONNX Runtime's transformer fusions on a BERT-style graph from the dynamo exporter.

The fixture tests/fixtures/tiny_bert.onnx is a 2-layer encoder written in plain torch (tiny_bert.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FAST_BENCH, HOST, tiny_onnx, write_recipe
from mlopt.cli import app
from mlopt.compiler import validate as check
from mlopt.compiler.feeds import run_onnx
from mlopt.core.errors import RecipeError, ValidationMismatch
from mlopt.core.model import Model
from mlopt.passes import PassContext, get_pass
from mlopt.passes.fuse import FuseTransformerPass, contrib_ops
from mlopt.recipes import recipe_from_dict

TINY_BERT = Path(__file__).parent / "fixtures" / "tiny_bert.onnx"
INPUTS = [{"name": n, "shape": ["batch", "seq"], "dtype": "int64"}
          for n in ("input_ids", "attention_mask", "token_type_ids")]


def _feed(batch: int = 3, seq: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq - rng.integers(1, seq // 2, size=batch)[0]:] = 0  # padded tails, as a tokenizer writes
    return {"input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def _run(src: Path, tmp: Path, **cfg) -> tuple[Model, dict]:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    model = Model(name="t", onnx_path=src, inputs=(), outputs=("hidden",), digest="d")
    step = FuseTransformerPass(kind="fuse-transformer", **cfg)
    return get_pass("fuse-transformer")(model, step, PassContext(workdir=work))


def test_fuses_attention_layernorm_and_gelu_within_tolerance(tmp_path: Path) -> None:
    fused, details = _run(TINY_BERT, tmp_path)
    assert details["fuser"] == "onnxscript"  # ORT's own patterns miss the dynamo exporter's attention
    assert details["tries"]["onnxruntime"]["statistics"].get("Attention", 0) == 0
    assert details["attention_fused"] == 2 and details["num_heads"] == 4
    assert details["fused_ops"]["SkipLayerNormalization"] >= 4 and details["fused_ops"]["BiasGelu"] == 2
    assert details["fusions"] == sum(details["fused_ops"].values()) and details["nodes_after"] < details["nodes_before"]
    assert contrib_ops(__import__("onnx").load(str(fused.onnx_path))) == details["fused_ops"]
    assert fused.module_fn is None  # ONNX only: no module export reproduces contrib operators
    worst = check.check_pass("fuse-transformer", TINY_BERT, fused.onnx_path, _feed())
    assert worst < 1e-4


def test_openvino_runs_the_fused_graph_within_the_float_tolerance(tmp_path: Path) -> None:
    """OpenVINO's ONNX frontend reads the contrib operators (MultiHeadAttention, SkipLayerNormalization, BiasGelu)."""
    import openvino as ov

    fused, _ = _run(TINY_BERT, tmp_path)
    feed = _feed()
    got = ov.Core().compile_model(str(fused.onnx_path), "CPU")(feed)
    tol = check.TOLERANCES["openvino"]
    check.check_close(run_onnx(TINY_BERT, feed), {"hidden": next(iter(got.values()))}, tol.atol, tol.rtol, "openvino")


def test_auto_stops_at_onnxruntime_when_its_patterns_fuse_the_attention(tmp_path: Path) -> None:
    """The same model by the TorchScript exporter: ONNX Runtime's optimizer fuses Attention itself."""
    fused, details = _run(TINY_BERT.with_name("tiny_bert_torchscript.onnx"), tmp_path)
    assert details["fuser"] == "onnxruntime" and list(details["tries"]) == ["onnxruntime"]
    assert details["fused_ops"]["Attention"] == 2 and details["num_heads"] == 4
    check.check_pass("fuse-transformer", TINY_BERT.with_name("tiny_bert_torchscript.onnx"), fused.onnx_path, _feed())


def test_onnxruntime_fuser_alone_reports_its_statistics(tmp_path: Path) -> None:
    _, details = _run(TINY_BERT, tmp_path, fuser="onnxruntime", num_heads=4, hidden_size=32)
    assert details["fuser"] == "onnxruntime" and list(details["tries"]) == ["onnxruntime"]
    assert details["fused_ops"]["SkipLayerNormalization"] == 4 and details["fused_ops"]["BiasGelu"] == 2
    assert details["tries"]["onnxruntime"]["statistics"]["EmbedLayerNormalization"] == 1


def test_a_model_without_a_transformer_pattern_is_left_unchanged(tmp_path: Path) -> None:
    src = tiny_onnx(tmp_path / "mlp.onnx")
    fused, details = _run(src, tmp_path)
    assert details["fusions"] == 0 and details["fuser"] is None and "unchanged" in details["note"]
    x = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_onnx(fused.onnx_path, x)["y"], run_onnx(src, x)["y"])


def test_the_pass_tolerance_catches_a_broken_fusion(tmp_path: Path) -> None:
    """A fused graph computing something else (the mask ignored) is refused, naming the output."""
    fused, _ = _run(TINY_BERT, tmp_path)
    feed = _feed()
    unmasked = {**feed, "attention_mask": np.ones_like(feed["attention_mask"])}
    ref, got = run_onnx(TINY_BERT, feed), run_onnx(fused.onnx_path, unmasked)
    tol = check.PASS_TOLERANCES["fuse-transformer"]
    with pytest.raises(ValidationMismatch, match="hidden"):
        check.check_close(ref, got, tol.atol, tol.rtol, "pass fuse-transformer", tol.rel_l2)


def test_a_training_pass_after_fusion_is_refused_when_the_recipe_loads() -> None:
    data = {"schema_version": 1, "name": "t", "targets": [HOST],
            "model": {"source": "model.py:make", "inputs": INPUTS},
            "passes": [{"kind": "fuse-transformer"}, {"kind": "prune", "ratio": 0.5}]}
    with pytest.raises((RecipeError, ValueError), match="must come before fuse-transformer"):
        recipe_from_dict(data)


def test_compile_fused_then_int8_dynamic_tvm_refuses_contrib_ops_and_onnxruntime_ships(tmp_path: Path) -> None:
    """The chain fuse -> int8-dynamic compiles; TVM cannot read com.microsoft operators, so its build fails
    with them named (a warning), while the SKU's ONNX Runtime build stands and is chosen."""
    feeds = [_feed(8, 32, seed) for seed in range(2)]
    np.savez(tmp_path / "eval.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    recipe = write_recipe(tmp_path / "r.yaml", {
        "schema_version": 1, "name": "tiny-bert", "targets": [HOST], "backends": ["onnxruntime", "tvm"],
        "model": {"source": str(TINY_BERT), "inputs": INPUTS},
        "data": {"evaluation": {"source": str(tmp_path / "eval.npz"), "metric": "cosine", "batch_size": 8}},
        "passes": [{"kind": "fuse-transformer"}, {"kind": "quantize", "mode": "int8-dynamic"}],
        "accuracy": {"max_drop": 0.05},
        "benchmark": {**FAST_BENCH, "dims": {"seq": 32}},
        "output": str(tmp_path / "out"), "store": str(tmp_path / "store")})
    res = CliRunner().invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    fuse, quant = manifest["models"][0]["passes"]
    assert fuse["status"] == "applied" and fuse["details"]["attention_fused"] == 2
    assert quant["status"] == "applied" and quant["accuracy_after"] > 0.95
    entry = manifest["entries"][0]
    assert entry["chosen_backend"] == "onnxruntime"
    tvm = next(c for c in entry["candidates"] if c["backend"] == "tvm")
    assert tvm["status"] == "failed" and "reported once" in tvm["reason"]  # the reason itself: in the warnings
    assert any("TVM cannot import" in w and "com.microsoft::" in w for w in manifest["warnings"])
