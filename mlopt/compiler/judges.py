"""Judges for candidate models: a pass's candidate ONNX file timed and scored on each CPU backend that
would ship it here, so a search compares (candidate, backend) pairs as the builds will run them.

ONNX Runtime and OpenVINO both read a QDQ ONNX file as it is and run it in int8, so a candidate is
judged on them without a build; TVM is not a judge (it lowers QDQ to float arithmetic, and compiling
each candidate would take minutes).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from mlopt.compiler.feeds import onnx_runner
from mlopt.compiler.measure import interleaved, time_runner
from mlopt.compiler.run import Reference, Run, evaluate, geomean
from mlopt.passes import Figures, Judge
from mlopt.runtime import Runner
from mlopt.targets import detect
from mlopt.targets.backends import get_backend
from mlopt.targets.catalog import load_catalog

REFERENCE_JUDGE = "onnxruntime"  # always here: the judge when no target's CPU backend runs on this machine


def _openvino(path: Path, threads: int) -> Runner:
    from mlopt.runtime.openvino import onnx_file
    from mlopt.targets.openvino import compile_config

    return onnx_file(path, "CPU", compile_config("CPU", "float32", threads))


# backend -> a runner of an ONNX file as that backend's CPU build runs it (all graph optimizations)
RUNNERS: dict[str, Callable[[Path, int], Runner]] = {
    "onnxruntime": lambda path, threads: onnx_runner(path, threads, optimize=True),
    "openvino": _openvino,
}


def judge_backends(run: Run) -> list[str]:
    """The backends candidates are judged on: each judging backend (``RUNNERS``) that a target of the
    recipe allows on a SKU this machine runs, and that can run here; ONNX Runtime first, and alone
    when there is none (GPU-only targets)."""
    found: list[str] = []
    for sku, _ in detect.resolve_targets(load_catalog(run.recipe.catalog), run.recipe.targets):
        if not detect.host_runs(sku)[0]:
            continue
        allowed = run.recipe.backends_for(sku.name, sku.kind)
        found += [b for b in sku.backends if b in RUNNERS and (allowed is None or b in allowed)
                  and b not in found and get_backend(b).availability(sku, True).run]
    return sorted(found, key=lambda b: b != REFERENCE_JUDGE) or [REFERENCE_JUDGE]


def judge_versions(names: list[str]) -> dict[str, dict[str, str]]:
    """What the judges' figures depend on besides the model: each backend's toolchain (part of a pass's key)."""
    return {n: get_backend(n).toolchain() for n in names}


def judges(run: Run, reference: Reference, names: list[str]) -> dict[str, Judge]:
    """A ``Judge`` per backend name: the recipe's metric on the evaluation data and the quick latency,
    from one compiled runner."""
    return {name: _judge(run, reference, name) for name in names}


def _judge(run: Run, reference: Reference, name: str) -> Judge:
    def judge(path: Path) -> Figures:
        runner = judged_runner(name, path, run.recipe.benchmark.threads)
        return Figures(accuracy=evaluate(run, runner, reference), latency_ms=quick_latency(run, runner))

    return judge


def judged_runner(name: str, path: Path, threads: int) -> Runner:
    """``path`` on backend ``name`` as a judge runs it."""
    return RUNNERS[name](path, threads)


def quick_latency(run: Run, runner: Runner) -> float:
    """ms: geometric mean over the plan's batch sizes of the median of a few runs."""
    plan = run.recipe.benchmark
    quick = plan.model_copy(update={"warmup": 2, "runs": 7})
    return geomean([statistics.median(time_runner(runner, run.sample_feed(b), quick)) for b in run.batch_sizes])


def paired_latency(run: Run, before: Runner, after: Runner) -> tuple[float, float]:
    """ms of a pass's input and output, timed against each other: blocks of calls taking turns (A/B, then
    B/A), so load on the machine slows both alike; per build, the geometric mean over the plan's batch sizes
    of the median block. Separate quick medians flipped a chain's verdict under load (an int8 step timed
    1.3x faster by the search and 0.78x slower by the gate a minute later)."""
    feeds = {b: run.sample_feed(b) for b in run.batch_sizes}
    rounds = interleaved({"before": before, "after": after}, feeds, run.recipe.benchmark)
    per = {n: geomean([statistics.median(r[n] for r in rounds[b]) for b in sorted(rounds)]) for n in ("before", "after")}
    return per["before"], per["after"]
