"""The int8 search judges each candidate on every CPU backend of the recipe's targets that runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import HOST, digits_recipe
from mlopt.cli import app
from mlopt.compiler.judges import judge_backends
from mlopt.compiler.run import Run
from mlopt.recipes import recipe_from_dict
from mlopt.store import Store

runner = CliRunner()


def _run(tmp_path: Path, **changes) -> Run:
    recipe = recipe_from_dict({"name": "m", "model": {"source": str(tmp_path / "m.onnx")}, **changes})
    return Run(recipe, Store(tmp_path / "store"), lambda _: None)


@pytest.mark.parametrize(("changes", "want"), [
    ({}, ["onnxruntime", "openvino"]),  # the host SKU's CPU backends that read ONNX as it is
    ({"backends": {"cpu": ["openvino", "tvm"]}}, ["openvino"]),  # what the recipe allows
    ({"backends": ["tvm"]}, ["onnxruntime"]),  # no judging backend: the reference runtime judges
    ({"targets": ["h100"]}, ["onnxruntime"]),  # no SKU this machine runs
])
def test_judge_backends_follow_the_targets_this_machine_runs(tmp_path: Path, changes: dict, want: list) -> None:
    pytest.importorskip("openvino")
    assert judge_backends(_run(tmp_path, **changes)) == want


def test_search_on_digits_records_each_backend_and_the_gate_judges_the_winner(tmp_path: Path) -> None:
    """Through the CLI: the fp32 model and one int8 candidate, each with ONNX Runtime's and OpenVINO's
    figures; the pass names the backend that won, and the gate's accuracy is that backend's."""
    pytest.importorskip("openvino")
    recipe = digits_recipe(
        tmp_path, targets=["host"], backends={"cpu": ["onnxruntime", "openvino"]},
        passes=[{"kind": "quantize", "search": True, "search_space": {
            "per_channel": [True], "calibration": ["minmax"], "keep_float": [0]}}])
    # the untrained CNN: the search's mechanics, without training it (the metric is still the recipe's)
    recipe.write_text(recipe.read_text().replace("model.py:trained", "model.py:untrained"))
    res = runner.invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "onnxruntime" in res.output and "openvino" in res.output and "[quantize] search:" in res.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    report = m["models"][0]["passes"][0]
    search = report["details"]["search"]
    assert search["backends"] == ["onnxruntime", "openvino"]
    cands = search["candidates"]
    assert [c["id"] for c in cands] == ["fp32", 0]
    for c in cands:
        for b in ("onnxruntime", "openvino"):
            assert c["backends"][b]["latency_ms"] > 0 and 0 <= c["backends"][b]["accuracy"] <= 1
    chosen = next(c for c in cands if c["chosen"])
    assert chosen["backend"] == search["backend"] == report["details"]["judged_on"]
    assert chosen["latency_ms"] == chosen["backends"][chosen["backend"]]["latency_ms"]
    inside = [(c["backends"][b]["latency_ms"], c["id"], b) for c in cands for b in c["backends"]
              if c["backends"][b]["within_budget"]]
    assert (chosen["latency_ms"], chosen["id"], chosen["backend"]) == min(inside)
    assert report["accuracy_after"] == pytest.approx(chosen["backends"][chosen["backend"]]["accuracy"], abs=1e-4)
    entry = next(e for e in m["entries"] if e["sku"] == HOST)
    assert entry["chosen_backend"] in ("onnxruntime", "openvino")
