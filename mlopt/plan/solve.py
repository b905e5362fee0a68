"""The mixed-integer program: how many replicas of each pool, and how much traffic each takes.

Variables: per pool p, replicas ``n_p`` (integer) and ``y_p`` (binary: the pool is used, for
N+1); per SKU k, ``u_k`` (binary: the SKU is used) and, when diagnosing an infeasible input,
``s_k`` (integer: units of k missing). Constraints:

* demand: ``sum_{p of m} cap_p n_p >= peak_m * (1 + headroom)`` for every model m (cap_p: what one
  replica sustains within the SLA, ``queueing.py``);
* inventory and SKU use: ``sum_{p on k} n_p <= units_k * u_k (+ s_k)``, units summed over zones;
* N+1 for redundant models: for every pool p of m, ``sum_{q of m} cap_q n_q - cap_p y_p >= peak_m``
  with ``n_p <= most_p y_p``: losing any one replica of a used pool still serves the peak;
* spot share: ``sum_{spot p} n_p <= share * sum_p n_p``;
* ``n_p <= most_p = ceil(demand_m / cap_p) + 1``: more replicas are never cheaper.

The continuous rate routed to each pool, ``x_p`` with ``x_p <= cap_p n_p`` and ``sum x_p = demand``,
is not a solver variable: each model's rates couple to nothing else, so a routing exists exactly
when the demand row holds, and the plan routes in proportion to capacity (``x_p = demand * cap_p n_p
/ sum_q cap_q n_q``: every replica of a model equally loaded). Keeping ``x`` in the MILP made the
20 x 15 bench 6x slower. Demand and N+1 rows are divided by their right-hand side (coefficients
near 1).

The objective is ``sum price_p n_p + SKU_WEIGHT * sum u_k``: $/h, then the number of distinct SKUs
by a small weight (one distinct SKU is worth one cent an hour, so a plan with a SKU fewer wins only
when it costs at most a cent more). A lexicographic second solve (fewest SKUs with the cost held)
took 20 s on the bench, so the weight is used instead. Solved by HiGHS via ``scipy.optimize.milp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlopt.plan.pools import Pool

SKU_WEIGHT = 0.01  # $/h one distinct SKU is worth in the objective
MIP_GAP = 1e-4  # relative optimality gap HiGHS stops at
BUY_WEIGHT = 1e3  # diagnosis: a missing unit costs this many times its hourly price


@dataclass(frozen=True)
class Problem:
    pools: list[Pool]
    demand: dict[str, float]  # model -> peak * (1 + headroom)
    peak: dict[str, float]
    redundant: frozenset[str]
    inventory: dict[str, int]  # SKU -> units
    max_spot_share: float
    time_limit_s: float = 30.0


@dataclass(frozen=True)
class Solution:
    replicas: tuple[int, ...]
    usd_per_hour: float
    skus: tuple[str, ...]
    missing: dict[str, int] = field(default_factory=dict)  # SKU -> units short (diagnosis only)


@dataclass(frozen=True)
class _Layout:
    """Column positions: n (pools), y (pools), u (SKUs), then s (SKUs) when diagnosing."""

    pools: int
    skus: list[str]
    slack: bool

    def y(self, p: int) -> int:
        return self.pools + p

    def u(self, k: int) -> int:
        return 2 * self.pools + k

    def s(self, k: int) -> int:
        return 2 * self.pools + len(self.skus) + k

    @property
    def size(self) -> int:
        return 2 * self.pools + len(self.skus) * (2 if self.slack else 1)


class _Rows:
    """Sparse constraint rows: lb <= sum coef * var <= ub."""

    def __init__(self, nvars: int):
        self.nvars, self.r, self.c, self.v, self.lb, self.ub = nvars, [], [], [], [], []

    def add(self, coefs: dict[int, float], lb: float = -np.inf, ub: float = np.inf) -> None:
        row = len(self.lb)
        for col, coef in coefs.items():
            self.r.append(row), self.c.append(col), self.v.append(coef)
        self.lb.append(lb), self.ub.append(ub)

    def constraint(self) -> Any:
        from scipy.optimize import LinearConstraint
        from scipy.sparse import coo_array

        a = coo_array((self.v, (self.r, self.c)), shape=(len(self.lb), self.nvars)).tocsr()
        return LinearConstraint(a, np.array(self.lb), np.array(self.ub))


def most(pb: Problem, pool: Pool) -> float:
    """The most replicas a pool can usefully have: enough for its model's demand alone, plus one."""
    return float(np.ceil(pb.demand[pool.model] / pool.capacity.rate) + 1)


