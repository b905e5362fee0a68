"""Any x86-64 or aarch64 machine: the 'host' target, MLOPT_CPU_FLAGS, and never running code the CPU lacks.

The refusal path runs on every machine: MLOPT_CPU_FLAGS=x86-64-v2 narrows what mlopt believes this
CPU has, so x86-64-v3 builds are foreign to it wherever the suite runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import EXAMPLES, HOST, ROOT, tiny_onnx, write_recipe
from mlopt.cli import app
from mlopt.core.errors import BackendUnavailable, BadInput, UnknownName
from mlopt.runtime import isa
from mlopt.store import Store
from mlopt.targets import detect
from mlopt.targets.catalog import load_catalog

runner = CliRunner()
X86 = platform.machine() == "x86_64"
needs_x86 = pytest.mark.skipif(not X86, reason="the x86-64 levels are tested on x86-64 machines")
V4_CPUINFO = ("processor: 0\nflags\t\t: fpu sse2 cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma "
              "abm movbe xsave avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni amx_tile gfni vaes\n")


# ------------------------------------------------------------------ what the CPU has


def test_cpu_flags_are_read_from_cpuinfo_and_narrowed_only() -> None:
    flags = isa.real_cpu_flags(V4_CPUINFO)
    assert {"avx512f", "avx2", "sse4_2"} <= flags
    v3 = isa.narrow(flags, "x86-64-v3")
    assert "avx2" in v3 and "fma" in v3 and not any(f.startswith(("avx512", "amx")) for f in v3)
    v2 = isa.narrow(flags, "x86-64-v2")
    assert "sse4_2" in v2 and not ({"avx", "avx2", "fma", "gfni", "vaes", "avx512f"} & v2)
    assert isa.narrow(flags, "avx2, fma  sse4_2,nosuchflag") == {"avx2", "fma", "sse4_2"}  # never adds a flag
    assert isa.narrow(flags, "") == flags and isa.narrow(flags, None) == flags


def test_refusal_names_what_is_missing_and_what_the_cpu_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(isa.ENV, "x86-64-v3")
    need = {"machine": platform.machine(), "cpu_flags": ["avx512f", "avx512bw", "avx2"]}
    if X86 and "avx2" in isa.real_cpu_flags():
        assert isa.refusal(need, "build b") == ("build b needs avx512f, avx512bw; this CPU has avx2, fma"
                                                " (MLOPT_CPU_FLAGS=x86-64-v3)")
    other = "aarch64" if X86 else "x86_64"
    assert isa.refusal({"machine": other}, "build b") == f"build b is {other} code; this machine is {platform.machine()}"
    assert isa.refusal({}, "b") is None and isa.refusal(None, "b") is None
    with pytest.raises(isa.UnsupportedCPU):
        isa.require({"machine": other}, "b")


# ------------------------------------------------------------------ the host target


def test_host_resolves_to_the_best_sku_this_machine_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cat = load_catalog()
    host = detect.host_sku(cat)
    assert host.name == HOST and detect.host_runs(host) == (True, "")
    better = [s for s in cat.skus if s.kind == "cpu" and detect.host_runs(s)[0]
              and len(s.requirements.cpu_flags) > len(host.requirements.cpu_flags)]
    assert not better
    if X86:
        monkeypatch.setenv(isa.ENV, "x86-64-v2")
        assert detect.host_sku(cat).name == "cpu-x86-64-v2"
        assert detect.host_runs(cat.get("cpu-x86-64-v3"))[0] is False
        monkeypatch.setenv(isa.ENV, "nosuchflag")
        with pytest.raises(UnknownName, match="no CPU SKU in the catalog runs on this machine"):
            detect.host_sku(cat)


@needs_x86
def test_targets_dedupe_and_remember_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(isa.ENV, "x86-64-v3")
    got = detect.resolve_targets(load_catalog(), ["cpu-x86-64-v3", "host", "cpu-x86-64-v4", "HOST"])
    assert [(s.name, r) for s, r in got] == [("cpu-x86-64-v3", "host"), ("cpu-x86-64-v4", None)]


@needs_x86
@pytest.mark.parametrize("level", ["x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_every_x86_sku_needs_its_whole_level(level: str) -> None:
    """A SKU's flags are cumulative (v4 needs v3's and v2's too), so the refusal check cannot miss one."""
    sku = load_catalog().get(f"cpu-{level}")
    levels = list(isa.X86_LEVELS)
    needed = {f for name in levels[: levels.index(level) + 1] for f in isa.X86_LEVELS[name]}
    assert needed <= set(sku.requirements.cpu_flags) and sku.tvm_target["mcpu"] == level


