"""Plan: pools from the manifests' measurements, the MILP, the simulation, derate and re-solve.

    pools = candidate_pools(manifests, fleet, traffic)   # measured capacity per (model, build, SKU)
    solution = solve(problem)                            # cheapest, then fewest SKUs
    simulate every model; derate the pools that miss their SLA; re-solve   (until all meet it)

An input no plan can serve is ``BadInput`` (exit 2) naming what binds: a model with no usable
pool (and why each build was excluded), or the SKU whose inventory is short, by how many units,
and what the plan would cost with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from mlopt.core.errors import BadInput
from mlopt.plan.inputs import Fleet, Traffic
from mlopt.plan.pools import Pool, candidate_pools
from mlopt.plan.simulate import Figures, Served, simulate_model
from mlopt.plan.solve import Problem, Solution, solve

OBJECTIVE = "minimise $/h + 0.01 $/h per distinct SKU (the SKU count by a small weight)"


@dataclass(frozen=True)
class Options:
    capacity_model: Literal["queueing", "blind"] = "queueing"
    only_sku: str | None = None  # plan on one SKU only (the single-SKU baseline)
    requests: int = 20_000  # simulated requests per model
    seed: int = 0
    max_rounds: int = 8
    derate: bool = True  # False: report the simulated misses instead of fixing them
    bindings: bool = True  # re-solve with one more unit of each binding constraint


@dataclass
class State:
    """What a planning run carries from solve to solve."""

    problem: Problem
    solution: Solution
    sims: dict[str, tuple[list[Figures], Figures]]
    rounds: int = 0
    solve_seconds: float = 0.0


def problem_of(pools: list[Pool], fleet: Fleet, traffic: Traffic, headroom: float) -> Problem:
    """The MILP's data."""
    return Problem(pools=pools,
                   demand={m: t.peak_rps * (1 + headroom) for m, t in traffic.models.items()},
                   peak={m: t.peak_rps for m, t in traffic.models.items()},
                   redundant=frozenset(m for m, t in traffic.models.items() if t.redundant),
                   inventory={k: s.units for k, s in fleet.skus.items()},
                   max_spot_share=fleet.max_spot_share)


def usable_pools(manifests: list[Path], fleet: Fleet, traffic: Traffic, options: Options) -> tuple[list[Pool], list[str]]:
    """The candidate pools under the options' capacity model; BadInput for a model with none."""
    pools, excluded = candidate_pools(manifests, fleet, traffic)
    if options.capacity_model == "blind":
        pools = [replace(p, capacity=p.blind) for p in pools if p.blind is not None]
    if options.only_sku:
        pools = [p for p in pools if p.sku == options.only_sku]
    for m in traffic.models:
        if not any(p.model == m for p in pools):
            why = [e for e in excluded if e.startswith(f"{m} ")]
            raise BadInput(f"model {m} has no usable pool" + (f": {'; '.join(why)}" if why else
                           f": no measured build on a fleet SKU ({', '.join(sorted(fleet.skus))})"),
                           hint="measure the builds on the fleet's SKUs (`mlopt measure`), relax the SLA or "
                                "accuracy floor, or add a SKU the manifest has")
    return pools, excluded


def run(manifests: list[Path], fleet: Fleet, traffic: Traffic, options: Options) -> tuple[State, list[str]]:
    """Solve, simulate, derate and re-solve until every simulated p99 meets its SLA."""
    pools, excluded = usable_pools(manifests, fleet, traffic, options)
    headroom = traffic.headroom if options.capacity_model == "queueing" else 0.0
    problem = problem_of(pools, fleet, traffic, headroom)
    state = State(problem, Solution((), 0.0, ()), {})
    while True:
        t0 = time.perf_counter()
        state.solution = _solve(state.problem)
        state.solve_seconds += time.perf_counter() - t0
        state.sims = simulate_all(state.problem, state.solution, traffic, options)
        late = late_pools(state, traffic)
        if not late or not options.derate:
            return state, excluded
        if state.rounds == options.max_rounds:
            raise BadInput(f"after {state.rounds} derating rounds the simulated p99 still misses the SLA of "
                           f"{', '.join(sorted({p.model for p in late}))}",
                           hint="the batch curve is too close to the SLA for this arrival variability")
        state.problem = replace(state.problem, pools=[_derate(p, late, state, traffic) for p in state.problem.pools])
        state.rounds += 1


