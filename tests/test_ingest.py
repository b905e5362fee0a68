"""Ingest: ONNX (with external data), torch.export .pt2, PyTorch factories and their checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_onnx
from mlopt.cli import app
from mlopt.compiler import ingest
from mlopt.core.errors import ModelLoadError, ValidationMismatch
from mlopt.recipes.schema import InputSpec, ModelSource

runner = CliRunner()
FAST = ["--runs", "3", "--warmup", "0", "--batch-sizes", "1,2", "--target", "host", "--json"]


def test_onnx_with_external_data(tmp_path: Path) -> None:
    import onnx

    src = tiny_onnx(tmp_path / "src.onnx")
    model = onnx.load(str(src))
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    assert (ext.parent / "weights.bin").stat().st_size > 0
    res = runner.invoke(app, ["compile", str(ext), "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    built = [c for c in m["entries"][0]["candidates"] if c["status"] == "built"]
    assert {c["backend"] for c in built} == {"onnxruntime", "openvino", "tvm"}
    assert all(c["validation"]["status"] == "passed" for c in built)
    # the digest covers the external weights: changing them changes the model's identity
    before = ingest.read_onnx(ext, [], "m").digest
    data = bytearray((ext.parent / "weights.bin").read_bytes())
    data[0] ^= 0xFF
    (ext.parent / "weights.bin").write_bytes(bytes(data))
    assert ingest.read_onnx(ext, [], "m").digest != before


def test_signature_is_read_from_onnx(tmp_path: Path) -> None:
    m = ingest.read_onnx(tiny_onnx(tmp_path / "m.onnx"), [], "m")
    assert m.inputs == (InputSpec(name="x", shape=["batch", 4], dtype="float32"),) and m.outputs == ("y",)


class TwoInputs:
    """A module with two inputs and a dynamic axis besides the batch, built in code."""

    @staticmethod
    def build():
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(6, 3)

            def forward(self, x, mask):
                return self.proj(x * mask.unsqueeze(-1)).mean(1)

        torch.manual_seed(0)
        return M().eval()


def test_pt2_source_exports_and_checks(tmp_path: Path) -> None:
    import torch

    module = TwoInputs.build()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ep = torch.export.export(module, (torch.randn(2, 5, 6), torch.ones(2, 5)),
                             dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    pt2 = tmp_path / "m.pt2"
    torch.export.save(ep, str(pt2))
    src = ModelSource(source=str(pt2), inputs=[InputSpec(name="x", shape=["batch", "seq", 6]),
                                               InputSpec(name="mask", shape=["batch", "seq"])])
    sample = {"x": np.random.default_rng(0).standard_normal((3, 7, 6)).astype(np.float32),
              "mask": np.ones((3, 7), np.float32)}
    model = ingest.export_torch(src, ingest.torch_loader(src)(), tmp_path / "m.onnx", "m", sample)
    assert [i.shape for i in model.inputs] == [["batch", "seq", 6], ["batch", "seq"]]
    out = ingest.run_onnx(model.onnx_path, sample)["output"]
    with torch.no_grad():
        ref = module(torch.from_numpy(sample["x"]), torch.from_numpy(sample["mask"])).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_export_check_catches_a_wrong_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the exported graph computed something else, the numeric check names the output."""
    src = ModelSource(source="x.py:f", inputs=[InputSpec(name="x", shape=["batch", 4])])
    module = TwoInputs.build()
    real = ingest.run_onnx
    monkeypatch.setattr(ingest, "_run_exporter", lambda s, m, a, out, o: tiny_onnx(out, op="Sigmoid"))
    monkeypatch.setattr(ingest, "run_onnx", lambda p, f, threads=1: {"output": real(p, f)["y"]})

    class Lin:
        def __call__(self, x):
            import torch

            return torch.zeros(x.shape[0], 3)

    with pytest.raises(ValidationMismatch, match="output 'output'"):
        ingest.export_torch(src, Lin(), tmp_path / "m.onnx", "m", {"x": np.ones((2, 4), np.float32)})
    del module


def test_factory_errors_are_bad_input(tmp_path: Path) -> None:
    (tmp_path / "f.py").write_text("def not_a_module():\n    return 3\n")
    src = ModelSource(source=f"{tmp_path / 'f.py'}:not_a_module", inputs=[InputSpec(name="x", shape=[1])])
    with pytest.raises(ModelLoadError, match="not an nn.Module"):
        ingest.torch_loader(src)()
    with pytest.raises(ModelLoadError, match="has no function"):
        ingest.load_callable(f"{tmp_path / 'f.py'}:missing", "model factory")
    with pytest.raises(ModelLoadError, match="does not exist"):
        ingest.load_callable(f"{tmp_path / 'nope.py'}:f", "model factory")


def test_checkpoint_loads_state_dict_weights_only(tmp_path: Path) -> None:
    import torch

    (tmp_path / "f.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    ref = torch.nn.Linear(4, 2)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    src = ModelSource(source=f"{tmp_path / 'f.py'}:make", checkpoint=str(tmp_path / "w.pt"),
                      inputs=[InputSpec(name="x", shape=["batch", 4])])
    module = ingest.torch_loader(src)()
    assert torch.equal(module.weight, ref.weight) and not module.training