def test_a_user_catalog_cannot_take_the_name_host(tmp_path: Path) -> None:
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"skus": [{
        "name": "host", "vendor": "generic", "kind": "cpu", "arch": "x86-64-v3", "backends": ["onnxruntime"]}]}))
    with pytest.raises(BadInput, match="reserved"):
        load_catalog(tmp_path / "cat.yaml")


def test_targets_show_host_and_doctor_sku_host() -> None:
    res = runner.invoke(app, ["targets", "show", "host", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["name"] == HOST
    doc = runner.invoke(app, ["doctor", "--sku", "host", "--json"])
    assert doc.exit_code == 0 and json.loads(doc.stdout)["sku"] == HOST


# ------------------------------------------------------------------ never run what the CPU lacks


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model compiled for cpu-x86-64-v3 on a machine narrowed to x86-64-v2 (every x86 machine)."""
    if not X86:
        pytest.skip("needs an x86-64 machine")
    tmp = tmp_path_factory.mktemp("foreign")
    model = tiny_onnx(tmp / "m.onnx")
    env = {**os.environ, isa.ENV: "x86-64-v2"}
    out = subprocess.run([sys.executable, "-m", "mlopt.cli", "compile", str(model), "--target", "cpu-x86-64-v3",
                          "--target", "host", "--backend", "onnxruntime,tvm", "--batch-sizes", "1", "--runs", "3",
                          "--warmup", "0", "--store", str(tmp / "store"), "--out", str(tmp / "out"), "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"tmp": tmp, "manifest": json.loads(out.stdout), "env": env, "log": out.stderr}


def _tvm_artifact(manifest: dict, sku: str) -> Path:
    entry = next(e for e in manifest["entries"] if e["sku"] == sku)
    return Path(next(c for c in entry["candidates"] if c["backend"] == "tvm")["artifact"]["path"])


def test_foreign_builds_are_cross_and_never_run(foreign: dict) -> None:
    m = foreign["manifest"]
    assert [(e["sku"], e.get("requested_as")) for e in m["entries"]] == [("cpu-x86-64-v3", None),
                                                                       ("cpu-x86-64-v2", "host")]
    assert m["host"]["cpu_flags_override"] == "x86-64-v2"
    v3, v2 = m["entries"]
    for c in v3["candidates"]:
        assert c["compiled"] == "cross" and c["validation"]["status"] == "not-run" and c["measurement"] is None
        assert "needs avx" in c["reason"]
    assert v3["measurement"] is None and v2["measurement"]["batches"][0]["p50_ms"] > 0
    assert "[host] target 'host' is cpu-x86-64-v2" in foreign["log"]


def test_run_tvm_refuses_a_foreign_build_with_exit_4(foreign: dict, tmp_path: Path) -> None:
    art = _tvm_artifact(foreign["manifest"], "cpu-x86-64-v3")
    np.savez(tmp_path / "in.npz", x=np.ones((1, 4), np.float32))
    out = subprocess.run([sys.executable, str(art / "run_tvm.py"), str(tmp_path / "in.npz"), str(tmp_path / "o.npz")],
                         capture_output=True, text=True, env=foreign["env"], timeout=120)
    assert out.returncode == 4, out.stderr
    assert out.stderr.strip().endswith("needs avx, avx2, bmi1, bmi2, f16c, fma, abm, movbe, xsave; this CPU has "
                                       "sse4_2 (MLOPT_CPU_FLAGS=x86-64-v2)")
    assert "Traceback" not in out.stderr and not (tmp_path / "o.npz").exists()
    ok = subprocess.run([sys.executable, str(_tvm_artifact(foreign["manifest"], "cpu-x86-64-v2") / "run_tvm.py"),
                         str(tmp_path / "in.npz"), str(tmp_path / "o.npz")], capture_output=True, text=True,
                        env=foreign["env"], timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert np.load(tmp_path / "o.npz")["y"].shape == (1, 3)


def test_every_loader_refuses_before_loading(foreign: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlopt.targets.backends import get_backend

    monkeypatch.setenv(isa.ENV, "x86-64-v2")
    art = Store(foreign["tmp"] / "store").get(_tvm_artifact(foreign["manifest"], "cpu-x86-64-v3").name)
    with pytest.raises(BackendUnavailable, match=r"\(cpu-x86-64-v3/tvm\) needs avx, avx2"):
        get_backend("tvm").load(art.path, art.meta, 1)


def test_image_entry_refuses_a_foreign_build_with_exit_4(foreign: dict, tmp_path: Path) -> None:
    """serve.json carries the build's requirements; the entry point refuses before it loads anything."""
    from mlopt.manifest import Manifest
    from mlopt.package import entry
    from mlopt.package.serving import ServingOptions, deployables, serve_spec

    items, _ = deployables(Manifest.model_validate(foreign["manifest"]), Store(foreign["tmp"] / "store"), load_catalog())
    d = next(d for d in items if d.sku.name == "cpu-x86-64-v3")
    spec = serve_spec(d, ServingOptions())
    assert spec["requires"] == d.artifact.meta["requires"]
    tvm_art = Store(foreign["tmp"] / "store").get(_tvm_artifact(foreign["manifest"], "cpu-x86-64-v3").name)
    spec.update(backend="tvm", entry="tvm_entry.json", model_dir=str(tvm_art.path), requires=tvm_art.meta["requires"])
    (tmp_path / "serve.json").write_text(json.dumps(spec))
    for args in ([], ["--check"]):
        out = subprocess.run([sys.executable, entry.__file__, "--serving", str(tmp_path / "serve.json"), "--port", "0",
                              *args], capture_output=True, text=True, env=foreign["env"], timeout=60)
        assert out.returncode == 4 and "needs avx, avx2" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ a clean working directory


def _listing(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for f in folders for p in sorted(f.rglob("*"))}


def test_quantizing_a_model_with_external_data_leaves_the_folders_clean(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    folder = tmp_path / "recipe"
    folder.mkdir()
    proto = onnx.load(str(tiny_onnx(tmp_path / "t.onnx")))
    onnx.save(proto, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    recipe = write_recipe(folder / "recipe.yaml", {
        "name": "ext", "model": {"source": "model.onnx", "inputs": [{"name": "x", "shape": ["batch", 4]}]},
        "data": {"calibration": {"source": "calib.npz"}, "evaluation": {"source": "calib.npz", "metric": "cosine"}},
        "passes": [{"kind": "graph-optimize"}, {"kind": "quantize", "mode": "int8-static"}],
        "accuracy": {"max_drop": 1.0}, "targets": ["host"], "backends": ["onnxruntime"],
        "benchmark": {"batch_sizes": [1], "runs": 3, "warmup": 0},
        "output": str(tmp_path / "out"), "store": str(tmp_path / "store")})
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _listing(work, folder)
    res = runner.invoke(app, ["compile", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["models"][0]["passes"][1]["status"] == "applied"
    assert _listing(work, folder) == before


def test_no_tracked_file_is_over_5_mb() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    big = [f.decode() for f in files if f and (ROOT / f.decode()).is_file()
           and (ROOT / f.decode()).stat().st_size > 5 << 20]
    assert not big, f"tracked files over 5 MB: {big}"


# ------------------------------------------------------------------ every bundled example, on this host


def _example_recipes() -> list[Path]:
    return sorted(EXAMPLES.glob("*/*.yaml"))


def test_every_example_targets_the_host() -> None:
    for path in _example_recipes():
        assert "host" in yaml.safe_load(path.read_text())["targets"], path


def _example_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


@pytest.mark.parametrize("recipe", _example_recipes(), ids=_example_id)
def test_every_example_recipe_loads_and_resolves_on_this_host(recipe: Path) -> None:
    """Each bundled example parses strictly, names code that exists, and its 'host' target resolves here
    (the compile a user runs is below, end to end, for the examples cheap enough to run in make test)."""
    from mlopt.core.callables import load_callable
    from mlopt.recipes.load import load_recipe

    r = load_recipe(recipe)
    resolved = detect.resolve_targets(load_catalog(), r.targets)
    assert [s.name for s, asked in resolved if asked == "host"] == [HOST]
    metric = r.data.evaluation.metric
    for spec in (r.model.source, r.data.calibration.source, r.data.evaluation.source, *[metric] * (":" in metric)):
        assert callable(load_callable(spec, "example code")), spec
    res = runner.invoke(app, ["compile", str(recipe), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout)["name"] == r.name


# a full compile of the transformer and ImageNet examples took 93-362 s on 2 cores (bench-compress runs them);
# these two cover a plain and a compress recipe (distillation, pruning, int8) end to end
COMPILED_EXAMPLES = ("digits/recipe", "digits/compress")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [p for p in _example_recipes() if _example_id(p) in COMPILED_EXAMPLES],
                         ids=_example_id)
def test_example_recipe_exits_0_on_this_host(recipe: Path, tmp_path: Path) -> None:
    """A bundled example as a new user runs it (host only, smaller benchmark plan), with figures for the host SKU."""
    out = subprocess.run([sys.executable, "-m", "mlopt.cli", "compile", str(recipe), "--target", "host",
                          "--runs", "5", "--warmup", "1", "--batch-sizes", "1",
                          "--store", str(tmp_path / "store"),
                          "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads(out.stdout)
    host = next(e for e in manifest["entries"] if e.get("requested_as") == "host")
    assert host["sku"] == HOST and host["measurement"]["batches"][0]["p50_ms"] > 0
    assert all(p["status"] in ("applied", "skipped") for m in manifest["models"] for p in m["passes"])