def _solve(problem: Problem) -> Solution:
    solution = solve(problem)
    if solution is None:
        raise infeasible(problem)
    return solution


def served(problem: Problem, solution: Solution, model: str) -> list[tuple[int, Served]]:
    """(pool index, how the simulation runs it) for the model's used pools, weights by capacity."""
    used = [(i, p) for i, p in enumerate(problem.pools) if p.model == model and solution.replicas[i] > 0]
    total = sum(p.capacity.rate * solution.replicas[i] for i, p in used)
    return [(i, Served(solution.replicas[i], p.capacity.rate * solution.replicas[i] / total, p.capacity.batch,
                       p.capacity.queue_delay_s, p.variant.curve, p.overhead_s)) for i, p in used]


def simulate_all(problem: Problem, solution: Solution, traffic: Traffic,
                 options: Options) -> dict[str, tuple[list[Figures], Figures]]:
    """Per model: the simulated figures of its used pools (in ``served`` order) and of the model."""
    return {m: simulate_model(m, t, t.peak_rps, [s for _, s in served(problem, solution, m)], options.requests,
                              options.seed)
            for m, t in traffic.models.items()}


def late_pools(state: State, traffic: Traffic) -> list[Pool]:
    """Used pools whose simulated p99 misses the model's SLA (the worst one where only the model misses)."""
    late = []
    for m, (per_pool, whole) in state.sims.items():
        sla = traffic.models[m].p99_sla_ms / 1e3
        pools = [state.problem.pools[i] for i, _ in served(state.problem, state.solution, m)]
        mine = [p for p, f in zip(pools, per_pool) if f.p99_s > sla]
        if not mine and whole.p99_s > sla:
            mine = [max(zip(pools, per_pool), key=lambda pf: pf[1].p99_s)[0]]
        late += mine
    return late


def _derate(pool: Pool, late: list[Pool], state: State, traffic: Traffic) -> Pool:
    """Both markets of a late pool's (model, build, SKU) lose capacity in proportion to the miss."""
    hit = [p for p in late if p.variant == pool.variant]
    if not hit:
        return pool
    per_pool, _ = state.sims[pool.model]
    used = [state.problem.pools[i] for i, _ in served(state.problem, state.solution, pool.model)]
    worst = max(f.p99_s for p, f in zip(used, per_pool) if p.variant == pool.variant)
    sla = traffic.models[pool.model].p99_sla_ms / 1e3
    return pool.derated(min(0.95, max(0.5, sla / worst)))


def infeasible(problem: Problem) -> BadInput:
    """Why no plan exists: the SKUs whose inventory is short, by how much, and the cost with more."""
    relaxed = solve(problem, slack=True)
    if relaxed is None or not relaxed.missing:
        return BadInput("no plan meets every constraint", hint="relax the SLAs, the N+1 rules or the spot share")
    short = []
    for sku, n in sorted(relaxed.missing.items()):
        models = sorted({p.model for i, p in enumerate(problem.pools) if p.sku == sku and relaxed.replicas[i] > 0})
        short.append(f"SKU {sku} (inventory {problem.inventory.get(sku, 0)} units) is {n} unit(s) short for "
                     f"{', '.join(models)}")
    one_more = _one_more(problem, relaxed)
    return BadInput("inventory is binding: " + "; ".join(short) + one_more,
                    hint="add the units to fleet.yaml, allow more spot, or relax the traffic's SLA or peak rate")


def _one_more(problem: Problem, relaxed: Solution) -> str:
    """What one more unit of the (single) short SKU would do."""
    if len(relaxed.missing) != 1:
        return ""
    (sku, n), = relaxed.missing.items()
    if n > 1:
        return f"; one more unit of {sku} is not enough"
    bigger = solve(replace(problem, inventory={**problem.inventory, sku: problem.inventory.get(sku, 0) + 1}))
    return f"; with one more unit of {sku} the plan costs ${bigger.usd_per_hour:.2f}/h" if bigger else ""
