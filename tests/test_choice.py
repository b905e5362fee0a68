"""The per-SKU choice that noise cannot flip: a noisy or close pair is re-measured interleaved (A/B blocks)
before the choice; a clear winner is not; a tie says so and goes to the SKU's backend order."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from conftest import FAST_BENCH, HOST, tiny_onnx, write_recipe
from mlopt.cli import app
from mlopt.compiler import builds, measure
from mlopt.core.errors import BackendUnavailable
from mlopt.manifest import SCHEMA_FILE, Candidate
from mlopt.recipes.schema import Benchmark

HOST_RECORD = {"machine": "x86_64", "cpu": "test", "cores": 2, "x86_level": "x86-64-v3", "features": [],
               "os": "linux", "python": "3.11"}


def _cand(backend: str, p50s: list[float], spread: float = 0.02) -> Candidate:
    batches = [{"batch_size": b, "runs": 20, "p50_ms": p, "p90_ms": p, "p99_ms": p, "mean_ms": p, "min_ms": p,
                "throughput_per_s": b * 1000 / p, "spread": spread, "noisy": spread > measure.NOISY_SPREAD}
               for b, p in zip((1, 8), p50s)]
    m = {"provenance": {"host": HOST_RECORD, "libraries": {}, "measured_at": "now", "threads": 2},
         "batches": batches, "peak_memory_bytes": None, "memory_method": None,
         "noisy": spread > measure.NOISY_SPREAD, "accuracy": None}
    return Candidate.model_validate({"backend": backend, "status": "built", "measurement": m})


def _rounds(a_ms: float, b_ms: float, n: int = 8, a: str = "onnxruntime", b: str = "openvino") -> dict:
    return {bs: [{a: a_ms * bs, b: b_ms * bs} for _ in range(n)] for bs in (1, 8)}


class Spy:
    def __init__(self, rounds: dict):
        self.rounds, self.calls = rounds, []

    def __call__(self, a: Candidate, b: Candidate) -> dict:
        self.calls.append((a.backend, b.backend))
        return self.rounds


def test_a_clear_winner_is_chosen_without_a_re_measure() -> None:
    spy = Spy({})
    chosen, how, choice = builds.choose([_cand("onnxruntime", [10, 80]), _cand("openvino", [15, 120])], spy)
    assert spy.calls == [] and chosen.backend == "onnxruntime" and how == builds.FASTEST
    assert choice.method == "fastest" and choice.runner_up == "openvino" and choice.ratio == pytest.approx(1.5)
    assert not choice.tie and choice.confidence is None


def test_a_noisy_close_pair_is_re_measured_interleaved_and_that_decides() -> None:
    """The first figures put ONNX Runtime ahead (noisy); the interleaved rounds show OpenVINO 1.25x faster."""
    spy = Spy(_rounds(a_ms=12.5, b_ms=10.0))
    cands = [_cand("onnxruntime", [10, 80], spread=0.3), _cand("openvino", [10.5, 84])]
    chosen, how, choice = builds.choose(cands, spy)
    assert spy.calls == [("onnxruntime", "openvino")]
    assert chosen.backend == "openvino" and "interleaved" in how
    assert choice.method == "interleaved" and choice.ratio == pytest.approx(1.25) and choice.confidence == 1.0
    assert not choice.tie and choice.rounds == 16 and "onnxruntime timings noisy" in choice.reason


def test_a_re_measure_that_cannot_load_a_build_falls_back_to_the_first_figures_and_says_so() -> None:
    def broken(a: Candidate, b: Candidate) -> dict:
        raise BackendUnavailable("openvino: runtime missing")

    chosen, how, choice = builds.choose([_cand("onnxruntime", [10, 80], 0.3), _cand("openvino", [10.5, 84])], broken)
    assert chosen.backend == "onnxruntime" and how == builds.FASTEST and choice.method == "fastest"
    assert "re-measure failed (openvino: runtime missing)" in choice.reason


def test_two_quiet_builds_within_their_noise_band_are_re_measured() -> None:
    spy = Spy(_rounds(a_ms=10.0, b_ms=11.0))
    _, _, choice = builds.choose([_cand("onnxruntime", [10, 80], 0.08), _cand("openvino", [10.4, 83], 0.08)], spy)
    assert spy.calls and choice.method == "interleaved" and "noise band" in choice.reason


def test_a_tie_says_so_and_goes_to_the_first_in_the_backend_order() -> None:
    """openvino is 1% faster in the rounds: a tie, so the SKU's first backend (onnxruntime) is kept."""
    spy = Spy(_rounds(a_ms=9.9, b_ms=10.0, a="openvino", b="onnxruntime"))
    cands = [_cand("onnxruntime", [10.2, 81], 0.2), _cand("openvino", [10, 80], 0.2)]
    chosen, how, choice = builds.choose(cands, spy)
    assert spy.calls == [("openvino", "onnxruntime")]
    assert chosen.backend == "onnxruntime" and choice.tie and "tie" in how
    assert choice.ratio < 1 and choice.runner_up == "openvino"


