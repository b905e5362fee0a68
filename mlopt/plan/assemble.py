"""From a solved and simulated plan to the typed ``Plan``: pools, routing, costs, binding constraints."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from mlopt.plan.inputs import Fleet, Traffic, apply_what_if
from mlopt.plan.planner import OBJECTIVE, Options, State, run, served
from mlopt.plan.queueing import predicted_p99
from mlopt.plan.result import Binding, ModelPlan, Plan, PoolPlan
from mlopt.plan.solve import Solution, solve


def make_plan(manifests: list[Path], fleet: Fleet, traffic: Traffic, options: Options = Options(),
              what_if: str | None = None) -> Plan:
    """The cheapest plan meeting every SLA in simulation; with ``what_if``, for the edited inputs,
    and ``baseline_usd_per_hour`` the cost without the edit."""
    base = None
    if what_if:
        base = make_plan(manifests, fleet, traffic, replace(options, bindings=False)).usd_per_hour
        fleet, traffic = apply_what_if(fleet, traffic, what_if)
    state, excluded = run([Path(m) for m in manifests], fleet, traffic, options)
    bindings = binding(state, fleet) if options.bindings else []
    return _plan(state, fleet, traffic, options, excluded, bindings, what_if, base)


def _pools(state: State, traffic: Traffic) -> list[PoolPlan]:
    out = []
    for m, t in traffic.models.items():
        per_pool, _ = state.sims[m]
        for (i, s), fig in zip(served(state.problem, state.solution, m), per_pool):
            p, v = state.problem.pools[i], state.problem.pools[i].variant
            peak = t.peak_rps * s.weight
            out.append(PoolPlan(
                name=p.name, model=m, sku=p.sku, market=p.market, backend=v.backend, precision=v.precision,
                manifest=v.manifest, entry=v.entry, artifact_key=v.artifact_key, image=v.image,
                replicas=s.replicas, max_batch=s.batch, queue_delay_us=round(s.queue_delay_s * 1e6),
                server_overhead_ms=p.overhead_s * 1e3, server_overhead_source=p.overhead_source,
                replica_capacity_rps=p.capacity.rate, derate=p.derate,
                blind_capacity_rps=p.blind.rate if p.blind else None, weight=s.weight, peak_rps=peak,
                usd_per_hour=p.usd_per_hour * s.replicas,
                predicted_p99_ms=_finite(predicted_p99(v.curve, s.batch, s.queue_delay_s, peak / s.replicas, p.ca2,
                                                       p.overhead_s) * 1e3),
                simulated_p50_ms=fig.p50_s * 1e3, simulated_p99_ms=fig.p99_s * 1e3))
    return out


def _models(state: State, traffic: Traffic, pools: list[PoolPlan]) -> list[ModelPlan]:
    out = []
    for m, t in traffic.models.items():
        mine = [p for p in pools if p.model == m]
        whole = state.sims[m][1]
        out.append(ModelPlan(
            model=m, priority=t.priority, n_plus_one=t.redundant, mean_rps=t.mean_rps, peak_rps=t.peak_rps,
            p99_sla_ms=t.p99_sla_ms, arrival_cv=math.sqrt(_ca2(state, m)),
            weights={p.name: p.weight for p in mine}, predicted_p99_ms=_worst([p.predicted_p99_ms for p in mine]),
            simulated_p50_ms=whole.p50_s * 1e3, simulated_p99_ms=whole.p99_s * 1e3,
            meets_sla=whole.p99_s * 1e3 <= t.p99_sla_ms))
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _worst(values: list[float | None]) -> float | None:
    return None if None in values else max(values)  # type: ignore[type-var]


def _ca2(state: State, model: str) -> float:
    return next(p.ca2 for p in state.problem.pools if p.model == model)


def _plan(state: State, fleet: Fleet, traffic: Traffic, options: Options, excluded: list[str], bindings: list[Binding],
          what_if: str | None, base: float | None) -> Plan:
    pools = _pools(state, traffic)
    models = _models(state, traffic, pools)
    cost = state.solution.usd_per_hour
    per_hour = sum(t.mean_rps for t in traffic.models.values()) * 3600
    return Plan(objective=OBJECTIVE, capacity_model=options.capacity_model, usd_per_hour=cost,
                usd_per_million=cost / per_hour * 1e6, skus=list(state.solution.skus), pools=pools, models=models,
                binding=bindings, excluded=excluded, derate_rounds=state.rounds, solve_seconds=state.solve_seconds,
                what_if=what_if, baseline_usd_per_hour=base, meets_sla=all(m.meets_sla for m in models),
                catalog=fleet.catalog, gateway=fleet.gateway, capacity_type_label=fleet.capacity_type_label)


def binding(state: State, fleet: Fleet) -> list[Binding]:
    """Inventories used to the last unit (with the saving of one more), a spot share at its cap, and
    the N+1 rules (with what dropping each would save)."""
    pb, sol = state.problem, state.solution
    out = []
    for sku, units in sorted(pb.inventory.items()):
        used = sum(n for p, n in zip(pb.pools, sol.replicas) if p.sku == sku)
        if units and used >= units:
            more = solve(replace(pb, inventory={**pb.inventory, sku: units + 1}))
            out.append(Binding(constraint="inventory", subject=sku, detail=f"all {units} units used",
                               usd_per_hour_saved_by_one_more=_saved(sol, more)))
    spot = sum(n for p, n in zip(pb.pools, sol.replicas) if p.market == "spot")
    if spot and spot + 1 > pb.max_spot_share * (sum(sol.replicas) + 1):
        out.append(Binding(constraint="spot-share", subject="fleet", usd_per_hour_saved_by_one_more=None,
                           detail=f"{spot} of {sum(sol.replicas)} replicas on spot (cap {pb.max_spot_share:g})"))
    for m in sorted(pb.redundant):
        loose = solve(replace(pb, redundant=pb.redundant - {m}))
        out.append(Binding(constraint="n-plus-one", subject=m, usd_per_hour_saved_by_one_more=_saved(sol, loose),
                           detail="the peak is served with any one replica lost"))
    return out


def _saved(sol: Solution, other: Solution | None) -> float | None:
    return None if other is None else max(0.0, sol.usd_per_hour - other.usd_per_hour)
