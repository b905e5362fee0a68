"""Models nobody here wrote, as a user brings them: ONNX files shipped inside PyPI packages (the `wild`
extra), compiled through the CLI on the host SKU. They hold what the examples do not: If/LSTM, a rank-0
input, a recurrent state whose batch axis is 1, dynamic height and width, an opset below 13."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import HOST, write_recipe
from mlopt.cli import app

runner = CliRunner()


def package_file(package: str, name: str) -> Path:
    """A file shipped in an installed package, found without importing it (nudenet imports OpenCV)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install -e '.[wild]')")
    return Path(next(iter(spec.submodule_search_locations))) / name


VAD_DATA = '''
import numpy as np

def batches():
    """Speech-like audio: 512-sample chunks of tone bursts over noise at 16 kHz, zero state."""
    rng = np.random.default_rng(0)
    t = np.arange(512) / 16000
    for k in range(6):
        tone = np.sin(2 * np.pi * rng.uniform(120, 400, (4, 1)) * t) * rng.uniform(0, 0.5, (4, 1))
        audio = (tone + rng.standard_normal((4, 512)) * 0.01).astype("float32")
        yield {"input": audio, "state": np.zeros((2, 4, 128), "float32"), "sr": np.array(16000, "int64")}
'''


def _compile(recipe: Path) -> dict:
    res = runner.invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    return json.loads((recipe.parent / "out" / "manifest.json").read_text())


@pytest.mark.slow
def test_silero_vad_rank0_input_state_axis_and_every_output_judged(tmp_path: Path) -> None:
    """A rank-0 ``sr`` goes whole with every batch, the state is cut on its axis 1, the int8 search judges
    both outputs (the probability output has one value a sample: its cosine would always be 1), fp32 is a
    candidate, and whatever ships is validated and measured. OpenVINO converts it with the signature's shapes
    (its If branches hide a rank from the dynamic file), and TVM builds it once the fixed shapes decide the
    If conditions (inlined) and its LSTM is unrolled."""
    (tmp_path / "vad_data.py").write_text(VAD_DATA)
    data = f"{tmp_path / 'vad_data.py'}:batches"
    recipe = write_recipe(tmp_path / "vad.yaml", {
        "name": "silero-vad",
        "model": {"source": str(package_file("silero_vad", "data/silero_vad_16k_op15.onnx")),
                  "inputs": [{"name": "input", "shape": ["batch", "samples"]},
                             {"name": "state", "shape": [2, "batch", 128]},
                             {"name": "sr", "shape": [], "dtype": "int64"}]},
        "data": {"calibration": {"source": data}, "evaluation": {"source": data, "metric": "cosine"}},
        "passes": [{"kind": "quantize", "search": True,
                    "search_space": {"keep_float": [0], "calibration": ["minmax"], "per_channel": [True]}}],
        "accuracy": {"max_drop": 0.02},
        "targets": ["host"], "backends": {"cpu": ["onnxruntime", "openvino", "tvm"]},
        "benchmark": {"batch_sizes": [1, 4], "runs": 3, "warmup": 1, "threads": 1, "dims": {"samples": 512}},
        "output": str(tmp_path / "out"), "store": str(tmp_path / "store")})
    m = _compile(recipe)
    search = m["models"][0]["passes"][0]["details"]["search"]
    ids = [c["id"] for c in search["candidates"]]
    assert ids[0] == "fp32" and len(ids) == 2
    entry = next(e for e in m["entries"] if e["sku"] == HOST)
    chosen = next(c for c in entry["candidates"] if c["backend"] == entry["chosen_backend"])
    assert chosen["validation"]["status"] == "passed"
    acc = chosen["measurement"]["accuracy"]
    assert set(acc["per_output"]) == {"output", "stateN"} and acc["value"] == min(acc["per_output"].values())
    assert acc["within_budget"]
    assert [b["batch_size"] for b in chosen["measurement"]["batches"]] == [1, 4]
    by = {c["backend"]: c for c in entry["candidates"]}
    for backend in ("openvino", "tvm"):
        assert by[backend]["status"] == "built", (backend, by[backend].get("reason"))
        assert by[backend]["validation"]["status"] == "passed"
        assert [b["batch_size"] for b in by[backend]["measurement"]["batches"]] == [1, 4]
    assert "converted with the signature's shapes" in by["openvino"]["details"]["input_shapes_from_signature"]
    assert "1 LSTM unrolled" in by["tvm"]["details"]["shapes"] and "If inlined" in by["tvm"]["details"]["shapes"]


