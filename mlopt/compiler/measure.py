"""Measurement: latency percentiles and throughput per batch size, peak memory, with provenance."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlopt.core import hostlock
from mlopt.recipes.schema import Benchmark

NOISY_SPREAD = 0.10  # relative IQR above which a latency series is flagged as noisy


def latency_stats(samples_ms: list[float], batch: int) -> dict[str, Any]:
    """Percentiles, throughput and a spread figure (IQR / median) of one series of timings."""
    a = np.asarray(samples_ms)
    p25, p50, p75, p90, p99 = (float(x) for x in np.percentile(a, [25, 50, 75, 90, 99]))
    spread = (p75 - p25) / p50 if p50 > 0 else 0.0
    return {
        "batch_size": batch,
        "runs": len(a),
        "p50_ms": round(p50, 4),
        "p90_ms": round(p90, 4),
        "p99_ms": round(p99, 4),
        "mean_ms": round(float(a.mean()), 4),
        "min_ms": round(float(a.min()), 4),
        "throughput_per_s": round(batch * 1000.0 / p50, 3) if p50 > 0 else None,
        "spread": round(spread, 4),
        "noisy": bool(spread > NOISY_SPREAD),
    }


def time_runner(run: Callable[[Any], Any], feed: Any, plan: Benchmark) -> list[float]:
    """Warm up, then time up to ``plan.runs`` calls within ``plan.max_seconds`` (at least 3 runs)."""
    for _ in range(plan.warmup):
        run(feed)
    samples: list[float] = []
    deadline = time.perf_counter() + plan.max_seconds
    while len(samples) < plan.runs and (len(samples) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        run(feed)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def measure(load: Callable[[], Callable[[Any], Any]], feeds: dict[int, Any], plan: Benchmark) -> dict[str, Any]:
    """Load a build, then time it at each batch size of ``feeds``."""
    runner = load()
    runner(feeds[max(feeds)])
    with hostlock.timing():  # no other matrix build or timed loop runs here meanwhile
        batches = [latency_stats(time_runner(runner, feeds[b], plan), b) for b in sorted(feeds)]
    return {"batches": batches, "threads": plan.threads, "warmup": plan.warmup,
            "noisy": any(b["noisy"] for b in batches)}


MEMORY_METHOD = ("a fresh process: peak RSS (VmHWM) over loading the build and one run at the largest batch "
                 "size, minus its RSS after importing the runtime library")
MEMORY_PROBE_TIMEOUT_S = 600
MEMORY_PROBE = """
import importlib, json, sys
from pathlib import Path
import numpy as np
from mlopt.targets.backends import get_backend

def kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

a = json.loads(sys.argv[1])
backend = get_backend(a["backend"])
for module in a["modules"]:
    try:
        importlib.import_module(module)
    except ImportError:
        pass
feed = dict(np.load(a["feed"]))
base = kb("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
backend.load(Path(a["artifact"]), a["meta"], a["threads"])(feed)
print(json.dumps({"base": base, "peak": kb("VmHWM")}))
"""


def peak_memory(backend: str, modules: list[str], artifact: Path, meta: dict[str, Any], threads: int,
                feed: dict[str, Any]) -> tuple[int | None, str | None]:
    """Memory a build needs to load and run, measured in a fresh process (this one's heap is warm
    from ingest and validation, so growth measured here understates it); (None, None) off Linux."""
    import json
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "feed.npz", **feed)
        args = {"backend": backend, "modules": modules, "artifact": str(artifact), "meta": meta,
                "threads": threads, "feed": str(Path(tmp) / "feed.npz")}
        try:
            res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(args)], capture_output=True,
                                 text=True, timeout=MEMORY_PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"not measured: the memory probe took over {MEMORY_PROBE_TIMEOUT_S} s"
    if res.returncode != 0:  # killed (OOM), or /proc not writable: the figure is absent, the build stands
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        return None, f"not measured: the memory probe failed ({last[:200]})"
    got = json.loads(res.stdout.strip().splitlines()[-1])
    return max(0, got["peak"] - got["base"]), MEMORY_METHOD


# ------------------------------------------------------------------ interleaved A/B re-measure

INTERLEAVE_ROUNDS = 8  # A/B block pairs per batch size (at least MIN_ROUNDS within the plan's time)
INTERLEAVE_MIN_ROUNDS = 4
INTERLEAVE_BLOCK = 3  # calls per block
INTERLEAVE_PAUSE_S = 0.02  # between blocks, so one runtime's spinning threads do not slow the next


def interleaved(runners: dict[str, Callable[[Any], Any]], feeds: dict[int, Any], plan: Benchmark,
                clock: Callable[[], float] = time.perf_counter,
                pause: Callable[[float], None] = time.sleep) -> dict[int, list[dict[str, float]]]:
    """Per batch size, one record per round: each build's median ms over a block of calls, the builds
    taking turns (A/B, then B/A the next round, so a drift of the machine favours neither)."""
    names = list(runners)
    for r in runners.values():
        r(feeds[max(feeds)])
    out: dict[int, list[dict[str, float]]] = {}
    with hostlock.timing():
        for b in sorted(feeds):
            out[b] = _rounds(runners, names, feeds[b], plan, clock, pause)
    return out


def _rounds(runners: dict[str, Callable[[Any], Any]], names: list[str], feed: Any, plan: Benchmark,
            clock: Callable[[], float], pause: Callable[[float], None]) -> list[dict[str, float]]:
    for r in runners.values():
        for _ in range(min(plan.warmup, 2)):
            r(feed)
    rounds: list[dict[str, float]] = []
    deadline = clock() + 2 * plan.max_seconds
    while len(rounds) < INTERLEAVE_ROUNDS and (len(rounds) < INTERLEAVE_MIN_ROUNDS or clock() < deadline):
        order = names if len(rounds) % 2 == 0 else names[::-1]
        rounds.append({n: _block(runners[n], feed, clock, pause) for n in order})
    return rounds


def _block(run: Callable[[Any], Any], feed: Any, clock: Callable[[], float], pause: Callable[[float], None]) -> float:
    pause(INTERLEAVE_PAUSE_S)
    samples = []
    for _ in range(INTERLEAVE_BLOCK):
        t0 = clock()
        run(feed)
        samples.append((clock() - t0) * 1000.0)
    return float(np.median(samples))
