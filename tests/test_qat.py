"""Quantization-aware fine-tuning, the distillation chain, and the speed gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import EXAMPLES, FAST_BENCH, HOST, write_recipe
from mlopt.cli import app
from mlopt.compiler import ingest
from mlopt.compiler.data import Batches
from mlopt.compiler.feeds import run_onnx
from mlopt.core.errors import BadInput, RecipeError
from mlopt.passes import Figures, PassContext, get_pass
from mlopt.passes.qat import QatPass
from mlopt.recipes import recipe_from_dict
from mlopt.recipes.schema import InputSpec, ModelSource
from test_passes import _accuracy, _cnn, _digits, _model, _ops, _train

runner = CliRunner()
SHAPE = ["batch", 1, 8, 8]


def _residual_cnn():
    """Conv-BN-ReLU, a depthwise convolution, a residual add, pooling and a classifier: every placement rule."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
            self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(h + self.project(self.dw(self.expand(h))))

    return Net().eval()


def _ctx(tmp: Path, x: np.ndarray, y: np.ndarray | None, **kw) -> PassContext:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    src = ModelSource(source="built.py:in_test", inputs=[InputSpec(name="x", shape=SHAPE)])

    def export(mod, out, atol=None, torchscript=False):
        return ingest.export_torch(src, mod, out, "t", {"x": x[:4]}, atol, torchscript)

    feeds = [{"x": x[i:i + 64]} for i in range(0, len(x), 64)]
    return PassContext(workdir=work, calibration=Batches(feeds, y, "d"), export=export, **kw)


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_onnx(path, {"x": x})["output"].argmax(-1) == y).mean())


# ------------------------------------------------------------------ qat


def test_batchnorm_folding_keeps_outputs() -> None:
    import torch

    from mlopt.passes.qat import _fold_batchnorm, _trace

    net = _residual_cnn()
    for m in net.modules():  # running statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.from_numpy(_digits(32)[0])
    with torch.no_grad():
        want = net(x)
    gm = _trace(net)  # shares net's modules: folding rewrites their weights
    assert _fold_batchnorm(gm) == 4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-4)


def test_quantizers_sit_where_int8_kernels_read_them() -> None:
    """Weights of every convolution and Linear but the thin first one; activations into and out of each."""
    from mlopt.passes.qat import fake_quant_module

    x = _digits(128)[0]
    gm, placed = fake_quant_module(_residual_cnn(), [{"x": x[:64]}, {"x": x[64:]}], QatPass(kind="qat"))
    # expand, depthwise, project, classifier: weights; the stem (1 input channel, not grouped) stays float
    assert placed["weights"] == 4 and placed["batchnorm_folded"] == 4
    # stem out, expand in/out, ReLU6 outs, depthwise out, project out, the add's output, pooled, flattened...
    assert placed["activations"] >= 8
    scales = [m.scale for m in gm.modules() if type(m).__name__ == "ActFQ"]
    assert all(s > 0 for s in scales) and len(set(scales)) > 3  # calibrated, each its own range


def test_qat_trains_through_the_rounding_and_exports_int8_qdq(tmp_path: Path) -> None:
    x, y = _digits(1024)
    teacher = _train(_cnn(16), x[:512], y[:512], steps=200)
    model = _model(teacher, tmp_path, SHAPE, x)
    ort_judge = {"onnxruntime": lambda p: Figures(accuracy=_onnx_accuracy(p, x[512:], y[512:]), latency_ms=1.0)}
    ctx = _ctx(tmp_path, x[:512], None, judges=ort_judge, reference=_accuracy(teacher, x[512:], y[512:]),
               max_drop=0.05)
    cfg = QatPass(kind="qat", steps=60, lr=1e-3, weight_bits=7)
    new, details = get_pass("qat")(model, cfg, ctx)
    ops = _ops(new.onnx_path)
    # BatchNorm folded away; the second conv and the Linear read int8 weights; the 1-channel stem stays float
    assert "BatchNormalization" not in ops and ops.count("DequantizeLinear") >= 5
    assert details["weights"] == 2 and details["batchnorm_folded"] == 2 and details["weight_bits"] == 7
    assert details["loss_last"] < details["loss_first"] and details["train_seconds"] > 0
    assert details["judged_on"] == "onnxruntime" and "onnxruntime" in details["backends"]
    assert new.module_fn is None and new.is_quantized  # only the QDQ model describes the result
    # weights are stored as int8 (QuantizeLinear of constants folded), activations quantized at run time
    import onnx

    proto = onnx.load(str(new.onnx_path))
    assert details["int8_weights_stored"] == 2
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer) >= 2
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") - 2
    # the int8 model keeps the teacher's accuracy on held-out digits
    assert _onnx_accuracy(new.onnx_path, x[512:], y[512:]) >= _accuracy(teacher, x[512:], y[512:]) - 0.03


def test_qat_refuses_a_module_fx_cannot_trace(tmp_path: Path) -> None:
    import torch

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    import dataclasses

    x, _ = _digits(64)
    model = dataclasses.replace(_model(_cnn(8), tmp_path, SHAPE, x), module_fn=lambda: Branchy().eval())
    with pytest.raises(BadInput, match="torch.fx"):
        get_pass("qat")(model, QatPass(kind="qat", steps=1), _ctx(tmp_path, x, None))


