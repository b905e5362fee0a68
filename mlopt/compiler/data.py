"""Data for calibration and evaluation, and the metrics that score a model on it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from mlopt.compiler.ingest import load_callable
from mlopt.errors import BadInput
from mlopt.recipes.schema import DataSource, Evaluation, InputSpec


@dataclass(frozen=True)
class Batches:
    """Materialised batches: input feeds plus optional labels, and a digest of their contents."""

    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    digest: str

    def __len__(self) -> int:
        return len(self.feeds)


def load_batches(src: DataSource, inputs: Iterable[InputSpec]) -> Batches:
    """Read a data source into memory and check each batch against the input signature."""
    specs = list(inputs)
    raw = _npz_batches(src) if src.source.endswith(".npz") else _fn_batches(src)
    feeds, labels = [], []
    for k, batch in enumerate(raw):
        if src.max_batches is not None and k >= src.max_batches:
            break
        feed, lab = _split(batch, specs, src.source, k)
        feeds.append(feed)
        if lab is not None:
            labels.append(lab)
    if not feeds:
        raise BadInput(f"data source {src.source} yielded no batches")
    lab_arr = np.concatenate(labels) if labels and len(labels) == len(feeds) else None
    return Batches(feeds, lab_arr, _digest(feeds, lab_arr))


def _npz_batches(src: DataSource) -> Iterable[dict[str, np.ndarray]]:
    path = Path(src.source)
    if not path.is_file():
        raise BadInput(f"data file {path} does not exist")
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as e:
        raise BadInput(f"data file {path} is not a readable .npz: {e}") from None
    n = min(len(a) for a in arrays.values())
    for start in range(0, n, src.batch_size):
        yield {k: v[start:start + src.batch_size] for k, v in arrays.items()}


def _fn_batches(src: DataSource) -> Iterable[dict[str, np.ndarray]]:
    fn = load_callable(src.source, "data source")
    try:
        return fn()
    except Exception as e:
        raise BadInput(f"data source {src.source} failed: {type(e).__name__}: {e}") from None


def _split(batch: Any, specs: list[InputSpec], where: str, k: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if not isinstance(batch, dict):
        raise BadInput(f"data source {where}: batch {k} is a {type(batch).__name__}, expected a dict of arrays")
    missing = [s.name for s in specs if s.name not in batch]
    if missing:
        raise BadInput(f"data source {where}: batch {k} lacks inputs {missing} (it has {sorted(batch)})")
    feed = {}
    for s in specs:
        arr = np.ascontiguousarray(np.asarray(batch[s.name]), dtype=s.dtype if s.dtype != "bfloat16" else np.float32)
        if arr.ndim != len(s.shape) or any(isinstance(d, int) and d != n for d, n in zip(s.shape, arr.shape)):
            raise BadInput(f"data source {where}: batch {k} input {s.name!r} has shape {arr.shape}, signature is {s.shape}")
        feed[s.name] = arr
    labels = batch.get("labels")
    return feed, (np.asarray(labels) if labels is not None else None)


def _digest(feeds: list[dict[str, np.ndarray]], labels: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            h.update(name.encode())
            h.update(str(feed[name].shape).encode())
            h.update(feed[name].tobytes())
    if labels is not None:
        h.update(labels.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- metrics

Outputs = dict[str, np.ndarray]


def concat_outputs(per_batch: list[Outputs]) -> Outputs:
    return {name: np.concatenate([b[name] for b in per_batch]) for name in per_batch[0]}


def score(ev: Evaluation, outputs: Outputs, labels: np.ndarray | None, reference: Outputs | None) -> float:
    """The evaluation metric of ``outputs`` (higher is better)."""
    if ev.metric == "accuracy":
        if labels is None:
            raise BadInput(f"metric 'accuracy' needs labels, but {ev.source} yields none", hint="use 'top1-agreement'")
        return float(np.mean(_first(outputs).argmax(-1) == labels.reshape(-1)))
    if ev.metric == "top1-agreement":
        return float(np.mean(_first(outputs).argmax(-1) == _first(_need(reference)).argmax(-1)))
    if ev.metric == "cosine":
        return _cosine(_first(outputs), _first(_need(reference)))
    fn: Callable[..., float] = load_callable(ev.metric, "metric")
    return float(fn(outputs, labels))


def _first(outputs: Outputs) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())), dtype=np.float64)


def _need(reference: Outputs | None) -> Outputs:
    if reference is None:
        raise BadInput("this metric compares with the original model's outputs, which are not available")
    return reference


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
    num = np.sum(a2 * b2, axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))
