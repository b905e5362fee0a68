"""bench/gpu_check.py: the refusal paths here; the real check on a machine with an NVIDIA GPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
has_gpu = shutil.which("nvidia-smi") is not None and subprocess.run(
    ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_run_refuses_without_a_gpu_or_a_build_for_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load()
    (tmp_path / "bundle.json").write_text(json.dumps({"model": "m", "builds": {"sm_90": {"folder": "tvm-sm_90"}},
                                                      "batches": [1], "atol": 1e-3, "rtol": 1e-3}))
    monkeypatch.setattr(gpu_check, "_gpu_arch", lambda: None)
    assert gpu_check.run(tmp_path, tmp_path / "out", runs=3) == 4
    monkeypatch.setattr(gpu_check, "_gpu_arch", lambda: "sm_86")  # an A10G cannot run the sm_90 build
    assert gpu_check.run(tmp_path, tmp_path / "out", runs=3) == 4
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu, reason="needs an NVIDIA GPU (nvidia-smi)")
def test_gpu_check_on_the_card(tmp_path: Path) -> None:
    gpu_check = _load()
    arch = gpu_check._gpu_arch()
    sku = {"sm_75": "t4", "sm_80": "a100-80gb", "sm_86": "a10g", "sm_89": "l4", "sm_90": "h100"}[arch]
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "prepare", "--sku", sku,
                    "--out", str(tmp_path / "bundle"), "--store", str(tmp_path / "store")], check=True)
    assert gpu_check.run(tmp_path / "bundle", tmp_path / "out", runs=10) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert all(r["mlopt TVM build ms"] > 0 for r in rows)
