"""A discrete-event simulation of a model's pools, to check the plan the queueing model made.

Arrivals at the model's peak rate: Poisson, a gamma renewal process with the traffic's coefficient
of variation (shape ``1 / cv^2``), or the traffic's trace scaled to the peak rate. The gateway sends
each request to a replica at random, with the plan's weights (a pool's weight shared equally by its
replicas). Each replica is one server with a dynamic batcher, as Triton's: when the server is free,
a batch closes once ``max_batch`` requests wait or the oldest has waited ``queue_delay``; it runs
for a log-normal time with the measured p50 and p99 of its size (``curve.py``). Ahead of the batcher
each request takes the server's own per-request overhead (HTTP parse and encode: the fleet's
``server_overhead_ms``), one request at a time, as the server's one event loop does; the batcher
sees a request when that is done, and its latency counts from its arrival. Seeded per model,
so the same plan gives the same figures. The first 2% of arrivals (the empty start) are not counted.
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from mlopt.plan.curve import Z99, Curve
from mlopt.plan.inputs import ModelTraffic
from mlopt.plan.pools import read_trace

WARMUP = 0.02


@dataclass(frozen=True)
class Served:
    """One pool of a model as the simulation runs it."""

    replicas: int
    weight: float
    batch: int
    queue_delay_s: float
    curve: Curve
    overhead_s: float = 0.0  # the server's own time per request, ahead of the batcher


@dataclass(frozen=True)
class Figures:
    p50_s: float
    p99_s: float
    requests: int


def arrivals(t: ModelTraffic, rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times (s) at mean ``rate``: the trace scaled (and repeated), else gamma renewal."""
    if t.trace:
        trace = read_trace(t.trace)
        gaps = np.diff(trace) * ((trace.size - 1) / (trace[-1] - trace[0])) / rate
        gaps = np.resize(gaps, n)  # repeated when the trace is shorter than n
    else:
        shape = 1.0 / (t.arrival_cv or 1.0) ** 2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return np.cumsum(gaps)


def after_overhead(times: np.ndarray, overhead: float) -> np.ndarray:
    """When each request, arriving at ``times`` (sorted), reaches the batcher: served one at a time
    for ``overhead`` seconds each (``d_i = max(a_i, d_{i-1}) + overhead``, in closed form)."""
    if overhead <= 0:
        return times
    k = np.arange(times.size) * overhead
    return np.maximum.accumulate(times - k) + k + overhead


def replica_latencies(times: np.ndarray, batch: int, delay: float, curve: Curve,
                      rng: np.random.Generator, sizes: list[int] | None = None, overhead: float = 0.0) -> np.ndarray:
    """Latency (s) of each request of one replica, arriving at ``times`` (sorted), the server's
    ``overhead`` included; the size of each batch run is appended to ``sizes`` where one is given."""
    a, n = after_overhead(times, overhead).tolist(), times.size
    p50, p99 = curve.at(np.arange(1, batch + 1))
    med, sig = p50.tolist(), (np.log(np.maximum(p99 / p50, 1.0)) / Z99).tolist()
    z = rng.standard_normal(n).tolist()
    lat, free, i, k = np.empty(n), 0.0, 0, 0
    while i < n:
        full = a[i + batch - 1] if i + batch - 1 < n else math.inf
        fire = max(free, min(full, a[i] + delay))
        j = min(bisect_right(a, fire, i), i + batch)
        size = j - i
        if sizes is not None:
            sizes.append(size)
        free = fire + med[size - 1] * math.exp(sig[size - 1] * z[k])
        lat[i:j] = free - times[i:j]
        i, k = j, k + 1
    return lat


def simulate_model(name: str, t: ModelTraffic, rate: float, pools: list[Served], requests: int,
                   seed: int = 0) -> tuple[list[Figures], Figures]:
    """Simulated p50/p99 of each pool of a model and of the model, at ``rate`` requests/s."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    times = arrivals(t, rate, requests, rng)
    owner = np.repeat(np.arange(len(pools)), [p.replicas for p in pools])
    share = np.concatenate([np.full(p.replicas, p.weight / p.replicas) for p in pools])
    target = rng.choice(owner.size, size=times.size, p=share / share.sum())
    lat = np.empty(times.size)
    for r in range(owner.size):
        mine = np.flatnonzero(target == r)
        if mine.size:
            s = pools[owner[r]]
            lat[mine] = replica_latencies(times[mine], s.batch, s.queue_delay_s, s.curve, rng, overhead=s.overhead_s)
    counted = times >= times[-1] * WARMUP
    per_pool = [_figures(lat[counted & (owner[target] == i)]) for i in range(len(pools))]
    return per_pool, _figures(lat[counted])


def _figures(lat: np.ndarray) -> Figures:
    if lat.size == 0:
        return Figures(0.0, 0.0, 0)
    return Figures(float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), int(lat.size))
