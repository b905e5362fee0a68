"""The plan's simulator against the image's real server (bench/plan_vs_server.py at a small scale):
the digits build on the host SKU, served by its entry point on loopback, one open-loop Poisson rate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mlopt.package.serving import Deployable
from test_serving import cpu, with_backend  # noqa: F401  (cpu: the module fixture)

ROOT = Path(__file__).resolve().parents[1]
FACTOR = 3.0
BATCH_TOLERANCE = 0.5


def _harness():
    spec = importlib.util.spec_from_file_location("plan_vs_server", ROOT / "bench" / "plan_vs_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_vs_server"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_server_latency_matches_the_simulation(cpu: Deployable, tmp_path: Path) -> None:  # noqa: F811
    """At 20% of one replica's capacity (600 batch-1 requests, about 3 s), the server's measured p99
    is within a factor of FACTOR = 3 of the simulated p99 with the server's own measured overhead
    distribution added (HTTP, the protocol and the event loop; sampled at one client just before,
    on the same machine), and its mean batch within 50% of the simulated one.

    Why 3: digits runs in ~0.1 ms, so its latency is mostly that overhead, whose tail on a shared
    2-core machine (the load generator runs on the same cores) moves p99 by 2x from run to run; the
    mean batch is held closer (a loaded machine lets the event loop fall behind, which merges a few
    more requests than the simulation: +20% was seen); 20% of capacity keeps the event loop clear. It can fail: the same run
    against a server whose queue delay is 20 ms instead of the planned one (the simulator keeps the
    plan's) merges requests up to the maximum batch (caught by the mean batch on any machine) and
    answers them 20 ms later (its p99 ratio also leaves the factor of 3 where the machine is quiet)."""
    pvs = _harness()
    d = with_backend(cpu, "onnxruntime")
    options = pvs.planned_options(d, 2.0)
    setting = pvs.Setting(requests=600, seconds=3.0, overhead_requests=200)
    planned = pvs.run_model(d, options, [0.2], setting, tmp_path / "planned")
    row = planned["rows"][0]
    assert planned["batching"]["max_batch_size"] > 1 and row["requests"] > 500
    assert pvs.disagreements(row, FACTOR, BATCH_TOLERANCE) == [], row
    assert row["simulated_mean_batch"] > 1.0  # requests are merged at this rate, on both sides

    changed = pvs.run_model(d, options, [0.2], setting, tmp_path / "changed", server_batching={"queue_delay_us": 20000},
                            reference=planned)
    bad = changed["rows"][0]
    found = pvs.disagreements(bad, FACTOR, BATCH_TOLERANCE)
    assert any("mean batch" in f for f in found), bad  # the server merged far more than the plan's batcher
    assert bad["ratio_p99_with_overhead_dist"] > row["ratio_p99_with_overhead_dist"], (row, bad)
