"""NNCF's int8 as quantize modes, on a digits CNN built here: QDQ that ONNX Runtime and OpenVINO both run in
int8, accuracy control inside the budget, and the search trying NNCF beside ONNX Runtime's quantizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import HOST, digits_recipe
from mlopt.compiler import ingest
from mlopt.compiler.data import Batches
from mlopt.core.model import Model
from mlopt.passes import Figures, PassContext, get_pass
from mlopt.passes.quantize import QuantizePass

pytest.importorskip("nncf")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:, None].astype(np.float32) / 16.0, d.target.astype(np.int64)


def _trained_cnn(x: np.ndarray, y: np.ndarray, steps: int = 80):
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and far faster on a busy machine
    try:
        for s in range(steps):
            i = (s * 64) % 1024
            opt.zero_grad()
            nn.functional.cross_entropy(m(torch.from_numpy(x[i:i + 64])), torch.from_numpy(y[i:i + 64])).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return m.eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Model, np.ndarray, np.ndarray]:
    import torch

    x, y = _digits()
    path = tmp_path_factory.mktemp("nncf-digits") / "src.onnx"
    torch.onnx.export(_trained_cnn(x, y), (torch.from_numpy(x[:4]),), str(path), input_names=["x"],
                      output_names=["output"], dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
    return ingest.read_onnx(path, [], "t"), x, y


def _ctx(tmp: Path, x: np.ndarray, y: np.ndarray, **kw) -> PassContext:
    """Calibration on the first 1024 images, evaluation (accuracy) on the other 773."""
    work = tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    calib = Batches([{"x": x[i:i + 64]} for i in range(0, 1024, 64)], y[:1024], "c")
    evaluation = Batches([{"x": x[i:i + 256]} for i in range(1024, len(x), 256)], y[1024:], "e")
    return PassContext(workdir=work, calibration=calib, evaluation=evaluation, evaluate=_evaluator(x, y), **kw)


def _evaluator(x: np.ndarray, y: np.ndarray):
    return lambda p: float(np.mean(ingest.run_onnx(p, {"x": x[1024:]})["output"].argmax(-1) == y[1024:]))


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _openvino_build(tmp: Path, onnx_path: Path) -> tuple[dict, Path]:
    from mlopt.compiler.ingest import read_onnx
    from mlopt.targets.backends import BuildRequest, get_backend
    from mlopt.targets.catalog import load_catalog

    req = BuildRequest(model=read_onnx(onnx_path, [], "q"), sku=load_catalog().get(HOST), threads=2, tuning_trials=0,
                       tuning_timeout_s=1, tuning_dir=tmp / "tuning", batch_axis="batch", dims={})
    out = tmp / "ov"
    out.mkdir()
    return get_backend("openvino").build(req, out), out


def _int8_layers(xml: Path) -> Counter:
    """OpenVINO's executed graph: the layer types that run with u8/i8 inputs."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ops = compiled.get_runtime_model().get_ordered_ops()
    return Counter(op.get_rt_info()["layerType"].astype(str) for op in ops
                   if op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8"))


def test_nncf_ptq_writes_qdq_that_onnxruntime_and_openvino_run_in_int8(tmp_path: Path, digits) -> None:
    model, x, y = digits
    ctx = _ctx(tmp_path, x, y)
    cfg = QuantizePass(kind="quantize", mode="nncf-ptq", calibration_batches=8)
    new, details = get_pass("quantize")(model, cfg, ctx)
    ops = _ops(new.onnx_path)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 6
    assert details["mode"] == "nncf-ptq" and details["calibration_batches"] == 8
    assert details["int8_weight_tensors"] == 3  # both convolutions and the Linear layer
    reference = ctx.evaluate(model.onnx_path)
    assert reference - ctx.evaluate(new.onnx_path) <= 0.03  # int8: close, not equal
    meta, art = _openvino_build(tmp_path, new.onnx_path)
    from mlopt.targets.backends import get_backend

    got = get_backend("openvino").load(art, meta, threads=1)({"x": x[1024:]})["output"]
    want = ingest.run_onnx(new.onnx_path, {"x": x[1024:]})["output"]
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.98  # both run the same int8 graph
    int8 = _int8_layers(art / meta["entry"])
    assert int8["Convolution"] == 2 and int8["FullyConnected"] == 1, int8


def test_nncf_accuracy_control_keeps_the_drop_within_max_drop(tmp_path: Path, digits) -> None:
    """Judged by top-1 agreement with the float model (plain PTQ loses about 2% of it), accuracy control
    returns the most harmful layers to float until the drop is inside max_drop, and keeps the rest int8."""
    from dataclasses import replace

    model, x, y = digits
    want = ingest.run_onnx(model.onnx_path, {"x": x[1024:]})["output"].argmax(-1)
    agreement = lambda p: float(np.mean(ingest.run_onnx(p, {"x": x[1024:]})["output"].argmax(-1) == want))  # noqa: E731
    ptq = replace(_ctx(tmp_path / "ptq", x, y), evaluate=agreement)
    plain, plain_details = get_pass("quantize")(model, QuantizePass(kind="quantize", mode="nncf-ptq"), ptq)
    plain_drop = 1.0 - agreement(plain.onnx_path)
    assert plain_drop > 0.004  # about 0.02 here; CPUs round int8 differently, so the budget follows it
    max_drop = round(plain_drop / 2, 4)  # the case accuracy control is for: plain PTQ breaks the budget
    ctx = replace(_ctx(tmp_path, x, y, reference=1.0, max_drop=max_drop), evaluate=agreement)
    new, details = get_pass("quantize")(model, QuantizePass(kind="quantize", mode="nncf-accuracy-control"), ctx)
    assert 1.0 - agreement(new.onnx_path) <= max_drop and details["max_drop"] == max_drop
    assert 1 <= details["int8_weight_tensors"] < plain_details["int8_weight_tensors"]  # some layers back to float


def test_nncf_accuracy_control_needs_evaluation_data(tmp_path: Path, digits) -> None:
    from mlopt.core.errors import BadInput

    model, x, y = digits
    ctx = PassContext(workdir=tmp_path, calibration=_ctx(tmp_path, x, y).calibration)
    with pytest.raises(BadInput, match="needs data.evaluation"):
        get_pass("quantize")(model, QuantizePass(kind="quantize", mode="nncf-accuracy-control"), ctx)


def test_search_lists_nncf_ptq_as_a_candidate(tmp_path: Path, digits) -> None:
    model, x, y = digits
    evaluate = _evaluator(x, y)

    def latency(p: Path) -> float:  # a deterministic stand-in for the timer: int8 is faster
        return 2.0 - 0.1 * _ops(p)["QuantizeLinear"]

    def judge(p: Path) -> Figures:  # one backend judging with the real metric and the stand-in timer
        return Figures(accuracy=evaluate(p), latency_ms=latency(p))

    ctx = _ctx(tmp_path, x, y, reference=evaluate(model.onnx_path), max_drop=0.1, judges={"onnxruntime": judge})
    cfg = QuantizePass(kind="quantize", mode="int8-static", search=True, calibration_batches=4,
                       search_space={"per_channel": [True], "calibration": ["minmax"], "keep_float": [0],
                                     "precisions": ["nncf-ptq"]})
    new, details = get_pass("quantize")(model, cfg, ctx)
    cands = details["search"]["candidates"]
    assert [c["mode"] for c in cands] == ["fp32", "int8-static", "nncf-ptq"]
    nncf = cands[2]
    assert "failed" not in nncf and nncf["latency_ms"] < cands[0]["latency_ms"]
    chosen = next(c for c in cands if c["chosen"])
    assert chosen["latency_ms"] == min(c["latency_ms"] for c in cands if c["within_budget"])
    assert _ops(new.onnx_path)["QuantizeLinear"] >= 3


def test_recipe_accepts_nncf_options_and_rejects_unknown_ones() -> None:
    from pydantic import ValidationError

    cfg = QuantizePass(kind="quantize", mode="nncf-ptq", preset="mixed", model_type="transformer")
    assert (cfg.preset, cfg.model_type) == ("mixed", "transformer")
    with pytest.raises(ValidationError, match="model_type"):
        QuantizePass(kind="quantize", mode="nncf-ptq", model_type="cnn")
    with pytest.raises(ValidationError, match="precisions"):
        QuantizePass(kind="quantize", search=True, search_space={"precisions": ["nncf-qat"]})


def test_compile_with_nncf_ptq_builds_int8_for_onnxruntime_and_openvino(tmp_path: Path) -> None:
    """The whole pipeline: the digits example quantized by NNCF passes the gate, and both backends build the
    QDQ model, pass validation against it and keep the accuracy budget."""
    import json

    from typer.testing import CliRunner

    from mlopt.cli import app

    recipe = digits_recipe(tmp_path, passes=[{"kind": "quantize", "mode": "nncf-ptq"}], targets=[HOST],
                           backends=["onnxruntime", "openvino"], accuracy={"max_drop": 0.02})
    res = CliRunner().invoke(app, ["compile", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    report = m["models"][0]["passes"][0]
    assert report["status"] == "applied" and report["details"]["mode"] == "nncf-ptq"
    assert report["details"]["int8_weight_tensors"] >= 3
    built = {c["backend"]: c for c in m["entries"][0]["candidates"] if c["status"] == "built"}
    assert set(built) == {"onnxruntime", "openvino"}, m["entries"][0]["candidates"]
    for c in built.values():
        assert c["validation"]["status"] == "passed" and c["measurement"]["batches"][0]["p50_ms"] > 0
    assert m["entries"][0]["measurement"]["accuracy"]["within_budget"]
