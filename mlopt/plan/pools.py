"""The pools a plan may use: (model, build variant, SKU, market), each with its measured capacity.

A variant is a built candidate of a manifest entry (its backend and precision). Its capacity comes
from its own measured batch curve; a candidate without a measurement (a cross-compiled or on-device
build not yet measured on the SKU) gives no pool, nor does one whose measured accuracy is below the
model's floor: both are listed as exclusions with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mlopt.core.errors import BadInput
from mlopt.manifest import Candidate, Entry, Manifest, read_manifest
from mlopt.plan.curve import Curve
from mlopt.plan.inputs import Fleet, ModelTraffic, Traffic, catalog_of, on_demand_price, server_overhead
from mlopt.plan.queueing import Capacity, blind_capacity, replica_capacity


@dataclass(frozen=True)
class Variant:
    """One measured build of a (model, SKU) in a manifest."""

    manifest: str  # path of the manifest
    entry: int  # index of the entry in the manifest
    model: str
    sku: str
    backend: str
    precision: str | None
    artifact_key: str
    curve: Curve
    image: str | None  # REPO@sha256:... when the chosen build's image was pushed
    accuracy: float | None

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.precision or 'default'}"


@dataclass(frozen=True)
class Pool:
    """A candidate pool: its price per replica and what one replica sustains."""

    variant: Variant
    market: str  # "on-demand" or "spot"
    usd_per_hour: float
    capacity: Capacity  # the rate the MILP uses (derated by the simulation if it must be)
    blind: Capacity | None  # Mélange's queueing-blind capacity
    ca2: float  # squared CV of the model's arrivals
    overhead_s: float = 0.0  # the server's own time per request on the SKU (fleet.yaml, else the default)
    overhead_source: str = "default"  # "fleet" or "default"
    derate: float = 1.0  # factor the simulation applied to the queueing model's capacity

    @property
    def name(self) -> str:
        v = self.variant
        return f"{v.model}/{v.label}/{v.sku}/{self.market}"

    @property
    def model(self) -> str:
        return self.variant.model

    @property
    def sku(self) -> str:
        return self.variant.sku

    def derated(self, factor: float) -> "Pool":
        """This pool with its capacity multiplied by ``factor``."""
        return replace(self, capacity=replace(self.capacity, rate=self.capacity.rate * factor),
                       derate=self.derate * factor)


def arrival_ca2(t: ModelTraffic) -> float:
    """Squared CV of the model's inter-arrival times: from the trace, else ``arrival_cv``, else 1."""
    if t.trace:
        gaps = np.diff(read_trace(t.trace))
        return float(gaps.var() / gaps.mean() ** 2)
    return (t.arrival_cv or 1.0) ** 2


def read_trace(path: str) -> np.ndarray:
    """Sorted arrival timestamps (s) from a file of one number a line; at least 100 of them."""
    try:
        times = np.sort(np.loadtxt(path, dtype=float, ndmin=1))
    except (OSError, ValueError) as e:
        raise BadInput(f"trace {path} cannot be read as one timestamp a line: {e}") from None
    if times.size < 100 or times[-1] <= times[0]:
        raise BadInput(f"trace {path} has {times.size} arrivals; give at least 100 over a positive time span")
    return times


def variants(manifest_paths: list[Path]) -> tuple[list[Variant], list[str]]:
    """Every built candidate of every entry with a measurement; and why the others have no pool."""
    out, excluded, seen = [], [], set()
    for path in manifest_paths:
        manifest = read_manifest(path)
        for i, entry in enumerate(manifest.entries):
            for c in entry.candidates:
                if c.status != "built" or c.artifact is None or c.artifact.key in seen:
                    continue
                seen.add(c.artifact.key)
                v = _variant(path, manifest, i, entry, c)
                if isinstance(v, str):
                    excluded.append(v)
                else:
                    out.append(v)
    return out, excluded


def _variant(path: Path, manifest: Manifest, i: int, entry: Entry, c: Candidate) -> Variant | str:
    curve = Curve.from_measurement(c.measurement)
    label = f"{entry.model} {c.backend}-{c.precision or 'default'} on {entry.sku}"
    if curve is None:
        return f"{label}: not measured on the SKU ({c.compiled or 'built'}); never estimated"
    chosen = entry.chosen_backend == c.backend and entry.artifact is not None and entry.artifact.key == c.artifact.key
    image = _image(entry) if chosen else None
    accuracy = c.measurement.accuracy.value if c.measurement and c.measurement.accuracy else None
    return Variant(str(path), i, entry.model, entry.sku, c.backend, c.precision, c.artifact.key, curve, image,
                   accuracy)


def _image(entry: Entry) -> str | None:
    """The chosen build's image by digest, where it was pushed."""
    if entry.image is None or not entry.image.pushed:
        return None
    name = entry.image.pushed[-1].partition("@")[0]
    repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    return f"{repo}@{entry.image.digest}"


def candidate_pools(manifest_paths: list[Path], fleet: Fleet, traffic: Traffic) -> tuple[list[Pool], list[str]]:
    """The pools of every (variant, market) whose SKU is in the fleet and whose model has traffic."""
    found, excluded = variants(manifest_paths)
    missing = sorted(set(traffic.models) - {v.model for v in found} - _listed(manifest_paths))
    if missing:
        raise BadInput(f"traffic names model {', '.join(missing)}, which no manifest has",
                       hint="give the manifest that built it with --manifest")
    catalog = catalog_of(fleet)
    pools = []
    for v in found:
        t = traffic.models.get(v.model)
        if t is None or v.sku not in fleet.skus:
            continue
        reason = _accuracy_problem(v, t)
        if reason:
            excluded.append(reason)
            continue
        pools += _markets(v, t, fleet, on_demand_price(fleet, catalog, v.sku), excluded)
    return pools, excluded


def _listed(manifest_paths: list[Path]) -> set[str]:
    return {e.model for p in manifest_paths for e in read_manifest(p).entries}


def _accuracy_problem(v: Variant, t: ModelTraffic) -> str | None:
    if t.accuracy_floor is None:
        return None
    if v.accuracy is None:
        return f"{v.model} {v.label} on {v.sku}: no measured accuracy, and the floor is {t.accuracy_floor:g}"
    if v.accuracy < t.accuracy_floor:
        return (f"{v.model} {v.label} on {v.sku}: measured accuracy {v.accuracy:g} is below the floor "
                f"{t.accuracy_floor:g}")
    return None


def _markets(v: Variant, t: ModelTraffic, fleet: Fleet, price: float, excluded: list[str]) -> list[Pool]:
    ca2 = arrival_ca2(t)
    overhead_ms, source = server_overhead(fleet, v.sku)
    cap = replica_capacity(v.curve, t.p99_sla_ms / 1e3, ca2, overhead_ms / 1e3)
    if cap is None:
        excluded.append(f"{v.model} {v.label} on {v.sku}: p99 {v.curve.p99_s[0] * 1e3:g} ms at batch "
                        f"{v.curve.sizes[0]} + {overhead_ms:g} ms server overhead ({source}) is above the "
                        f"{t.p99_sla_ms:g} ms SLA")
        return []
    blind = blind_capacity(v.curve, t.p99_sla_ms / 1e3)
    spot = fleet.skus[v.sku].spot_usd_per_hour
    prices = [("on-demand", price)] + ([("spot", spot)] if spot is not None and fleet.max_spot_share > 0 else [])
    return [Pool(v, market, p, cap, blind, ca2, overhead_ms / 1e3, source) for market, p in prices]
