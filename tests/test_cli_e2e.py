"""End to end: `mlopt compile` on the digits example through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from conftest import ARM, HOST, X86_V4
from mlopt.cli import app
from mlopt.manifest import MANIFEST_SCHEMA_VERSION, SCHEMA_FILE, manifest_schema

runner = CliRunner()


def _manifest(build: dict) -> dict:
    return json.loads((build["out"] / "manifest.json").read_text())


def test_compile_succeeds_and_writes_valid_manifest(digits_build: dict) -> None:
    res = digits_build["result"]
    assert res.exit_code == 0, res.output
    m = _manifest(digits_build)
    jsonschema.validate(m, json.loads(SCHEMA_FILE.read_text()))
    assert m["schema_version"] == MANIFEST_SCHEMA_VERSION and m["status"] == "ok"
    # targets: [host, cpu-x86-64-v4, cpu-aarch64-neoverse-v1]; host is one of them or a SKU of its own
    assert [e["sku"] for e in m["entries"]] == list(dict.fromkeys([HOST, X86_V4, ARM]))
    assert m["entries"][0]["requested_as"] == "host"
    assert all(e.get("requested_as") is None for e in m["entries"][1:])
    assert "[host] target 'host' is " + HOST in digits_build["result"].output


def test_host_entry_is_measured_and_accurate(digits_build: dict) -> None:
    from mlopt.targets.catalog import load_catalog

    entry = _manifest(digits_build)["entries"][0]
    assert entry["chosen_backend"] in {"onnxruntime", "openvino", "tvm"}
    meas = entry["measurement"]
    assert [b["batch_size"] for b in meas["batches"]] == [1, 4]
    for b in meas["batches"]:
        assert 0 < b["p50_ms"] <= b["p90_ms"] <= b["p99_ms"] and b["runs"] >= 3
    assert meas["provenance"]["host"]["cpu"] and meas["provenance"]["threads"] == 2
    assert meas["accuracy"]["metric"] == "accuracy" and meas["accuracy"]["value"] > 0.95
    assert meas["accuracy"]["within_budget"]
    if load_catalog().get(HOST).price is not None:
        assert entry["cost"]["usd_per_million"] > 0
    built = [c for c in entry["candidates"] if c["status"] == "built"]
    assert {c["backend"] for c in built} == {"onnxruntime", "openvino", "tvm"}
    for c in built:
        assert c["validation"]["status"] == "passed" and c["validation"]["max_abs_diff"] < 1e-3
    fastest = min(built, key=lambda c: c["measurement"]["batches"][0]["p50_ms"] * c["measurement"]["batches"][1]["p50_ms"])
    assert entry["chosen_backend"] == fastest["backend"]


def test_cross_entry_has_no_figures(digits_build: dict) -> None:
    entry = next(e for e in _manifest(digits_build)["entries"] if e["sku"] == ARM)
    assert entry["measurement"] is None and entry["cost"] is None
    for c in entry["candidates"]:
        assert c["status"] == "built" and c["compiled"] == "cross"
        assert c["validation"]["status"] == "not-run" and c["measurement"] is None


def test_artifact_files_match_digests(digits_build: dict) -> None:
    from mlopt.core.files import sha256_file
    from mlopt.store import Store

    store = Store(digits_build["store"])
    for entry in _manifest(digits_build)["entries"]:
        art = store.get(entry["artifact"]["key"])
        assert art is not None
        for rel, info in art.meta["files"].items():
            assert sha256_file(art.path / rel) == info["sha256"]


def test_rerun_is_served_from_the_store(digits_build: dict) -> None:
    res = runner.invoke(app, ["compile", str(digits_build["recipe"]), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    cands = [c for e in m["entries"] for c in e["candidates"] if c["status"] == "built"]
    assert cands and all(c["cached"] for c in cands), [(e["sku"], c["backend"], c["cached"], c["reason"]) for e in m["entries"] for c in e["candidates"]]
    assert m["stage_seconds"]["ingest"] < 2.0


def test_json_output_is_only_the_manifest(tmp_path) -> None:
    """Libraries that print to stdout (calibration progress, tuning tables) must not corrupt --json."""
    import os
    import subprocess
    import sys

    from conftest import tiny_onnx

    code = ("import os; os.write(1, b'noise from a library\\n'); print('more noise')")
    (tmp_path / "noisy.py").write_text(f"def batches():\n    {code}\n    import numpy as np\n"
                                       "    yield {'x': np.ones((4, 4), np.float32)}\n")
    model = tiny_onnx(tmp_path / "m.onnx")
    out = subprocess.run([sys.executable, "-m", "mlopt.cli", "compile", str(model), "--json", "--runs", "3",
                          "--batch-sizes", "1", "--backend", "onnxruntime", "--target", "host",
                          "--eval-data", f"{tmp_path / 'noisy.py'}:batches", "--store", str(tmp_path / "s"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["status"] == "ok"
    assert "noise from a library" in out.stderr


def test_artifacts_commands(digits_build: dict) -> None:
    store = str(digits_build["store"])
    res = runner.invoke(app, ["artifacts", "list", "--store", store, "--json"])
    rows = json.loads(res.stdout)
    built = sum(c["status"] == "built" for e in _manifest(digits_build)["entries"] for c in e["candidates"])
    assert built >= 5  # ONNX Runtime, OpenVINO, TVM for x86-64; ONNX Runtime, TVM for aarch64
    assert res.exit_code == 0 and len(rows) == built and {r["version"] for r in rows} == {1}
    key = rows[0]["id"]
    show = runner.invoke(app, ["artifacts", "show", key[:10], "--store", store])
    assert show.exit_code == 0 and json.loads(show.stdout)["key"] == key
    ok = runner.invoke(app, ["artifacts", "verify", "--store", store])
    assert ok.exit_code == 0 and f"{built} ok, 0 damaged" in ok.stdout
    missing = runner.invoke(app, ["artifacts", "show", "ffffffffff", "--store", store])
    assert missing.exit_code == 2 and "no artifact" in missing.output


def test_manifest_show_and_schema(digits_build: dict) -> None:
    res = runner.invoke(app, ["manifest", "show", str(digits_build["out"] / "manifest.json")])
    assert res.exit_code == 0 and HOST in res.stdout and ARM in res.stdout
    schema = runner.invoke(app, ["manifest", "schema"])
    assert json.loads(schema.stdout) == json.loads(SCHEMA_FILE.read_text())


def test_shipped_schema_matches_models() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json.loads(json.dumps(manifest_schema())), \
        "run `make schemas` after changing mlopt/manifest.py"


def test_manifest_show_rejects_invalid(tmp_path: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"schema_version": "1.0"}))
    res = runner.invoke(app, ["manifest", "show", str(bad)])
    assert res.exit_code == 2 and "does not match schema" in res.output


def test_targets_and_doctor() -> None:
    res = runner.invoke(app, ["targets", "--json"])
    assert res.exit_code == 0
    listing = json.loads(res.stdout)
    names = [s["name"] for s in listing["skus"]]
    assert {"cpu-x86-64-v4", "cpu-x86-64-v3", "cpu-x86-64-v2", ARM} <= set(names)
    assert [n for n, h in listing["here"].items() if h["host"]] == [HOST] and listing["here"][HOST]["runs"]
    assert listing["here"][ARM] == {"runs": False, "host": False, "short": "aarch64 code",
                                    "reason": f"{ARM} code is aarch64 code; this machine is x86_64"}
    assert f"target 'host' is {HOST} on this machine" in runner.invoke(app, ["targets"]).output
    doc = runner.invoke(app, ["doctor", "--json"])
    assert doc.exit_code == 0
    report = json.loads(doc.stdout)
    assert report["host"]["machine"] and "onnxruntime" in report["toolchains"]
    assert report["skus"][ARM]["runs_here"] is False and report["host_sku"] == HOST


def test_help_does_not_import_heavy_libraries() -> None:
    import subprocess
    import sys

    code = "import sys; from mlopt.cli import app; import typer.testing as t; " \
           "t.CliRunner().invoke(app, ['--help']); " \
           "print(sorted(m for m in ('torch', 'tvm', 'onnxruntime', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_path_flags_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    import yaml

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "examples" / "digits" / "recipe.yaml"
    res = runner.invoke(app, ["compile", str(recipe), "--out", "rel/out", "--store", "rel/store", "--dry-run"])
    assert res.exit_code == 0, res.output
    printed = yaml.safe_load(res.stdout)
    assert printed["output"] == str(tmp_path / "rel" / "out") and printed["store"] == str(tmp_path / "rel" / "store")
    assert printed["data"]["evaluation"]["source"].startswith(str(recipe.parent))  # recipe paths stay the recipe's


def test_every_compile_flag_names_a_recipe_field() -> None:
    """The flag table's field paths exist in the recipe, so --dry-run shows every flag's effect."""
    from typing import get_args

    from pydantic import BaseModel

    from mlopt.cli.options import COMPILE_FLAGS
    from mlopt.recipes.schema import Recipe

    for flag in COMPILE_FLAGS:
        model: type[BaseModel] | None = Recipe
        for part in flag.field.split("."):
            assert model is not None and part in model.model_fields, f"{flag.decls[0]}: no recipe field {flag.field}"
            ann = model.model_fields[part].annotation
            model = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def test_dry_run_shows_each_flag_in_the_recipe(tmp_path: Path) -> None:
    import yaml

    recipe = Path(__file__).resolve().parents[1] / "examples" / "digits" / "recipe.yaml"
    res = runner.invoke(app, ["compile", str(recipe), "--dry-run", "-t", "host,cpu-aarch64-neoverse-v1", "--runs", "7",
                              "--batch-sizes", "1,4", "--gate-latency", "0.2", "--lenient-gates", "--name", "dg",
                              "--metric", "top1", "--registry", "localhost:5000/m", "--trials", "3", "-p", "quantize"])
    assert res.exit_code == 0, res.output
    r = yaml.safe_load(res.stdout)
    assert r["targets"] == ["host", "cpu-aarch64-neoverse-v1"] and r["benchmark"]["runs"] == 7
    assert r["benchmark"]["batch_sizes"] == [1, 4] and r["gates"]["latency_regression"] == 0.2
    assert r["gates"]["strict"] is False and r["model"]["name"] == "dg" and r["tuning"]["trials"] == 3
    assert r["image"]["registry"] == "localhost:5000/m" and [p["kind"] for p in r["passes"]] == ["quantize"]
    assert r["data"]["evaluation"]["metric"] == "accuracy"  # --metric only goes with --eval-data (as before)
