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
* a request's p99 is taken as ``max(queue_delay, Wq_99) + S_99(b)``: a request that finds the
  server idle waits at most ``queue_delay`` for its batch to fill, one that finds it busy waits in
  queue and leaves in the next (full) batch, so the two waits do not add up; ``queue_delay =
  p50(b) * (b - 1) / b``, about the time a full-rate stream takes to fill the batch (waiting longer
  than one batch takes gains nothing).

Random splitting of a renewal stream with squared CV ``ca2`` over replicas gives each a squared CV
``p * ca2 + 1 - p`` (p: its share), which never exceeds ``max(ca2, 1)``: the capacity is computed
with that bound, so it holds for any number of replicas and is linear in the replica count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlopt.plan.curve import Z99, Curve

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


def _p99(curve: Curve, b: np.ndarray, lam: np.ndarray, ca2: float) -> np.ndarray:
    """Request p99 (s) of one replica (c = 1, so C = rho) at batch ``b`` and rate ``lam``, vectorised."""
    mean, cs2, sigma = curve.service(b)
    p50 = curve.at(b)[0]
    rho = lam * mean / b
    with np.errstate(divide="ignore", invalid="ignore"):
        cond_mean = mean * (ca2 / b + cs2) / 2 / (1 - rho)  # E[Wq] / C for c = 1
        wq99 = np.where(rho > TAIL, cond_mean * np.log(np.maximum(rho / TAIL, 1.0)), 0.0)
    s99 = p50 * np.exp(sigma * Z99)  # the measured p99 at b
    out = np.maximum(queue_delay(p50, b), wq99) + s99
    return np.where(rho < 1, out, np.inf)


def queue_delay(p50: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The batcher's queue delay at batch ``b``: p50(b) * (b - 1) / b."""
    return p50 * (b - 1) / b


def replica_capacity(curve: Curve, sla_s: float, ca2: float) -> Capacity | None:
    """The highest rate one replica serves with p99 within ``sla_s``, over every batch size from the
    smallest to the largest measured (bisection on the rate, vectorised over batch sizes); None when
    no batch meets the SLA even unloaded."""
    ca2 = max(ca2, 1.0)
    b = np.arange(curve.sizes[0], curve.max_batch + 1, dtype=float)
    mean = curve.service(b)[0]
    lo, hi = np.zeros_like(b), b / mean
    ok = _p99(curve, b, np.full_like(b, 1e-9), ca2) <= sla_s
    if not ok.any():
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        good = _p99(curve, b, mid, ca2) <= sla_s
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
    lo = np.where(ok, lo, 0.0)
    i = int(np.argmax(lo))
    return Capacity(float(lo[i]), int(b[i]), float(queue_delay(curve.at(b[i])[0], b[i])),
                    float(_p99(curve, b[i:i + 1], lo[i:i + 1], ca2)[0]))


def predicted_p99(curve: Curve, batch: int, rate: float, ca2: float) -> float:
    """Predicted request p99 (s) of one replica at ``rate`` requests/s and batch ``batch``."""
    return float(_p99(curve, np.array([float(batch)]), np.array([max(rate, 1e-9)]), max(ca2, 1.0))[0])


def blind_capacity(curve: Curve, sla_s: float) -> Capacity | None:
    """Mélange's capacity (no queueing): the best batch's throughput within the SLA."""
    got = curve.blind_throughput(sla_s)
    if got is None:
        return None
    rate, batch = got
    return Capacity(rate, batch, float(queue_delay(curve.at(batch)[0], np.array(float(batch)))),
                    float(curve.at(batch)[1]))
