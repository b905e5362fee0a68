"""Benchmark of `mlopt plan` on a FIXTURE fleet: 20 models x 15 SKUs.

Every batch curve here is SYNTHETIC (FIXTURE, generated below from a per-model work figure, a
per-SKU speed and a seeded per-(model, SKU) affinity); none was measured, and each manifest's
provenance says so (tests/plan_fixtures.py). Two prices (mi210, mi250x) are fixtures too: the
catalog has none for them. Arrivals are bursty (coefficient of variation 1 to 3).

Reports: solve time; the plan's $/h against the cheapest single-SKU plan that meets every SLA (the
Mélange paper's baseline, computed with unlimited units of that SKU) and against a queueing-blind
plan (Mélange's formulation: per-replica capacity = the best throughput at a batch whose p99 is
within the SLA, no queueing, no headroom); and each plan's SLA misses in the simulation.

    python bench/plan.py [--requests 20000] [--out bench/results-plan.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import plan_fixtures as fx  # noqa: E402
from mlopt.core.errors import BadInput  # noqa: E402
from mlopt.plan.assemble import make_plan  # noqa: E402
from mlopt.plan.inputs import Fleet, Traffic  # noqa: E402
from mlopt.plan.planner import Options  # noqa: E402

# SKU -> (FIXTURE speed relative to a T4, units in the fleet, spot price factor or None, fixture price)
SKUS = {
    "cpu-x86-64-v4": (0.05, 64, 0.4, None), "cpu-x86-64-v3": (0.04, 64, 0.4, None),
    "cpu-aarch64-neoverse-v1": (0.045, 64, 0.4, None), "cpu-aarch64-neoverse-n1": (0.03, 64, None, None),
    "t4": (1.0, 48, 0.35, None), "a10g": (2.2, 32, 0.4, None), "l4": (2.0, 48, 0.4, None),
    "l40s": (4.5, 16, None, None), "a100-40gb": (7.0, 16, None, None), "a100-80gb": (8.0, 8, None, None),
    "h100": (14.0, 8, 0.5, None), "h200": (16.0, 8, None, None), "mi210": (3.5, 8, None, 1.6),
    "mi250x": (6.0, 8, None, 2.4), "mi300x": (13.0, 8, None, None),
}


def curves(rng: np.random.Generator, work_ms: float, overhead_ms: float, sku: str) -> list[tuple[int, float, float]]:
    """FIXTURE: a synthetic batch curve of a model on a SKU."""
    speed = SKUS[sku][0] * rng.uniform(0.6, 1.5)  # per-(model, SKU) affinity: no SKU is best for all
    sizes = (1, 2, 4, 8) if sku.startswith("cpu") else (1, 2, 4, 8, 16, 32, 64)
    base, per_item = overhead_ms / np.sqrt(speed), work_ms / speed
    return fx.curve(base, per_item, sizes=sizes, tail=float(rng.uniform(1.15, 1.5)))


def fixture(folder: Path, seed: int = 7) -> tuple[list[Path], Fleet, Traffic]:
    """FIXTURE manifests (one per model), the fleet and bursty traffic."""
    rng = np.random.default_rng(seed)
    manifests, traffic = [], {}
    for i in range(20):
        model = f"model-{i:02d}"
        work, overhead = float(rng.uniform(0.2, 6.0)), float(rng.uniform(1.0, 4.0))
        entries = [fx.entry(model, sku, [fx.candidate(model, sku, "fixture", "float16",
                                                      curves(rng, work, overhead, sku), accuracy=0.9)])
                   for sku in SKUS]
        manifests.append(fx.write(folder / f"{model}.json", entries))
        peak = float(rng.uniform(50, 2000))
        sla = float(max(8 * (overhead + work), rng.uniform(20, 300)))  # every model can meet it on a big GPU
        traffic[model] = {"mean_rps": peak / 2, "peak_rps": peak, "p99_sla_ms": sla,
                          "arrival_cv": float(rng.uniform(1.0, 3.0)),
                          "priority": "critical" if i % 5 == 0 else "normal"}
    fleet = {"max_spot_share": 0.3, "skus": {sku: _sku(sku) for sku in SKUS}}
    return manifests, Fleet.model_validate(fleet), Traffic.model_validate({"models": traffic})


def _sku(sku: str) -> dict:
    from mlopt.targets.catalog import load_catalog

    _, units, spot, price = SKUS[sku]
    on_demand = price or load_catalog().get(sku).price.usd_per_hour
    out = {"zones": {"zone-a": units // 2, "zone-b": units - units // 2}, "on_demand_usd_per_hour": on_demand}
    return {**out, "spot_usd_per_hour": round(on_demand * spot, 4)} if spot else out


def unlimited(fleet: Fleet) -> Fleet:
    return fleet.model_copy(update={"skus": {k: v.model_copy(update={"zones": {"zone-a": 10_000}})
                                             for k, v in fleet.skus.items()}})


def misses(plan) -> int:  # noqa: ANN001 - a Plan
    return sum(not m.meets_sla for m in plan.models)


def single_sku(manifests: list[Path], fleet: Fleet, traffic: Traffic, requests: int) -> tuple[str, object] | None:
    """The cheapest plan on one SKU (unlimited units) that meets every SLA."""
    best = None
    for sku in fleet.skus:
        try:
            plan = make_plan(manifests, unlimited(fleet), traffic, Options(only_sku=sku, bindings=False,
                                                                            requests=requests))
        except BadInput:
            continue  # some model cannot meet its SLA on this SKU
        if best is None or plan.usd_per_hour < best[1].usd_per_hour:
            best = (sku, plan)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000, help="simulated requests per model")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results-plan.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifests, fleet, traffic = fixture(Path(tmp))
        t0 = time.perf_counter()
        ours = make_plan(manifests, fleet, traffic, Options(requests=args.requests))
        wall = time.perf_counter() - t0
        ours_free = make_plan(manifests, unlimited(fleet), traffic, Options(requests=args.requests, bindings=False))
        blind = make_plan(manifests, fleet, traffic, Options(capacity_model="blind", derate=False, bindings=False,
                                                             requests=args.requests))
        single = single_sku(manifests, fleet, traffic, args.requests)
    result = report(ours, ours_free, blind, single, wall)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def report(ours, ours_free, blind, single, wall: float) -> dict:  # noqa: ANN001 - Plans
    row = lambda p: {"usd_per_hour": round(p.usd_per_hour, 3), "skus": p.skus,  # noqa: E731
                     "replicas": sum(x.replicas for x in p.pools), "simulated_sla_misses": misses(p),
                     "worst_p99_over_sla": round(max(m.simulated_p99_ms / m.p99_sla_ms for m in p.models), 2)}
    out = {
        "fixture": "FIXTURE: 20 models x 15 SKUs, synthetic batch curves (bench/plan.py), bursty arrivals CV 1-3",
        "solve_seconds": round(ours.solve_seconds, 3), "plan_wall_seconds": round(wall, 2),
        "derate_rounds": ours.derate_rounds,
        "ours": row(ours), "ours_unlimited_units": row(ours_free), "queueing_blind": row(blind),
        "binding": [f"{b.constraint} {b.subject}: {b.detail}"
                    + ("" if b.usd_per_hour_saved_by_one_more is None else
                       f" (saves ${b.usd_per_hour_saved_by_one_more:.3f}/h: one more unit, or without N+1)")
                    for b in ours.binding],
    }
    if single:
        out["cheapest_single_sku"] = {"sku": single[0], **row(single[1])}
        out["ours_vs_single_sku"] = round(ours.usd_per_hour / single[1].usd_per_hour, 3)
        out["ours_unlimited_vs_single_sku"] = round(ours_free.usd_per_hour / single[1].usd_per_hour, 3)
    out["ours_vs_queueing_blind"] = round(ours.usd_per_hour / blind.usd_per_hour, 3)
    return out


if __name__ == "__main__":
    main()
