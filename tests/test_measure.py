"""`mlopt measure`: builds compiled where they could not run, validated and measured later on a machine
that runs them, with the figures merged into the manifest.

The "other machine" is this one: the compile runs with MLOPT_CPU_FLAGS=x86-64-v2 (the documented
override), so this machine's host SKU is cpu-x86-64-v2 and its cpu-x86-64-v3 and t4 builds are
cross-compiled without figures; `mlopt measure` then runs without the override, as the machine it is.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from conftest import BELOW_V3, digits_recipe, tiny_onnx, write_recipe
from test_engines import build_count, fake_libs, fakes  # noqa: F401  (fixtures: fake TensorRT, CUDA, NVML)
from mlopt.cli import app
from mlopt.manifest import SCHEMA_FILE, read_manifest
from mlopt.runtime import isa

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the cross SKU is an x86-64 level")

V3, GPU = "cpu-x86-64-v3", "t4"
runner = CliRunner()


@pytest.fixture(scope="module")
def cross_build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One compile of the digits example for the host, cpu-x86-64-v3 and a GPU SKU, with this machine
    narrowed to x86-64-v2 (ONNX Runtime only: the quickest backend that cross-compiles)."""
    tmp = tmp_path_factory.mktemp("measure")
    recipe = digits_recipe(tmp, targets=["host", V3, GPU], backends=["onnxruntime"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(isa.ENV, BELOW_V3)
        res = runner.invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    return {"store": tmp / "store", "manifest": tmp / "out" / "manifest.json"}


@pytest.fixture
def copied(cross_build: dict, tmp_path: Path) -> dict:
    """The compile's store and manifest copied here, as onto the machine that measures."""
    shutil.copytree(cross_build["store"], tmp_path / "store")
    shutil.copy(cross_build["manifest"], tmp_path / "manifest.json")
    return {"store": tmp_path / "store", "manifest": tmp_path / "manifest.json"}


def _measure(c: dict, sku: str, *flags: str):
    return runner.invoke(app, ["measure", str(c["manifest"]), "--sku", sku, "--store", str(c["store"]), *flags])


def _entry(path: Path, sku: str) -> dict:
    return next(e for e in json.loads(path.read_text())["entries"] if e["sku"] == sku)


def _runs_v3() -> bool:
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.detect import host_runs

    return host_runs(load_catalog().get(V3))[0]


def test_compile_left_the_cross_builds_without_figures(cross_build: dict) -> None:
    for sku in (V3, GPU):
        entry = _entry(cross_build["manifest"], sku)
        (cand,) = entry["candidates"]
        assert cand["compiled"] == "cross" and cand["measurement"] is None
        assert cand["validation"]["status"] == "not-run" and entry["measurement"] is None


def test_measure_merges_figures_with_provenance(copied: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(isa.ENV, raising=False)
    before = json.loads(copied["manifest"].read_text())
    res = _measure(copied, V3)
    if not _runs_v3():  # a CPU without AVX2 cannot run the build: refused, nothing written
        assert res.exit_code == 4 and "cpu-x86-64-v3" in res.output
        assert json.loads(copied["manifest"].read_text()) == before
        return
    assert res.exit_code == 0, res.output
    data = json.loads(copied["manifest"].read_text())
    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
    read_manifest(copied["manifest"])
    entry = _entry(copied["manifest"], V3)
    (cand,) = entry["candidates"]
    assert cand["status"] == "built" and cand["compiled"] == "cross" and cand["reason"] == ""
    assert cand["validation"]["status"] == "passed" and cand["validation"]["max_abs_diff"] < 1e-3
    prov = cand["measurement"]["provenance"]
    assert prov["measured_by"] == "mlopt measure" and prov["host"]["cpu"]
    assert prov["host"]["x86_level"] in {"x86-64-v3", "x86-64-v4"} and "avx2" in prov["host"]["features"]
    assert not prov["host"].get("cpu_flags_override")
    assert [b["batch_size"] for b in cand["measurement"]["batches"]] == [1, 4]  # the recipe's plan
    assert all(b["p50_ms"] > 0 for b in cand["measurement"]["batches"])
    assert cand["measurement"]["accuracy"]["value"] > 0.9 and cand["measurement"]["accuracy"]["within_budget"]
    assert entry["chosen_backend"] == "onnxruntime" and entry["chosen_by"].startswith("fastest measured")
    assert entry["measurement"] == cand["measurement"] and entry["cost"]["usd_per_million"] > 0
    # the other entries are as compile left them
    assert [e for e in data["entries"] if e["sku"] != V3] == [e for e in before["entries"] if e["sku"] != V3]
    assert data["status"] == "ok" and data["errors"] == []


def test_nothing_pending_writes_nothing_and_remeasure_measures_again(copied: dict) -> None:
    host = json.loads(copied["manifest"].read_text())["entries"][0]
    assert host["measurement"]["provenance"]["measured_by"] == "mlopt compile"
    with pytest.MonkeyPatch.context() as mp:  # the compile's machine, measuring its own host SKU again
        mp.setenv(isa.ENV, BELOW_V3)
        before = copied["manifest"].read_bytes()
        res = _measure(copied, host["sku"])
        assert res.exit_code == 0 and "nothing to measure" in res.output
        assert copied["manifest"].read_bytes() == before
        res = _measure(copied, host["sku"], "--remeasure", "--json")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    again = _entry(copied["manifest"], host["sku"])
    assert printed["entries"][0] == again
    assert again["measurement"]["provenance"]["measured_by"] == "mlopt measure"
    assert again["measurement"]["provenance"]["measured_at"] >= host["measurement"]["provenance"]["measured_at"]


def test_out_writes_elsewhere_and_leaves_the_manifest(copied: dict, tmp_path: Path) -> None:
    before = copied["manifest"].read_bytes()
    host = json.loads(before)["entries"][0]["sku"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(isa.ENV, BELOW_V3)
        res = _measure(copied, host, "--remeasure", "--out", str(tmp_path / "measured.json"))
    assert res.exit_code == 0, res.output
    assert copied["manifest"].read_bytes() == before
    assert read_manifest(tmp_path / "measured.json").entries[0].measurement.provenance.measured_by == "mlopt measure"
    res = _measure(copied, host, "--remeasure", "--out", str(tmp_path / "no" / "such" / "m.json"))
    assert res.exit_code == 2 and "cannot write the manifest" in res.output


def test_a_sku_this_machine_cannot_run_is_exit_4(copied: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.detect import host_runs

    before = copied["manifest"].read_bytes()
    res = _measure(copied, GPU)
    if not host_runs(load_catalog().get(GPU))[0]:  # every machine but one with a T4
        assert res.exit_code == 4, res.output
        assert res.output.splitlines()[0] == f"error: {GPU} is a GPU SKU and this machine has no matching GPU"
    monkeypatch.setenv(isa.ENV, BELOW_V3)  # the CPU case, on any x86-64 machine
    res = _measure(copied, V3)
    assert res.exit_code == 4 and "avx2" in res.output.splitlines()[0]
    assert copied["manifest"].read_bytes() == before


def _v3_artifact(c: dict) -> Path:
    return c["store"] / "objects" / _entry(c["manifest"], V3)["candidates"][0]["artifact"]["key"]


def test_damaged_or_missing_artifact_is_exit_2(copied: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(isa.ENV, raising=False)
    before = copied["manifest"].read_bytes()
    art = _v3_artifact(copied)
    model = art / "model.onnx"
    model.write_bytes(model.read_bytes() + b"x")
    res = _measure(copied, V3)
    assert res.exit_code == 2 and "is damaged" in res.output and "model.onnx" in res.output
    shutil.rmtree(art)
    res = _measure(copied, V3)
    assert res.exit_code == 2 and "is not in store" in res.output and "--store" in res.output
    assert copied["manifest"].read_bytes() == before


@pytest.mark.parametrize("sku, says", [("cpu-aarch64-neoverse-v1", "has no entry for SKU"),
                                       ("no-such-sku", "has no entry for SKU")])
def test_a_sku_not_in_the_manifest_is_exit_2(copied: dict, sku: str, says: str) -> None:
    res = _measure(copied, sku)
    assert res.exit_code == 2 and says in res.output and V3 in res.output


def test_a_garbage_manifest_is_exit_2(copied: dict, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.json"
    bad.write_bytes(b"\x00not json")
    res = runner.invoke(app, ["measure", str(bad), "--sku", V3, "--store", str(copied["store"])])
    assert res.exit_code == 2 and "is not JSON" in res.output
    data = json.loads(copied["manifest"].read_text())
    data["recipe"].pop("resolved")  # a manifest written before schema 1.4
    bad.write_text(json.dumps(data))
    res = runner.invoke(app, ["measure", str(bad), "--sku", V3, "--store", str(copied["store"])])
    assert res.exit_code == 2 and "does not record its resolved recipe" in res.output


def test_reference_recomputed_when_not_stored_and_a_missing_model_is_exit_2(copied: dict,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Without compile's reference outputs in the store, they are computed again from the ingested
    model; without the model the builds were made from, nothing can be validated: exit 2."""
    monkeypatch.delenv(isa.ENV, raising=False)
    if not _runs_v3():
        pytest.skip("this CPU does not run cpu-x86-64-v3 code")
    for kind in ("reference", "measure"):
        shutil.rmtree(copied["store"] / "cache" / kind)
    res = _measure(copied, V3)
    assert res.exit_code == 0, res.output
    assert "[reference] not in the store" in res.output
    cand = _entry(copied["manifest"], V3)["candidates"][0]
    assert cand["validation"]["status"] == "passed" and cand["measurement"]["accuracy"]["value"] > 0.9
    shutil.rmtree(copied["store"] / "cache" / "pass")  # the final model (after graph-optimize)
    before = copied["manifest"].read_bytes()
    res = _measure(copied, V3, "--remeasure")
    assert res.exit_code == 2 and "is not in store" in res.output and "the builds were made from" in res.output
    assert copied["manifest"].read_bytes() == before


def _runs_v3_or_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(isa.ENV, raising=False)
    if not _runs_v3():
        pytest.skip("this CPU does not run cpu-x86-64-v3 code")


def test_a_build_failing_validation_here_is_exit_3_and_recorded(copied: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlopt.compiler import validate

    _runs_v3_or_skip(monkeypatch)
    monkeypatch.setitem(validate.TOLERANCES, "onnxruntime", validate.Tolerance(atol=0.0, rtol=0.0))
    res = _measure(copied, V3)
    assert res.exit_code == 3, res.output
    data = json.loads(copied["manifest"].read_text())
    entry = _entry(copied["manifest"], V3)
    (cand,) = entry["candidates"]
    assert cand["status"] == "failed" and cand["validation"]["status"] == "failed" and cand["measurement"] is None
    assert entry["chosen_backend"] is None and entry["measurement"] is None
    assert data["status"] == "failed" and any(e.startswith(f"{V3}/onnxruntime: ") for e in data["errors"])


def test_a_failed_validation_is_remembered_until_the_tolerance_changes(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlopt.compiler import validate
    from mlopt.targets.ort import OrtBackend

    _runs_v3_or_skip(monkeypatch)
    recipe = digits_recipe(tmp_path, targets=[V3], backends=["onnxruntime"], passes=[])
    monkeypatch.setitem(validate.TOLERANCES, "onnxruntime", validate.Tolerance(atol=0.0, rtol=0.0))
    first = runner.invoke(app, ["compile", str(recipe)])
    assert first.exit_code == 3 and "FAILED validation:" in first.output, first.output
    builds = []
    real = OrtBackend.build
    monkeypatch.setattr(OrtBackend, "build", lambda self, *a: builds.append(1) or real(self, *a))
    again = runner.invoke(app, ["compile", str(recipe)])  # numerics have not changed: not built again
    assert again.exit_code == 3 and "FAILED validation (cached)" in again.output and builds == [], again.output
    (cand,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"][0]["candidates"]
    assert cand["validation"]["status"] == "failed" and cand["cached"]
    monkeypatch.setitem(validate.TOLERANCES, "onnxruntime", validate.DEFAULT)
    fixed = runner.invoke(app, ["compile", str(recipe)])  # a new tolerance is a new verdict
    assert fixed.exit_code == 0 and builds == [1], fixed.output


def test_a_build_whose_runtime_is_missing_here_stays_unmeasured(copied: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlopt.targets.backends import Availability
    from mlopt.targets.ort import OrtBackend

    _runs_v3_or_skip(monkeypatch)
    monkeypatch.setattr(OrtBackend, "availability", lambda self, sku, runs: Availability("cross", False, "no runtime"))
    res = _measure(copied, V3)
    assert res.exit_code == 4 and "not measured" in res.output, res.output
    (cand,) = _entry(copied["manifest"], V3)["candidates"]
    assert cand["status"] == "built" and cand["measurement"] is None and "no runtime" in cand["reason"]
    assert cand["validation"]["status"] == "not-run"


def test_an_on_device_engine_plan_is_built_and_measured_on_the_gpu(tmp_path: Path, request: pytest.FixtureRequest,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A TensorRT plan compiled where TensorRT is not, then measured on an H100 (the fake TensorRT,
    CUDA and NVML of test_engines.py, and a detected H100): the engine is built there, validated with
    TensorRT's tolerance, and timed with the recipe's plan."""
    import os

    from mlopt.targets import detect

    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "schema_version": 1, "name": "tiny", "targets": ["h100"], "backends": ["tensorrt"],
        "model": {"source": str(tiny_onnx(tmp_path / "tiny.onnx")),
                  "inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}]},
        "benchmark": {"batch_sizes": [1, 4], "warmup": 1, "runs": 5, "max_seconds": 2.0, "threads": 1},
        "output": str(tmp_path / "out"), "store": str(tmp_path / "store")})
    res = runner.invoke(app, ["compile", str(recipe)])  # the compile machine: no TensorRT, no GPU
    manifest = tmp_path / "out" / "manifest.json"
    assert res.exit_code == 0, res.output
    if _entry(manifest, "h100")["candidates"][0]["compiled"] != "on-device":
        pytest.skip("TensorRT and an H100 are here: compile built and measured the engine itself")
    fakes_on_path = request.getfixturevalue("fake_libs")  # now on the GPU node
    monkeypatch.setattr(detect, "_gpus_here", lambda: (detect.GPU("nvidia", "NVIDIA H100 80GB HBM3", "sm_90"),))
    monkeypatch.setenv("MLOPT_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.setenv("FAKE_TRT_LOG", str(tmp_path / "builds.log"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fakes_on_path), os.environ.get("PYTHONPATH", "")]))
    res = runner.invoke(app, ["measure", str(manifest), "--sku", "h100", "--store", str(tmp_path / "store")])
    assert res.exit_code == 0, res.output
    entry = _entry(manifest, "h100")
    (cand,) = entry["candidates"]
    assert cand["compiled"] == "on-device" and cand["validation"]["status"] == "passed"
    assert cand["validation"]["atol"] == 2e-2  # TensorRT's tolerance, as compile applies it
    assert [b["batch_size"] for b in cand["measurement"]["batches"]] == [1, 4]
    assert cand["measurement"]["provenance"]["measured_by"] == "mlopt measure"
    assert entry["chosen_backend"] == "tensorrt" and entry["cost"]["usd_per_million"] > 0
    assert build_count(tmp_path / "builds.log") >= 1 and any((tmp_path / "engines").iterdir())


def test_a_manifest_written_meanwhile_keeps_the_other_skus_figures(copied: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `mlopt measure` runs of one manifest (two SKUs): the second merges into what the first wrote."""
    from mlopt.compiler import remeasure

    _runs_v3_or_skip(monkeypatch)
    real = remeasure._rechoose

    def meanwhile(entry, sku, candidates):  # another measure rewrites the manifest while this one measures
        data = json.loads(copied["manifest"].read_text())
        data["errors"] = ["t4/onnxruntime: written meanwhile"]
        data["status"] = "failed"
        copied["manifest"].write_text(json.dumps(data))
        return real(entry, sku, candidates)

    monkeypatch.setattr(remeasure, "_rechoose", meanwhile)
    res = _measure(copied, V3)
    assert res.exit_code == 0, res.output
    data = json.loads(copied["manifest"].read_text())
    assert data["errors"] == ["t4/onnxruntime: written meanwhile"] and data["status"] == "failed"
    assert _entry(copied["manifest"], V3)["measurement"] is not None
