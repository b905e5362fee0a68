"""CI: gates against a baseline manifest, `mlopt diff`, reproducible builds, the store as a CI cache,
and the example CI workflows (validated offline)."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ARM, EXAMPLES, HOST, ROOT, tiny_onnx
from mlopt.cli import app
from mlopt.gates import compare, judge_latency
from mlopt.manifest import MANIFEST_SCHEMA_VERSION, BatchFigures, GateLimits, Manifest

runner = CliRunner()
LIMITS = GateLimits(latency_regression=0.10, throughput_drop=None, accuracy_drop=0.01, size_growth=0.10, noise_k=1.0,
                    strict=False)
X86 = HOST  # the entry measured here


def _real(build: dict) -> dict:
    assert build["result"].exit_code == 0, build["result"].output
    return json.loads((build["out"] / "manifest.json").read_text())


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _scale(data: dict, factor: float, sku: str = X86) -> dict:
    """A copy whose chosen build at ``sku`` has every latency figure times ``factor``."""
    data = copy.deepcopy(data)
    entry = next(e for e in data["entries"] if e["sku"] == sku)
    for b in entry["measurement"]["batches"]:
        for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms"):
            b[k] *= factor
        b["throughput_per_s"] /= factor
        b["spread"] = 0.02
    return data


def _checks(report, sku: str = X86, gate: str | None = None) -> list:
    s = next(s for s in report.skus if s.sku == sku)
    return [c for c in s.checks if gate is None or c.gate == gate]


def _fig(p50: float, spread: float = 0.02, min_ms: float | None = None) -> BatchFigures:
    m = min_ms if min_ms is not None else p50 * 0.95
    return BatchFigures(batch_size=1, runs=50, p50_ms=p50, p90_ms=p50 * 1.1, p99_ms=p50 * 1.2, mean_ms=p50,
                        min_ms=m, throughput_per_s=1000 / p50, spread=spread, noisy=spread > 0.1)


# ------------------------------------------------------------------ the latency rule


@pytest.mark.parametrize("old, new, verdict", [
    (_fig(1.0), _fig(1.05), "pass"),                      # inside the limit
    (_fig(1.0), _fig(0.7), "pass"),                       # a speed-up
    (_fig(1.0), _fig(1.5), "fail"),                       # a clear regression on a quiet machine
    (_fig(1.0, 0.2), _fig(1.2, 0.2), "inconclusive"),     # over the limit, inside the noise band (28%)
    (_fig(1.0, 0.2), _fig(1.6, 0.2), "fail"),             # over the limit and outside the band
    (_fig(1.0, min_ms=0.9), _fig(1.3, min_ms=0.92), "inconclusive"),  # p50 grew, the fastest run did not
])
def test_latency_rule(old: BatchFigures, new: BatchFigures, verdict: str) -> None:
    j = judge_latency(old, new, 0.10, 1.0)
    assert j.verdict == verdict, j
    assert j.reason or verdict != "inconclusive"


def test_noise_band_combines_both_runs() -> None:
    j = judge_latency(_fig(1.0, 0.2), _fig(1.2, 0.2), 0.10, 1.0)
    assert j.noise == pytest.approx((0.2 ** 2 + 0.2 ** 2) ** 0.5)
    assert judge_latency(_fig(1.0, 0.2), _fig(1.2, 0.2), 0.10, 0.0).verdict == "fail"  # k=0: no band


# ------------------------------------------------------------------ gates on real and edited manifests


def test_identical_manifests_pass_and_cross_builds_are_not_measured(digits_build: dict) -> None:
    m = Manifest.model_validate(_real(digits_build))
    report = compare(m, m, LIMITS, "same")
    assert report.verdict == "pass" and not report.failures and not report.warnings
    assert {c.verdict for c in _checks(report, X86)} == {"pass"}
    assert {c.gate for c in _checks(report, X86)} == {"latency", "accuracy", "size"}
    arm = {c.gate: c for c in _checks(report, ARM)}
    assert arm["latency"].verdict == arm["accuracy"].verdict == "not-measured"
    assert "cross-compiled" in arm["latency"].reason and arm["size"].verdict == "pass"


def test_strict_turns_noise_into_failure_but_never_different_hosts(digits_build: dict) -> None:
    data = _real(digits_build)
    old, new = _scale(data, 1.0), _scale(data, 1.2)
    for e in (old, new):
        for b in e["entries"][0]["measurement"]["batches"]:
            b["spread"] = 0.3
    a, b = Manifest.model_validate(old), Manifest.model_validate(new)
    assert {c.verdict for c in _checks(compare(a, b, LIMITS, "x"), gate="latency")} == {"inconclusive"}
    strict = LIMITS.model_copy(update={"strict": True})
    assert compare(a, b, strict, "x").verdict == "fail"
    new["entries"][0]["measurement"]["provenance"]["host"]["cpu"] = "Some Other CPU"
    other = compare(a, Manifest.model_validate(new), strict, "x")
    assert other.verdict == "warn"
    assert all(c.reason.startswith("different hosts") for c in _checks(other, gate="latency"))


def test_different_hosts_are_inconclusive(digits_build: dict) -> None:
    data = _scale(_real(digits_build), 1.0)
    new = _scale(data, 5.0)
    new["entries"][0]["measurement"]["provenance"]["threads"] = 8
    report = compare(Manifest.model_validate(data), Manifest.model_validate(new), LIMITS, "x")
    lat = _checks(report, gate="latency")
    assert lat and {c.verdict for c in lat} == {"inconclusive"} and "8 threads" in lat[0].reason
    assert report.verdict == "warn" and any("different hosts" in w for w in report.warnings)


def test_accuracy_size_and_throughput_gates(digits_build: dict) -> None:
    data = _real(digits_build)
    new = copy.deepcopy(data)
    entry = new["entries"][0]
    entry["measurement"]["accuracy"]["value"] -= 0.05
    entry["artifact"]["size_bytes"] = int(entry["artifact"]["size_bytes"] * 1.5)
    limits = LIMITS.model_copy(update={"throughput_drop": 0.2})
    report = compare(Manifest.model_validate(data), Manifest.model_validate(new), limits, "x")
    verdicts = {c.gate: c.verdict for c in _checks(report)}
    assert verdicts == {"latency": "pass", "throughput": "pass", "accuracy": "fail", "size": "fail"}
    assert report.verdict == "fail" and len(report.failures) == 2
    assert any("accuracy" in f and "budget 0.01" in f for f in report.failures)
    quiet = Manifest.model_validate(_scale(data, 1.0))
    slow = compare(quiet, Manifest.model_validate(_scale(data, 2.0)), limits, "x")
    assert {c.verdict for c in _checks(slow, gate="throughput")} == {"fail"}


def test_missing_figures_added_removed_and_nonreproducible(digits_build: dict) -> None:
    data = _real(digits_build)
    data["entries"] = [e for e in data["entries"] if e["sku"] in (X86, ARM)]  # the host's and a cross one
    old = copy.deepcopy(data)
    old["entries"][0]["measurement"] = None
    old["entries"] = old["entries"][:1]
    new = copy.deepcopy(data)
    arm = new["entries"][1]
    arm["candidates"][0]["artifact"]["content_digest"] = "0" * 64
    removed = copy.deepcopy(new["entries"][0])
    removed["sku"] = "cpu-gone"
    old["entries"].append(removed)
    old["entries"].append(copy.deepcopy(data["entries"][1]))
    report = compare(Manifest.model_validate(old), Manifest.model_validate(new), LIMITS, "x")
    assert {c.gate: c.verdict for c in _checks(report)}["latency"] == "not-measured"
    assert "the baseline has no figures" in _checks(report, gate="latency")[0].reason
    presence = {s.sku: s.presence for s in report.skus}
    assert presence == {X86: "both", ARM: "both", "cpu-gone": "removed"}
    assert report.verdict == "warn" and not report.failures
    assert any("non-reproducible" in w and ARM in w for w in report.warnings)


def test_older_manifest_versions_are_baselines(digits_build: dict, tmp_path: Path) -> None:
    data = _real(digits_build)
    data.pop("gates")
    data["schema_version"] = "1.1"
    res = runner.invoke(app, ["diff", str(_write(tmp_path / "old.json", data)),
                              str(digits_build["out"] / "manifest.json"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verdict"] == "pass"


# ------------------------------------------------------------------ mlopt compile --baseline


def _compile(build: dict, tmp: Path, *flags: str):
    return runner.invoke(app, ["compile", str(build["recipe"]), "--out", str(tmp / "out"), *flags])


def test_compile_regression_fails_with_exit_6_and_writes_the_manifest(digits_build: dict, tmp_path: Path) -> None:
    fast = _write(tmp_path / "baseline.json", _scale(_real(digits_build), 0.1))  # the baseline 10x faster
    res = _compile(digits_build, tmp_path, "--baseline", str(fast))
    assert res.exit_code == 6, res.output
    assert "gates against" in res.stdout and "FAIL" in res.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["schema_version"] == MANIFEST_SCHEMA_VERSION and m["status"] == "failed"
    assert m["gates"]["verdict"] == "fail" and m["gates"]["baseline"] == str(fast)
    assert any(e.startswith(f"gate {X86}: latency p50 b1") for e in m["errors"])


def test_compile_unchanged_passes_and_recipe_gates_apply(digits_build: dict, tmp_path: Path) -> None:
    base = digits_build["out"] / "manifest.json"
    assert _compile(digits_build, tmp_path, "--baseline", f"file://{base}").exit_code == 0
    data = yaml.safe_load(digits_build["recipe"].read_text())
    data["gates"] = {"baseline": str(_write(tmp_path / "b.json", _scale(_real(digits_build), 0.1))),
                     "latency_regression": 100.0}  # a limit no 10x regression breaks
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["compile", str(recipe), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["gates"]["limits"]["latency_regression"] == 100


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("{not json", "is not JSON"), ('{"schema_version": "1.2"}', "does not match schema"),
])
def test_bad_baseline_is_exit_2(digits_build: dict, tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    res = _compile(digits_build, tmp_path, "--baseline", str(path))
    assert res.exit_code == 2 and message in res.output and "baseline" in res.output


def test_unreachable_baseline_url_is_exit_2(digits_build: dict, tmp_path: Path) -> None:
    res = _compile(digits_build, tmp_path, "--baseline", "http://127.0.0.1:9/manifest.json")
    assert res.exit_code == 2 and "cannot be read" in res.output


def test_gate_flags_map_onto_the_recipe(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    res = runner.invoke(app, ["compile", str(model), "--dry-run", "--baseline", "b.json", "--gate-latency", "0.2",
                              "--gate-size", "0.5", "--gate-accuracy", "0.02", "--gate-throughput", "0.3",
                              "--gate-noise-k", "2", "--strict-gates"])
    assert res.exit_code == 0, res.output
    gates = yaml.safe_load(res.stdout)["gates"]
    assert gates == {"baseline": str(Path("b.json").resolve()), "latency_regression": 0.2, "throughput_drop": 0.3,
                     "accuracy_drop": 0.02, "size_growth": 0.5, "noise_k": 2.0, "strict": True}
    bad = runner.invoke(app, ["compile", str(model), "--dry-run", "--gate-latency", "-1"])
    assert bad.exit_code == 2 and "gates.latency_regression" in bad.output


# ------------------------------------------------------------------ mlopt diff


def test_diff_json_markdown_and_fail_on_gates(digits_build: dict, tmp_path: Path) -> None:
    new = digits_build["out"] / "manifest.json"
    old = _write(tmp_path / "old.json", _scale(_real(digits_build), 0.1))
    res = runner.invoke(app, ["diff", str(old), str(new), "--json"])
    assert res.exit_code == 0, res.output  # informational
    d = json.loads(res.stdout)
    assert d["format"] == "mlopt-diff/1" and d["verdict"] == "fail"
    assert set(d) == {"format", "old", "new", "toolchain", "limits", "verdict", "failures", "warnings", "skus"}
    x86 = d["skus"][0]
    assert x86["sku"] == X86 and x86["backend"]["old"] == x86["backend"]["new"] and not x86["digest_changed"]
    assert {c["gate"]: c["verdict"] for c in x86["checks"]}["latency"] == "fail"
    md = runner.invoke(app, ["diff", str(old), str(new), "--markdown"]).stdout
    assert md.startswith("### mlopt: gates ❌ fail") and f"| {X86} |" in md and "**Failed gates**" in md
    assert md.count("\n|") == 2 + len(d["skus"])
    table = runner.invoke(app, ["diff", str(old), str(new)])
    assert table.exit_code == 0 and "gate failed:" in table.stdout
    strict = runner.invoke(app, ["diff", str(old), str(new), "--fail-on-gates"])
    assert strict.exit_code == 6 and "gate(s) failed" in strict.output
    loose = runner.invoke(app, ["diff", str(old), str(new), "--fail-on-gates", "--gate-latency", "100"])
    assert loose.exit_code == 0, loose.output


# ------------------------------------------------------------------ reproducibility and the CI cache


def _tiny_compile(model: Path, tmp: Path, name: str, *extra: str) -> dict:
    res = runner.invoke(app, ["compile", str(model), "--json", "--runs", "3", "--batch-sizes", "1",
                              "--store", str(tmp / f"store-{name}"), "--out", str(tmp / f"out-{name}"), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _digests(m: dict) -> dict:
    return {(e["sku"], c["backend"]): (c["artifact"]["key"], c["artifact"]["content_digest"])
            for e in m["entries"] for c in e["candidates"] if c["artifact"]}


def test_same_inputs_give_the_same_artifacts_in_fresh_stores(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    flags = ("--target", f"{X86},{ARM}", "--backend", "onnxruntime,tvm")
    a, b = (_tiny_compile(model, tmp_path, n, *flags) for n in "ab")
    assert set(_digests(a)) == {(X86, "onnxruntime"), (X86, "tvm"), (ARM, "onnxruntime"), (ARM, "tvm")}
    assert _digests(a) == _digests(b)


def test_another_toolchain_is_another_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlopt.store import Store
    from mlopt.targets.ort import OrtBackend

    model = tiny_onnx(tmp_path / "m.onnx")
    flags = ("--target", X86, "--backend", "onnxruntime")
    first = _tiny_compile(model, tmp_path, "s", *flags)
    monkeypatch.setattr(OrtBackend, "toolchain", lambda self: {"onnxruntime": "99.0.0"})
    second = _tiny_compile(model, tmp_path, "s", *flags)
    [(k1, _)], [(k2, _)] = _digests(first).values(), _digests(second).values()
    assert k1 != k2 and not second["entries"][0]["candidates"][0]["cached"]
    assert Store(tmp_path / "store-s").get(k2).meta["toolchain"] == {"onnxruntime": "99.0.0"}


def test_restored_store_serves_an_unchanged_model(digits_build: dict, tmp_path: Path) -> None:
    """CI restores the store folder from its cache, at another path: every build replays from it."""
    restored = tmp_path / "restored-store"
    shutil.copytree(digits_build["store"], restored)
    t0 = time.perf_counter()
    res = runner.invoke(app, ["compile", str(digits_build["recipe"]), "--json", "--store", str(restored),
                              "--out", str(tmp_path / "out")])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    cands = [c for e in json.loads(res.stdout)["entries"] for c in e["candidates"] if c["status"] == "built"]
    assert cands and all(c["cached"] for c in cands)
    print(f"cached rerun from a restored store: {seconds:.2f} s")
    assert seconds < 15


# ------------------------------------------------------------------ the example CI workflows


CI = EXAMPLES / "ci"
WORKFLOWS = {"github-actions.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_ci_example_is_valid_offline(name: str) -> None:
    """check-jsonschema validates against the SchemaStore schema it vendors; proxies pointing nowhere
    make any attempt to fetch fail, so this proves it runs offline."""
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "check_jsonschema", "--no-cache", "--builtin-schema", WORKFLOWS[name], str(CI / name)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _mlopt_commands(name: str) -> list[list[str]]:
    """Every `mlopt ...` command in a workflow's shell lines, as tokens (up to a shell operator)."""
    doc = yaml.safe_load((CI / name).read_text())
    scripts = [s.get("run", "") for job in doc["jobs"].values() for s in job["steps"]] if "jobs" in doc else \
        [line for job in doc.values() if isinstance(job, dict) for key in ("before_script", "script")
         for line in job.get(key, [])]
    commands = []
    for line in "\n".join(scripts).replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        for i in (i for i, t in enumerate(tokens) if t == "mlopt"):
            rest = tokens[i + 1:]
            stop = next((j for j, t in enumerate(rest) if t in {";", "||", "&&", "|", ">", ">>"} or t.endswith(";")),
                        len(rest))
            commands.append(rest[:stop])
    return commands


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_ci_example_runs_real_mlopt_commands(name: str) -> None:
    import typer.main

    cli = typer.main.get_command(app)
    commands = _mlopt_commands(name)
    assert {c[0] for c in commands} >= {"compile", "diff"}, commands
    for tokens in commands:
        cmd, args = cli, list(tokens)
        while hasattr(cmd, "commands") and args and args[0] in cmd.commands:
            cmd = cmd.commands[args.pop(0)]
        assert cmd is not cli, f"unknown mlopt command in {name}: {tokens}"
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        flags = {t.split("=")[0] for t in args if t.startswith("--")}
        assert flags <= known, f"{name}: mlopt {tokens[0]} has no {sorted(flags - known)}"
    compile_flags = {o for p in cli.commands["compile"].params for o in p.opts}
    assert "--baseline" in (CI / name).read_text() and "--baseline" in compile_flags
    doc = yaml.safe_load((CI / name).read_text())
    env = doc["jobs"]["compile"]["env"] if "jobs" in doc else doc["mlopt-compile"]["variables"]
    dry = runner.invoke(app, ["compile", str(ROOT / env["RECIPE"]), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert Path(yaml.safe_load(dry.stdout)["output"]) / "manifest.json" == ROOT / env["MANIFEST"]


def test_bad_gate_flags_on_diff_and_an_empty_matrix_are_exit_2(digits_build: dict) -> None:
    from typer.testing import CliRunner as _Runner

    from mlopt.cli import app as _app

    manifest = str(digits_build["out"] / "manifest.json")
    res = _Runner().invoke(_app, ["diff", manifest, manifest, "--gate-throughput", "1"])
    assert res.exit_code == 2 and "throughput_drop" in res.output
    res = _Runner().invoke(_app, ["build-matrix", str(digits_build["recipe"]), "--targets", ","])
    assert res.exit_code == 2 and "names no SKU" in res.output
