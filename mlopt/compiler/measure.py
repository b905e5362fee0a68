"""Measurement: latency percentiles and throughput per batch size, peak memory, with provenance."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

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
    """Load a build (tracking peak memory), then time it at each batch size of ``feeds``."""
    base = _reset_peak()
    runner = load()
    runner(feeds[max(feeds)])
    peak = _peak_rss()
    batches = [latency_stats(time_runner(runner, feeds[b], plan), b) for b in sorted(feeds)]
    return {
        "batches": batches,
        "peak_memory_bytes": max(0, peak - base) if peak and base is not None else None,
        "memory_method": "VmHWM growth over load + one largest-batch run (Linux /proc)" if peak else None,
        "threads": plan.threads,
        "warmup": plan.warmup,
        "noisy": any(b["noisy"] for b in batches),
    }


def _reset_peak() -> int | None:
    """Reset the kernel's peak-RSS mark for this process; return the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS") * 1024


def _peak_rss() -> int | None:
    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, ValueError):
        return None


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(field)
