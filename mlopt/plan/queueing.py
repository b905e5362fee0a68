"""What one replica of a dynamic-batching server sustains within a p99 SLA.

A replica runs its own batcher (Triton's dynamic batcher: a batch closes when ``max_batch``
requests wait or the oldest has waited ``queue_delay``) and the gateway splits a model's traffic
over replicas at random (Envoy's weighted clusters, kube-proxy). A replica at batch size ``b`` is
modelled as a queue whose customers are batches:

* batch arrivals at rate ``lam / b``; a batch is ``b`` consecutive inter-arrivals of a renewal
  process, so its squared coefficient of variation is ``ca2 / b``;
* batch service time ``S(b)``: log-normal from the measured p50 and p99 at ``b`` (``curve.py``),
  mean ``m_b``, squared CV ``cs2``;
* the waiting time in queue from the **Allen-Cunneen** approximation for G/G/c
  (A. O. Allen, *Probability, Statistics, and Queueing Theory*, 2nd ed., Academic Press 1990,
  sec. 6; for c = 1 it is **Kingman's** formula, J. F. C. Kingman, "The single server queue in
  heavy traffic", Proc. Cambridge Phil. Soc. 57, 1961)::

      E[Wq] = C(c, a) / (c * mu - lam_b) * (ca2_b + cs2) / 2,   mu = 1 / m_b,  a = lam_b / mu

  with ``C(c, a)`` Erlang's C (for c = 1, C = rho), and the usual exponential tail
  ``P(Wq > t) = C exp(-t C / E[Wq])``, so ``Wq_99 = E[Wq] / C * ln(C / 0.01)``;
* a request's p99 is taken as ``overhead + p99(W_http + max(queue_delay, Wq)) + S_99(n)``: a
  request that finds the batcher idle waits at most ``queue_delay`` for its batch to fill, one that
  finds it busy waits in queue and leaves in the next (full) batch, so the two waits do not add up;
  the p99 of the sum of the two stages' waits is solved from their (exponential-tail) laws; ``n``
  is the batch it runs in, those arriving within the delay or while the server is busy, at most ``b``
  (an unloaded server runs short batches);
* the batch size ``b`` and the ``queue_delay`` are the server's own, from the one batching rule the
  image's serve.json is written by (``mlopt.runtime.batching.batch_rule``): the largest measured
  batch with room to wait for one more within the SLA (2 x its p99 + the overhead), and
  ``p50(b) * (b - 1) / b`` as the delay, about the time a full-rate stream takes to fill the batch.
  The plan predicts the batching the image runs;
* ``overhead`` is the server's own time per request (HTTP parse and encode, hand-offs; the fleet's
  ``server_overhead_ms`` for the SKU, else ``DEFAULT_SERVER_OVERHEAD_MS``), served one request at a
  time ahead of the batcher (one event loop): a G/D/1 stage whose wait ``W_http`` is Kingman's
  with a deterministic service and the same exponential tail. It bounds a replica's rate below
  ``1 / overhead``.

Random splitting of a renewal stream with squared CV ``ca2`` over replicas gives each a squared CV
``p * ca2 + 1 - p`` (p: its share), which never exceeds ``max(ca2, 1)``: the capacity is computed
with that bound, so it holds for any number of replicas and is linear in the replica count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlopt.plan.curve import Curve
from mlopt.runtime.batching import BatchRule, batch_rule, queue_delay_us

TAIL = 0.01


@dataclass(frozen=True)
class Capacity:
    """What one replica sustains: requests/s at batch ``batch`` with ``queue_delay_s``, and the
    predicted p99 (seconds) at that rate."""

    rate: float
    batch: int
    queue_delay_s: float
    p99_s: float


def erlang_c(c: int, a: float) -> float:
    """Erlang's C: the probability an arrival waits in an M/M/c queue with offered load ``a``."""
    rho = a / c
    if rho >= 1:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, c):
        term *= a / k
        total += term
    last = term * a / c / (1 - rho)
    return last / (total + last)


def allen_cunneen_wait(lam: float, mean_s: float, c: int, ca2: float, cs2: float) -> tuple[float, float]:
    """(E[Wq], P(wait)) of a G/G/c queue by Allen-Cunneen; (inf, 1) when unstable."""
    mu = 1.0 / mean_s
    if lam >= c * mu:
        return math.inf, 1.0
    pw = erlang_c(c, lam / mu)
    return pw / (c * mu - lam) * (ca2 + cs2) / 2, pw


