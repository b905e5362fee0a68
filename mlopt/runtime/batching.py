"""The one rule for how a server batches a model: from its measured batch curve, a p99 SLA and the
server's own per-request overhead, the largest batch it merges requests up to, the sizes worth
preferring, and how long it waits for a batch to fill.

The image's ``serve.json`` (``mlopt.package.serving.plan_batching``), Triton's config and the
planner's latency model (``mlopt.plan.queueing``) all call ``batch_rule``, so a plan predicts the
batching the image will run. It lives here, in the lowest layer, beside the batcher that applies it
(``batcher.py``), and imports nothing of mlopt.

    max batch    the largest measured batch that leaves room to wait for one more: 2 x its p99 + the
                 overhead within the SLA (a request that finds the server busy waits for the running
                 batch, then runs in the next); where none does, the smallest whose p99 + overhead
                 is within it; no SLA: the largest measured; none within it: the smallest, marked
                 ``within_sla=False``
    preferred    measured sizes above 1, up to the max batch, with at least ``MIN_GAIN`` x the
                 throughput of every smaller one
    queue delay  about the time a full-rate stream takes to fill the batch, p50 x (b - 1) / b (waiting
                 longer gains nothing), at most what the SLA leaves after the batch's p99 and the
                 overhead; whole microseconds, 0 without an SLA

The overhead is what the serving runtime adds to each request beside the model (HTTP parse and
encode, hand-offs between threads): ``DEFAULT_SERVER_OVERHEAD_MS`` where it was not measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_GAIN = 1.10  # a larger batch is preferred only for at least 10% more throughput
# The image server's per-request overhead (uvicorn + starlette, binary KServe v2, batch 1) measured by
# bench/plan_vs_server.py on a 2-core AMD EPYC (x86-64-v3): latency at one client less the queue delay
# and the server's own compute. Used where the fleet gives no measured figure for a SKU.
DEFAULT_SERVER_OVERHEAD_MS = 1.3


@dataclass(frozen=True)
class BatchRule:
    """How the server batches: ``max_batch`` 0 means no batch axis (every request runs alone)."""

    max_batch: int
    preferred: tuple[int, ...]
    queue_delay_us: int
    within_sla: bool  # False: even the smallest measured batch misses the SLA

    @property
    def queue_delay_s(self) -> float:
        return self.queue_delay_us / 1e6


def queue_delay_us(sla_ms: float | None, batch: float, p50_ms: float, p99_ms: float, overhead_ms: float) -> int:
    """The batcher's wait for a batch of ``batch`` whose p50 and p99 are given: p50 x (b - 1) / b, at
    most the SLA less that p99 and the overhead, in whole microseconds; 0 without an SLA."""
    if sla_ms is None:
        return 0
    return int(math.floor(max(0.0, min(sla_ms - p99_ms - overhead_ms, p50_ms * (batch - 1) / batch)) * 1000))


def batch_rule(sizes: Sequence[int], p50_ms: Sequence[float], p99_ms: Sequence[float], sla_ms: float | None,
               overhead_ms: float, throughput: Sequence[float | None] | None = None) -> BatchRule:
    """The rule (module docstring) over a measured curve given as parallel sequences sorted by size;
    ``throughput`` (requests/s per size) defaults to size / p50."""
    rows = list(zip(sizes, p50_ms, p99_ms, throughput or [None] * len(sizes)))
    if sla_ms is None:
        return BatchRule(rows[-1][0], _preferred(rows), 0, True)
    within = [r for r in rows if r[2] + overhead_ms <= sla_ms]
    if not within:
        return BatchRule(rows[0][0], (), 0, False)
    roomy = [r for r in within if 2 * r[2] + overhead_ms <= sla_ms]
    top = roomy[-1] if roomy else within[0]
    chosen = [r for r in rows if r[0] <= top[0]]
    return BatchRule(top[0], _preferred(chosen), queue_delay_us(sla_ms, top[0], top[1], top[2], overhead_ms), True)


def _preferred(rows: list[tuple[int, float, float, float | None]]) -> tuple[int, ...]:
    """Sizes above 1 with at least ``MIN_GAIN`` x the throughput of every smaller one."""
    preferred, best = [], 0.0
    for size, p50, _, thr in rows:
        rate = thr if thr else size / p50 * 1e3
        if size > 1 and best and rate >= best * MIN_GAIN:
            preferred.append(size)
        best = max(best, rate)
    return tuple(preferred)
