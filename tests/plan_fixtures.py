"""FIXTURE manifests for the planner's tests and bench/plan.py.

Every batch curve here is SYNTHETIC, written in code (latency = fixed cost + cost per item, p99 a
fixed ratio above p50): none was measured on any GPU. Each measurement says so in its provenance
(``host.cpu`` and ``libraries.fixture``), so a fixture manifest cannot pass for a measured one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlopt.core.spec import InputSpec
from mlopt.manifest import (Accuracy, ArtifactRef, BatchFigures, Candidate, Entry, Host, ImageRecord, Manifest,
                            Measurement, ModelInfo, Provenance, RecipeRef, write_manifest)

FIXTURE = "FIXTURE: synthetic batch curve written in tests/plan_fixtures.py, not measured"
SIZES = (1, 2, 4, 8, 16, 32)


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _host() -> Host:
    return Host(machine="x86_64", cpu=FIXTURE, cores=None, x86_level=None, features=[], os="fixture", python="3")


def curve(base_ms: float, per_item_ms: float, sizes: tuple[int, ...] = SIZES, tail: float = 1.25) -> list[tuple[int, float, float]]:
    """(batch, p50 ms, p99 ms): p50 = base + per_item * batch, p99 = tail * p50."""
    return [(b, base_ms + per_item_ms * b, tail * (base_ms + per_item_ms * b)) for b in sizes]


def measurement(points: list[tuple[int, float, float]], accuracy: float | None = None) -> Measurement:
    batches = [BatchFigures(batch_size=b, runs=50, p50_ms=p50, p90_ms=(p50 + p99) / 2, p99_ms=p99, mean_ms=p50,
                            min_ms=p50 * 0.95, throughput_per_s=b / p50 * 1e3, spread=0.05, noisy=False)
               for b, p50, p99 in points]
    acc = None if accuracy is None else Accuracy(metric="top1", value=accuracy, reference=0.90,
                                                 drop=0.90 - accuracy, within_budget=True)
    prov = Provenance(host=_host(), libraries={"fixture": FIXTURE}, measured_at="2026-12-01T00:00:00Z", threads=1)
    return Measurement(provenance=prov, batches=batches, peak_memory_bytes=200 << 20, memory_method="fixture",
                       noisy=False, accuracy=acc)


def candidate(model: str, sku: str, backend: str, precision: str, points: list | None,
              accuracy: float | None = None) -> Candidate:
    """A built candidate; ``points`` None: cross-compiled and not measured (``measurement: null``)."""
    key = _digest(model, sku, backend, precision)
    art = ArtifactRef(key=key, content_digest=_digest(key), path=f"/store/objects/{key[:12]}", size_bytes=10 << 20,
                      files=["model.onnx"])
    return Candidate(backend=backend, status="built", compiled="here" if points else "cross", precision=precision,
                     artifact=art, measurement=measurement(points, accuracy) if points else None)


def entry(model: str, sku: str, candidates: list[Candidate], image: bool = True) -> Entry:
    """An entry whose chosen build is its first candidate (with a pushed image when ``image``)."""
    c = candidates[0]
    digest = "sha256:" + _digest("image", c.artifact.key)
    img = ImageRecord(tag=f"{model}:{sku}", digest=digest, base="fixture/base:1", base_digest="sha256:" + "0" * 64,
                      pushed=[f"registry.example/mlopt/{model}:{sku}@{digest}"]) if image else None
    return Entry(model=model, version=1, sku=sku, sku_kind="cpu" if sku.startswith("cpu") else "gpu",
                 chosen_backend=c.backend, chosen_by="fixture", artifact=c.artifact, precision=c.precision,
                 measurement=c.measurement, cost=None, candidates=candidates, image=img)


def manifest(entries: list[Entry]) -> Manifest:
    names = sorted({e.model for e in entries})
    models = [ModelInfo(name=n, version=1, source="fixture", input_digest=_digest(n), final_digest=_digest(n, 1),
                        inputs=[InputSpec(name="x", shape=["batch", 8])], outputs=["y"], reference_accuracy=None,
                        passes=[]) for n in names]
    return Manifest(mlopt_version="fixture", created="2026-12-01T00:00:00Z",
                    recipe=RecipeRef(name="fixture", digest=_digest("recipe")), host=_host(), toolchain={},
                    store="/store", models=models, entries=entries, status="ok")


def write(path: Path, entries: list[Entry]) -> Path:
    """Write a fixture manifest (validated against the shipped schema) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest(entries), path)
    return path