def _wait(mean_s: float | np.ndarray, rho: np.ndarray, ca2: float | np.ndarray,
          cs2: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A single-server queue's wait as (C, m): 0 with probability 1 - C, else exponential with mean
    ``m`` (Kingman's mean over C, the exponential tail above); C = rho, m = inf when ``rho >= 1``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(rho < 1, mean_s * (ca2 + cs2) / 2 / (1 - rho), np.inf)
    return np.minimum(rho, 1.0), m


def _survival(s: np.ndarray, c1: np.ndarray, m1: np.ndarray, c2: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """P(W1 + W2 > s) for independent waits of the ``_wait`` form."""
    e1, e2 = np.exp(-s / m1), np.exp(-s / m2)
    with np.errstate(divide="ignore", invalid="ignore"):
        both = np.where(np.isclose(m1, m2), (1 + s / m1) * e1, (m1 * e1 - m2 * e2) / (m1 - m2))
    return c1 * (1 - c2) * e1 + c2 * (1 - c1) * e2 + c1 * c2 * both


def _p99(curve: Curve, batch: int, delay_s: float, overhead_s: float, lam: np.ndarray, ca2: float) -> np.ndarray:
    """Request p99 (s) of one replica at ``batch``, ``delay_s`` and rates ``lam`` (an array): overhead +
    delay + the p99 of (HTTP wait + the batch wait beyond the delay) + the p99 of the batch it runs in."""
    lam = np.asarray(lam, dtype=float)
    b = float(batch)
    mean, cs2, _ = (float(x) for x in curve.service(b))
    cb, mb = _wait(mean, lam * mean / b, ca2 / b, cs2)
    ch, mh = _wait(overhead_s, lam * overhead_s, ca2, 0.0) if overhead_s > 0 else (np.zeros_like(lam), np.ones_like(lam))
    with np.errstate(over="ignore", invalid="ignore"):
        cb = cb * np.exp(-delay_s / mb)  # the part of the batch wait beyond the delay
    lo, hi = np.zeros_like(lam), np.where(np.isfinite(mb + mh), 10 * (mb + mh) * np.log(1 / TAIL), 0.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        over = _survival(mid, ch, mh, cb, mb) > TAIL
        lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
    wait = np.where(np.isfinite(mb + mh), hi, np.inf)
    # the batch a request runs in: those arriving within the delay, and while the server is busy
    n = np.clip(1 + lam * (delay_s + np.minimum(lam * mean / b, 1.0) * mean), 1.0, b)
    return overhead_s + delay_s + wait + curve.at(n)[1]


def server_batching(curve: Curve, sla_s: float, overhead_s: float) -> BatchRule:
    """How the image's server batches this curve under the SLA (``batch_rule``, as serve.json has it)."""
    return batch_rule(curve.sizes, [x * 1e3 for x in curve.p50_s], [x * 1e3 for x in curve.p99_s], sla_s * 1e3,
                      overhead_s * 1e3)


def replica_capacity(curve: Curve, sla_s: float, ca2: float, overhead_s: float = 0.0) -> Capacity | None:
    """The highest rate one replica serves with p99 within ``sla_s``, batching as the image's server
    does (``server_batching``); None when even an unloaded replica misses."""
    rule = server_batching(curve, sla_s, overhead_s)
    if not rule.within_sla:
        return None
    return capacity_at(curve, rule.max_batch, rule.queue_delay_s, sla_s, ca2, overhead_s)


# the rate search: each pass evaluates the p99 model on a grid of RATE_GRID rates at once (vectorised, as
# ``_p99`` is over its rates) and narrows to one step; four passes resolve the capacity to 1 part in 1.7e7
RATE_GRID, RATE_PASSES = 64, 4


def capacity_at(curve: Curve, batch: int, delay_s: float, sla_s: float, ca2: float,
                overhead_s: float = 0.0) -> Capacity | None:
    """The highest rate one replica with this ``batch`` and ``delay_s`` serves with p99 within
    ``sla_s`` (bisection on the rate); None when even an unloaded replica misses."""
    ca2 = max(ca2, 1.0)
    if _p99(curve, batch, delay_s, overhead_s, np.array(1e-9), ca2) > sla_s:
        return None
    lo, hi = 0.0, float(batch / curve.service(batch)[0])
    if overhead_s > 0:
        hi = min(hi, 1.0 / overhead_s)
    for _ in range(RATE_PASSES):  # p99 grows with the rate: keep the grid step where it crosses the SLA
        grid = np.linspace(lo, hi, RATE_GRID + 1)[1:]
        ok = _p99(curve, batch, delay_s, overhead_s, grid, ca2) <= sla_s
        first_miss = int(np.argmin(ok)) if not ok.all() else len(grid)
        lo, hi = (grid[first_miss - 1] if first_miss > 0 else lo), (grid[first_miss] if first_miss < len(grid) else hi)
    lo = float(lo)
    return Capacity(lo, batch, delay_s, float(_p99(curve, batch, delay_s, overhead_s, np.array(lo), ca2)))


def predicted_p99(curve: Curve, batch: int, delay_s: float, rate: float, ca2: float, overhead_s: float = 0.0) -> float:
    """Predicted request p99 (s) of one replica at ``rate`` requests/s with the server's ``batch`` and
    ``delay_s``."""
    return float(_p99(curve, batch, delay_s, overhead_s, np.array(max(rate, 1e-9)), max(ca2, 1.0)))


def blind_capacity(curve: Curve, sla_s: float) -> Capacity | None:
    """Mélange's capacity (no queueing): the best batch's throughput within the SLA."""
    got = curve.blind_throughput(sla_s)
    if got is None:
        return None
    rate, batch = got
    p50, p99 = (float(x) for x in curve.at(batch))
    return Capacity(rate, batch, queue_delay_us(sla_s * 1e3, batch, p50 * 1e3, p99 * 1e3, 0.0) / 1e6, p99)