def test_a_split_verdict_is_a_tie() -> None:
    """Each build wins half the rounds: whatever the medians say, the confidence is a coin flip."""
    rounds = {bs: [{"onnxruntime": 10.0, "openvino": 13.0 if i % 2 else 9.5} for i in range(8)] for bs in (1, 8)}
    _, _, choice = builds.choose([_cand("onnxruntime", [10, 80], 0.3), _cand("openvino", [10.1, 81])], Spy(rounds))
    assert choice.tie and choice.confidence == 0.5


def test_interleaved_rounds_alternate_the_order_and_time_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake runners on a fake clock: A takes 10 ms a call, B 12 ms; rounds alternate A/B and B/A."""
    monkeypatch.setattr(measure.hostlock, "timing", contextlib.nullcontext)  # no wait for other timed loops here
    clock, order = [0.0], []

    def runner(name: str, ms: float):
        def run(feed: object) -> None:
            order.append(name)
            clock[0] += ms / 1000

        return run

    plan = Benchmark(warmup=0, max_seconds=1.0)
    rounds = measure.interleaved({"a": runner("a", 10), "b": runner("b", 12)}, {1: None, 8: None}, plan,
                                 clock=lambda: clock[0], pause=lambda s: None)
    assert sorted(rounds) == [1, 8] and len(rounds[1]) >= measure.INTERLEAVE_MIN_ROUNDS
    assert all(r == {"a": pytest.approx(10), "b": pytest.approx(12)} for rs in rounds.values() for r in rs)
    timed = order[2:]  # after one untimed call each
    block = measure.INTERLEAVE_BLOCK
    assert timed[:block] == ["a"] * block and timed[block:3 * block] == ["b"] * 2 * block  # A, B | B, A


def test_compile_records_the_interleaved_choice_and_replays_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real ONNX Runtime and OpenVINO builds, their first figures declared doubtful: the compile re-measures
    them interleaved, records the choice in the manifest (schema 1.5), and a cached rebuild replays it."""
    monkeypatch.setattr(builds, "_doubt", lambda a, b, ratio: "forced by the test")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "schema_version": 1, "name": "tiny", "targets": [HOST], "backends": ["onnxruntime", "openvino"],
        "model": {"source": str(tiny_onnx(tmp_path / "m.onnx")),
                  "inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}]},
        "benchmark": FAST_BENCH, "output": str(tmp_path / "out"), "store": str(tmp_path / "store")})
    res = CliRunner().invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
    assert data["schema_version"] == "1.6"
    entry = data["entries"][0]
    choice = entry["choice"]
    assert choice["method"] == "interleaved" and choice["reason"] == "forced by the test"
    assert choice["rounds"] >= 2 * measure.INTERLEAVE_MIN_ROUNDS and 0.5 <= choice["confidence"] <= 1
    assert {entry["chosen_backend"], choice["runner_up"]} == {"onnxruntime", "openvino"}

    def no_timing(*a: object, **k: object) -> None:
        raise AssertionError("a cached rebuild timed the builds again")

    monkeypatch.setattr(builds, "interleaved", no_timing)
    res = CliRunner().invoke(app, ["compile", str(recipe)])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"][0]
    assert again["choice"] == choice and again["chosen_backend"] == entry["chosen_backend"]
