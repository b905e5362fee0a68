"""The mixed-integer program: how many replicas of each pool, and how much traffic each takes.

Variables, per pool p: replicas ``n_p`` (integer), routed rate ``x_p`` (continuous, req/s), ``y_p``
(binary: the pool is used, for N+1); per SKU k: ``u_k`` (binary: the SKU is used) and, when
diagnosing an infeasible input, ``s_k`` (integer: units of k missing). Constraints:

* capacity: ``x_p <= cap_p * n_p`` (cap_p: what one replica sustains within the SLA, ``queueing.py``);
* demand: ``sum_{p of m} x_p >= peak_m * (1 + headroom)`` for every model m;
* inventory: ``sum_{p on k} n_p <= units_k (+ s_k)``, summed over zones;
* N+1 for redundant models: for every pool p of m, ``sum_{q of m} cap_q n_q - cap_p y_p >= peak_m``
  with ``n_p <= units y_p``: losing any one replica of a used pool still serves the peak;
* spot share: ``sum_{spot p} n_p <= share * sum_p n_p``;
* ``n_p <= units_k u_k``.

The objective is lexicographic: first the $/h (``sum price_p n_p``), then, with the cost held at its
optimum, the number of distinct SKUs. Both are solved by HiGHS through ``scipy.optimize.milp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlopt.plan.pools import Pool

COST_SLACK = 1e-7  # relative slack on the optimal cost when the second objective is minimised


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
    routed: tuple[float, ...]
    usd_per_hour: float
    skus: tuple[str, ...]
    missing: dict[str, int] = field(default_factory=dict)  # SKU -> units short (diagnosis only)


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


@dataclass(frozen=True)
class _Layout:
    pools: int
    skus: list[str]
    slack: bool

    def n(self, p: int) -> int:
        return p

    def x(self, p: int) -> int:
        return self.pools + p

    def y(self, p: int) -> int:
        return 2 * self.pools + p

    def u(self, k: int) -> int:
        return 3 * self.pools + k

    def s(self, k: int) -> int:
        return 3 * self.pools + len(self.skus) + k

    @property
    def size(self) -> int:
        return 3 * self.pools + len(self.skus) * (2 if self.slack else 1)


def _rows(pb: Problem, lay: _Layout) -> _Rows:
    rows, sku_index = _Rows(lay.size), {k: i for i, k in enumerate(lay.skus)}
    for p, pool in enumerate(pb.pools):
        rows.add({lay.x(p): 1.0, lay.n(p): -pool.capacity.rate}, ub=0.0)
        rows.add({lay.n(p): 1.0, lay.u(sku_index[pool.sku]): -_units(pb, lay, pool.sku)}, ub=0.0)
    for m, rate in pb.demand.items():
        rows.add({lay.x(p): 1.0 for p, pool in enumerate(pb.pools) if pool.model == m}, lb=rate)
    for k, sku in enumerate(lay.skus):
        coefs = {lay.n(p): 1.0 for p, pool in enumerate(pb.pools) if pool.sku == sku}
        if lay.slack:
            coefs[lay.s(k)] = -1.0
        rows.add(coefs, ub=float(pb.inventory.get(sku, 0)))
    share = pb.max_spot_share
    rows.add({lay.n(p): (1.0 - share if pool.market == "spot" else -share) for p, pool in enumerate(pb.pools)}, ub=0.0)
    _n_plus_one(pb, lay, rows)
    return rows


def _units(pb: Problem, lay: _Layout, sku: str) -> float:
    """An upper bound on a SKU's replicas (its units; with slack, what every model could need)."""
    if not lay.slack:
        return float(pb.inventory.get(sku, 0))
    return float(pb.inventory.get(sku, 0) + _big(pb))


def _big(pb: Problem) -> int:
    return int(sum(np.ceil(d / max(min(p.capacity.rate for p in pb.pools if p.model == m), 1e-9)) + 1
                   for m, d in pb.demand.items()))


def _n_plus_one(pb: Problem, lay: _Layout, rows: _Rows) -> None:
    for m in pb.redundant:
        mine = [p for p, pool in enumerate(pb.pools) if pool.model == m]
        total = {lay.n(q): pb.pools[q].capacity.rate for q in mine}
        for p in mine:
            rows.add({**total, lay.y(p): -pb.pools[p].capacity.rate}, lb=pb.peak[m])
            rows.add({lay.n(p): 1.0, lay.y(p): -_units(pb, lay, pb.pools[p].sku)}, ub=0.0)


def _bounds(pb: Problem, lay: _Layout) -> Any:
    from scipy.optimize import Bounds

    lb, ub = np.zeros(lay.size), np.full(lay.size, np.inf)
    for p, pool in enumerate(pb.pools):
        ub[lay.n(p)] = _units(pb, lay, pool.sku)
        ub[lay.y(p)] = 1.0 if pool.model in pb.redundant else 0.0
    ub[lay.u(0):lay.u(0) + len(lay.skus)] = 1.0
    return Bounds(lb, ub)


def _integrality(pb: Problem, lay: _Layout) -> np.ndarray:
    kinds = np.ones(lay.size)
    kinds[lay.x(0):lay.x(0) + len(pb.pools)] = 0
    return kinds


def _milp(c: np.ndarray, pb: Problem, lay: _Layout, extra: list[Any] | None = None) -> Any:
    from scipy.optimize import milp

    cons = [_rows(pb, lay).constraint()] + (extra or [])
    return milp(c, constraints=cons, integrality=_integrality(pb, lay), bounds=_bounds(pb, lay),
                options={"time_limit": pb.time_limit_s, "mip_rel_gap": 1e-6})


def solve(pb: Problem, slack: bool = False) -> Solution | None:
    """The cheapest plan, then the fewest SKUs at that cost; None when infeasible. With ``slack``,
    missing inventory may be bought: the cheapest purchase that makes the input feasible is found."""
    from scipy.optimize import LinearConstraint

    if not pb.pools:
        return None
    lay = _Layout(len(pb.pools), sorted({p.sku for p in pb.pools}), slack)
    cost = np.zeros(lay.size)
    for p, pool in enumerate(pb.pools):
        cost[lay.n(p)] = pool.usd_per_hour
    first = cost.copy()
    if slack:  # buying a unit costs far more than running one: the least purchase first
        for k, sku in enumerate(lay.skus):
            first[lay.s(k)] = 1e3 * max(p.usd_per_hour for p in pb.pools if p.sku == sku)
    res = _milp(first, pb, lay)
    if res.x is None or res.status not in (0, 1):
        return None
    best = float(first @ res.x)
    hold = LinearConstraint(first.reshape(1, -1), -np.inf, best * (1 + COST_SLACK) + 1e-6)
    skus = np.zeros(lay.size)
    skus[lay.u(0):lay.u(0) + len(lay.skus)] = 1.0
    res2 = _milp(skus, pb, lay, [hold])
    return _solution(pb, lay, res2.x if res2.x is not None else res.x, cost)


def _solution(pb: Problem, lay: _Layout, x: np.ndarray, cost: np.ndarray) -> Solution:
    n = tuple(int(round(x[lay.n(p)])) for p in range(lay.pools))
    routed = tuple(float(x[lay.x(p)]) for p in range(lay.pools))
    used = tuple(sorted({pb.pools[p].sku for p in range(lay.pools) if n[p] > 0}))
    missing = {k: int(round(x[lay.s(i)])) for i, k in enumerate(lay.skus) if lay.slack and round(x[lay.s(i)]) > 0}
    return Solution(n, routed, float(cost[:lay.pools] @ np.array(n, dtype=float)), used, missing)