def test_recipe_refuses_a_training_pass_after_qat() -> None:
    base = {"name": "m", "model": {"source": "model.py:f", "inputs": [{"name": "x", "shape": SHAPE}]},
            "data": {"calibration": {"source": "d.py:c"}}}
    with pytest.raises(RecipeError, match="must come before qat"):
        recipe_from_dict({**base, "passes": [{"kind": "qat"}, {"kind": "prune", "ratio": 0.5}]})
    recipe_from_dict({**base, "passes": [{"kind": "prune", "ratio": 0.5}, {"kind": "qat"}]})


# ------------------------------------------------------------------ prune -> distill from the original


def test_distill_trains_the_incoming_student_from_the_original(tmp_path: Path) -> None:
    import copy

    from mlopt.passes.distill import DistillPass
    from mlopt.passes.prune import prune_structured

    x, y = _digits()
    original = _train(_cnn(32), x, y, steps=200)
    pruned = copy.deepcopy(original)
    prune_structured(pruned, {"x": x[:8]}, 0.5, "magnitude", False, [])
    model = _model(pruned, tmp_path, SHAPE, x)
    cfg = DistillPass(kind="distill", student="input", teacher="original", steps=100, lr=3e-3)
    new, details = get_pass("distill")(model, cfg, _ctx(tmp_path, x, y, original=lambda: original))
    assert details["teacher"] == "original" and details["student"] == "input"
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert details["student_params"] == n_pruned < 0.5 * details["teacher_params"]
    assert details["loss_last"] < details["loss_first"]
    # the incoming module is copied, not trained in place
    assert all((a == b).all() for a, b in zip(pruned.state_dict().values(), model.module_fn().state_dict().values()))


def test_distill_student_must_be_a_factory_input_or_prune() -> None:
    from mlopt.passes.distill import DistillPass

    with pytest.raises(ValueError, match="'input'"):
        DistillPass(kind="distill", student="nothing")


# ------------------------------------------------------------------ the speed gate and the step table


def _digits_recipe(tmp: Path, passes: list, min_speedup: float | None) -> Path:
    data = yaml.safe_load((EXAMPLES / "digits" / "recipe.yaml").read_text())
    base = EXAMPLES / "digits"
    data["model"]["source"] = str(base / "model.py:trained")
    data["data"] = {"calibration": {"source": str(base / "data.py:calibration")},
                    "evaluation": {"source": str(base / "data.py:evaluation"), "metric": "accuracy"}}
    data.update(passes=passes, targets=[HOST], backends=["onnxruntime"], benchmark=FAST_BENCH,
                output=str(tmp / "out"), store=str(tmp / "store"),
                accuracy={"max_drop": 0.05, "min_speedup": min_speedup} if min_speedup else {"max_drop": 0.05})
    return write_recipe(tmp / "r.yaml", data)


def test_a_pass_that_does_not_pay_is_skipped_and_every_step_is_timed(tmp_path: Path) -> None:
    # unstructured pruning keeps accuracy and every dense kernel: it cannot be 3x faster
    step = {"kind": "prune", "method": "unstructured", "ratio": 0.3, "finetune_steps": 20}
    res = runner.invoke(app, ["compile", str(_digits_recipe(tmp_path, [step], 3.0)), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    report = m["models"][0]["passes"][0]
    assert report["status"] == "skipped" and "does not pay" in report["details"]["skipped_because"]
    assert report["judged_on"] == "onnxruntime" and report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0
    assert m["models"][0]["final_digest"] == m["models"][0]["input_digest"]
    assert "[passes] step" in res.stderr or "[passes] step" in res.output


def test_without_min_speedup_the_same_pass_ships(tmp_path: Path) -> None:
    step = {"kind": "prune", "method": "unstructured", "ratio": 0.3, "finetune_steps": 20}
    res = runner.invoke(app, ["compile", str(_digits_recipe(tmp_path, [step], None)), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["models"][0]["passes"][0]
    assert report["status"] == "applied" and report["latency_ms_after"] > 0


def test_the_speed_gate_keeps_a_pass_that_wins_accuracy_back() -> None:
    from types import SimpleNamespace

    from mlopt.compiler.pipeline import _speed_gate

    run = SimpleNamespace(recipe=SimpleNamespace(accuracy=SimpleNamespace(min_speedup=1.05)), log=lambda _: None)
    step = SimpleNamespace(kind="distill")
    assert _speed_gate(run, step, 10.0, 10.2, "onnxruntime", raised=True) == {}  # equal speed, accuracy won back
    skipped = _speed_gate(run, step, 10.0, 10.2, "onnxruntime", raised=False)
    assert skipped["status"] == "skipped" and "does not pay" in skipped["skip_reason"]
    assert _speed_gate(run, step, 10.0, 9.0, "onnxruntime", raised=False) == {}  # 1.11x pays


def test_min_speedup_below_one_is_refused() -> None:
    with pytest.raises(RecipeError, match="min_speedup"):
        recipe_from_dict({"name": "m", "model": {"source": "m.onnx"}, "accuracy": {"min_speedup": 0.5}})
