"""A build's measured batch curve: latency per batch size, interpolated between measured sizes.

Only measured figures are used. Between two measured batch sizes p50 and p99 are interpolated
linearly; beyond the largest measured batch there is nothing (``max_batch`` is the largest measured
size); below the smallest measured size the smallest size's figures are used (a smaller batch does
not take longer, so this bounds the latency from above).

Service times are modelled as log-normal with the measured median and p99:
``sigma = ln(p99 / p50) / z_0.99``; the queueing model and the simulation use the same law.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlopt.manifest import Measurement

Z99 = 2.3263478740408408  # the standard normal's 99th percentile


@dataclass(frozen=True)
class Curve:
    """Measured p50 and p99 (seconds) by batch size, sorted by size."""

    sizes: tuple[int, ...]
    p50_s: tuple[float, ...]
    p99_s: tuple[float, ...]

    @classmethod
    def from_measurement(cls, m: Measurement | None) -> "Curve | None":
        """The curve of a measurement; None when there is none (a figure is never estimated)."""
        if m is None or not m.batches:
            return None
        rows = sorted({b.batch_size: b for b in m.batches}.values(), key=lambda b: b.batch_size)
        return cls(tuple(b.batch_size for b in rows), tuple(b.p50_ms / 1e3 for b in rows),
                   tuple(max(b.p99_ms, b.p50_ms) / 1e3 for b in rows))

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def at(self, batch: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(p50, p99) in seconds at ``batch`` (array or int), which must not exceed ``max_batch``."""
        b = np.asarray(batch, dtype=float)
        if np.any(b > self.max_batch):
            raise ValueError(f"batch {int(b.max())} is beyond the largest measured batch {self.max_batch}")
        return np.interp(b, self.sizes, self.p50_s), np.interp(b, self.sizes, self.p99_s)

    def service(self, batch: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, squared CV, sigma) of the log-normal service time of a batch."""
        p50, p99 = self.at(batch)
        sigma = np.log(np.maximum(p99 / p50, 1.0)) / Z99
        return p50 * np.exp(sigma**2 / 2), np.expm1(sigma**2), sigma

    def blind_throughput(self, sla_s: float) -> tuple[float, int] | None:
        """Mélange's per-replica capacity: the highest throughput (batch / p50) at a batch whose
        p99 is within the SLA, with no queueing; None when no batch meets the SLA."""
        sizes = np.arange(self.sizes[0], self.max_batch + 1)
        p50, p99 = self.at(sizes)
        ok = p99 <= sla_s
        if not ok.any():
            return None
        tput = np.where(ok, sizes / p50, 0.0)
        i = int(np.argmax(tput))
        return float(tput[i]), int(sizes[i])

