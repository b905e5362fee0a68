"""Reproducible bytes: the same recipe built from two checkout folders into two fresh stores gives the
same model digest, version key and artifact bytes for every build, aarch64's cross-compiled TVM
library included. Nothing a build writes depends on where the checkout sits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ARM, EXAMPLES, FAST_BENCH
from mlopt.cli import app


def _checkout(root: Path) -> Path:
    """The digits example copied to its own folder, with its recipe's output and store inside it."""
    folder = root / "examples" / "digits"
    shutil.copytree(EXAMPLES / "digits", folder, ignore=shutil.ignore_patterns("__pycache__"))
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe.update(targets=["host", ARM], benchmark=dict(FAST_BENCH, batch_sizes=[1]), output="out", store="store",
                  backends={"cpu-aarch64-neoverse-v1": ["tvm", "openvino"], "cpu": ["onnxruntime", "openvino"]})
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "recipe.yaml"


def _build(recipe: Path) -> dict:
    res = CliRunner().invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    return json.loads((recipe.parent / "out" / "manifest.json").read_text())


def _digests(manifest: dict, store: Path) -> dict[str, object]:
    """Every build's file digests (as the store recorded them), by SKU and backend."""
    out: dict[str, object] = {"model": manifest["models"][0]["input_digest"],
                              "final": manifest["models"][0]["final_digest"]}
    for entry in manifest["entries"]:
        for cand in entry["candidates"]:
            if cand["status"] != "built":
                continue
            meta = json.loads((store / "objects" / cand["artifact"]["key"] / "artifact.json").read_text())
            out[f"{entry['sku']}/{cand['backend']}"] = (cand["artifact"]["key"],
                                                        {f: i["sha256"] for f, i in meta["files"].items()})
    return out


@pytest.mark.slow
def test_two_checkouts_two_stores_same_bytes(tmp_path: Path) -> None:
    a, b = _checkout(tmp_path / "one"), _checkout(tmp_path / "elsewhere" / "two")
    first, second = _digests(_build(a), a.parent / "store"), _digests(_build(b), b.parent / "store")
    assert f"{ARM}/tvm" in first and any(k.endswith("/onnxruntime") for k in first)  # aarch64 TVM was built
    assert first == second