def _rows(pb: Problem, lay: _Layout) -> _Rows:
    rows = _Rows(lay.size)
    for m, rate in pb.demand.items():
        rows.add({p: pool.capacity.rate / rate for p, pool in enumerate(pb.pools) if pool.model == m}, lb=1.0)
    for k, sku in enumerate(lay.skus):
        coefs = {p: 1.0 for p, pool in enumerate(pb.pools) if pool.sku == sku}
        coefs[lay.u(k)] = -float(pb.inventory.get(sku, 0))
        if lay.slack:
            coefs[lay.s(k)] = -1.0
        rows.add(coefs, ub=0.0)
    share = pb.max_spot_share
    rows.add({p: (1.0 - share if pool.market == "spot" else -share) for p, pool in enumerate(pb.pools)}, ub=0.0)
    for m in pb.redundant:
        mine = [p for p, pool in enumerate(pb.pools) if pool.model == m]
        total = {q: pb.pools[q].capacity.rate / pb.peak[m] for q in mine}
        for p in mine:
            rows.add({**total, lay.y(p): -pb.pools[p].capacity.rate / pb.peak[m]}, lb=1.0)
            rows.add({p: 1.0, lay.y(p): -most(pb, pb.pools[p])}, ub=0.0)
    return rows


def _bounds(pb: Problem, lay: _Layout) -> Any:
    from scipy.optimize import Bounds

    ub = np.ones(lay.size)
    for p, pool in enumerate(pb.pools):
        ub[p] = most(pb, pool) if lay.slack else min(most(pb, pool), float(pb.inventory.get(pool.sku, 0)))
        ub[lay.y(p)] = 1.0 if pool.model in pb.redundant else 0.0
    if lay.slack:
        ub[lay.s(0):] = np.inf
    return Bounds(np.zeros(lay.size), ub)


def solve(pb: Problem, slack: bool = False) -> Solution | None:
    """The cheapest plan (fewest SKUs among equal costs); None when infeasible. With ``slack``,
    missing inventory may be bought: the least purchase that makes the input feasible is found."""
    from scipy.optimize import milp

    if not pb.pools:
        return None
    lay = _Layout(len(pb.pools), sorted({p.sku for p in pb.pools}), slack)
    cost = np.array([p.usd_per_hour for p in pb.pools])
    objective = np.zeros(lay.size)
    objective[:lay.pools] = cost
    objective[lay.u(0):lay.u(0) + len(lay.skus)] = SKU_WEIGHT
    if slack:  # buying a unit costs far more than running one: the least purchase first
        for k, sku in enumerate(lay.skus):
            objective[lay.s(k)] = BUY_WEIGHT * max(p.usd_per_hour for p in pb.pools if p.sku == sku)
    res = milp(objective, constraints=[_rows(pb, lay).constraint()], integrality=np.ones(lay.size),
               bounds=_bounds(pb, lay), options={"time_limit": pb.time_limit_s, "mip_rel_gap": MIP_GAP})
    if res.x is None or res.status not in (0, 1):
        return None
    n = tuple(int(round(v)) for v in res.x[:lay.pools])
    missing = {k: int(round(res.x[lay.s(i)])) for i, k in enumerate(lay.skus) if slack and round(res.x[lay.s(i)]) > 0}
    return Solution(n, float(cost @ np.array(n, dtype=float)), tuple(sorted({pb.pools[p].sku for p in range(lay.pools)
                                                                             if n[p] > 0})), missing)