@pytest.mark.slow
def test_nudenet_detector_with_dynamic_height_and_width_builds_on_every_cpu_backend(tmp_path: Path) -> None:
    """YOLOv8n with dynamic batch, height and width: ONNX Runtime, OpenVINO and TVM all build, validate and
    measure it on this host (TVM gets the signature's shapes, and one library per batch size where the
    frontend cannot take a symbolic batch)."""
    recipe = write_recipe(tmp_path / "nude.yaml", {
        "name": "nudenet",
        "model": {"source": str(package_file("nudenet", "320n.onnx"))},
        "targets": ["host"], "backends": {"cpu": ["onnxruntime", "openvino", "tvm"]},
        "benchmark": {"batch_sizes": [1], "runs": 2, "warmup": 1, "threads": 2, "max_seconds": 5.0,
                      "dims": {"height": 160, "width": 160}},
        "output": str(tmp_path / "out"), "store": str(tmp_path / "store")})
    m = _compile(recipe)
    entry = next(e for e in m["entries"] if e["sku"] == HOST)
    by = {c["backend"]: c for c in entry["candidates"]}
    for backend in ("onnxruntime", "openvino", "tvm"):
        assert by[backend]["status"] == "built", (backend, by[backend].get("reason"))
        assert by[backend]["validation"]["status"] == "passed"
        assert by[backend]["measurement"]["batches"][0]["p50_ms"] > 0
    assert "static" in by["tvm"]["details"]["shapes"] or "symbolic" in by["tvm"]["details"]["shapes"]


def test_npz_data_follows_each_inputs_batch_axis(tmp_path: Path) -> None:
    """An .npz is cut along each input's batch axis: axis 1 of a [layers, batch, hidden] state, none for a
    rank-0 input (given whole to every batch); a model with a fixed batch of 1 gets batches of 1."""
    from mlopt.compiler.data import load_batches
    from mlopt.core.spec import InputSpec
    from mlopt.recipes.schema import DataSource

    np.savez(tmp_path / "d.npz", input=np.arange(10 * 3, dtype=np.float32).reshape(10, 3),
             state=np.arange(2 * 10 * 4, dtype=np.float32).reshape(2, 10, 4), sr=np.array(16000), labels=np.arange(10))
    specs = [InputSpec(name="input", shape=["batch", 3]), InputSpec(name="state", shape=[2, "batch", 4]),
             InputSpec(name="sr", shape=[], dtype="int64")]
    got = load_batches(DataSource(source=str(tmp_path / "d.npz"), batch_size=4), specs)
    assert [f["input"].shape for f in got.feeds] == [(4, 3), (4, 3), (2, 3)]
    assert [f["state"].shape for f in got.feeds] == [(2, 4, 4), (2, 4, 4), (2, 2, 4)]
    np.testing.assert_array_equal(got.feeds[1]["state"], np.arange(80, dtype=np.float32).reshape(2, 10, 4)[:, 4:8])
    assert all(f["sr"].shape == () and int(f["sr"]) == 16000 for f in got.feeds)
    assert got.labels is not None and got.labels.tolist() == list(range(10))
    fixed = [InputSpec(name="input", shape=[1, 3])]
    np.savez(tmp_path / "f.npz", input=np.zeros((5, 3), np.float32))
    assert [f["input"].shape for f in load_batches(DataSource(source=str(tmp_path / "f.npz")), fixed).feeds] == [(1, 3)] * 5


def test_fidelity_metrics_judge_every_output_and_one_value_outputs_by_their_error() -> None:
    """cosine of a [B, 1] output is only its sign: such an output is judged by its relative error, and the
    worst output decides (the int8 VAD whose probabilities were 25x off used to score 1.0)."""
    from mlopt.compiler.data import score_outputs
    from mlopt.recipes.schema import Evaluation

    rng = np.random.default_rng(0)
    ref = {"prob": rng.uniform(0.01, 0.9, (16, 1)), "state": rng.standard_normal((2, 16, 8))}
    off = {"prob": ref["prob"] * 25, "state": ref["state"]}
    value, per = score_outputs(Evaluation(source="x.npz", metric="cosine"), off, None, ref)
    assert per is not None and per["state"] == pytest.approx(1.0) and per["prob"] == 0.0 and value == 0.0
    near = {"prob": ref["prob"] * 1.01, "state": ref["state"]}
    assert score_outputs(Evaluation(source="x.npz", metric="relative-error"), near, None, ref)[0] == pytest.approx(0.99)
    snr, per = score_outputs(Evaluation(source="x.npz", metric="snr"), near, None, ref)
    assert snr == pytest.approx(40.0) and per["state"] == 100.0  # identical outputs: capped, finite


def test_openvino_conversion_failures_name_the_operators() -> None:
    from mlopt.targets.openvino import conversion_cause

    class OpConversionFailure(Exception):
        pass

    text = ("Check 'false' failed at src/frontends/common_translators/src/unconverted_ops_report.cpp:151:\n"
            "FrontEnd API failed with OpConversionFailure:\nModel wasn't fully converted. Failed operations "
            "detailed log:\n-- Conv-15 with a message:\n[ONNX Frontend] Conversion failed for Conv-15\n"
            "While validating ONNX node '<Node(Conv): c>': Check 'x' failed at conv.cpp:38:\n"
            "FrontEnd API failed with GeneralFailure:\nThe input data tensor's rank has to be known (static)\n\n"
            "Summary:\n-- Conversion is failed for: Conv-15, ReduceMean-15\n")
    assert conversion_cause(OpConversionFailure(text)) == (
        "OpConversionFailure: operators Conv-15, ReduceMean-15 failed to convert "
        "(The input data tensor's rank has to be known (static))")
