"""Data for calibration and evaluation, and the metrics that score a model on it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from mlopt.core.callables import load_callable
from mlopt.core.errors import AccuracyError, BadInput
from mlopt.core.spec import InputSpec, fixed_batch, row_axes
from mlopt.recipes.schema import DataSource, Evaluation


@dataclass(frozen=True)
class Batches:
    """Materialised batches: input feeds plus optional labels, and a digest of their contents."""

    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    digest: str

    def __len__(self) -> int:
        return len(self.feeds)


def load_batches(src: DataSource, inputs: Iterable[InputSpec], batch_name: str = "batch") -> Batches:
    """Read a data source into memory and check each batch against the input signature. An .npz is cut
    along each input's batch axis (``row_axes``), in batches of the model's fixed batch size if it has one."""
    specs = list(inputs)
    axes = row_axes(specs, batch_name)
    size = fixed_batch(specs, batch_name) or src.batch_size
    raw = _npz_batches(src, axes, size) if src.source.endswith(".npz") else _fn_batches(src)
    feeds, labels = [], []
    for k, batch in enumerate(raw):
        if src.max_batches is not None and k >= src.max_batches:
            break
        feed, lab = _split(batch, specs, axes, src.source, k)
        feeds.append(feed)
        if lab is not None:
            labels.append(lab)
    if not feeds:
        raise BadInput(f"data source {src.source} yielded no batches")
    lab_arr = np.concatenate(labels) if labels and len(labels) == len(feeds) else None
    return Batches(feeds, lab_arr, _digest(feeds, lab_arr))


def _npz_batches(src: DataSource, axes: dict[str, int | None], size: int) -> Iterable[dict[str, np.ndarray]]:
    path = Path(src.source)
    if not path.is_file():
        raise BadInput(f"data file {path} does not exist")
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as e:
        raise BadInput(f"data file {path} is not a readable .npz: {e}") from None
    cut = {k: axes.get(k, 0) for k, v in arrays.items() if v.ndim > 0 and axes.get(k, 0) is not None}
    if not cut:  # nothing has a batch axis: the file is one batch
        yield arrays
        return
    n = min(arrays[k].shape[ax] for k, ax in cut.items())
    for start in range(0, n, size):
        rows = np.arange(start, min(start + size, n))
        yield {k: (np.take(v, rows, axis=cut[k]) if k in cut else v) for k, v in arrays.items()}


def _fn_batches(src: DataSource) -> Iterable[dict[str, np.ndarray]]:
    """The user's function's batches; it runs here, so its failures (at the call or midway) are bad input."""
    fn = load_callable(src.source, "data source")
    try:
        batches = fn()
        if batches is None or isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
            raise BadInput(f"data source {src.source} returned {type(batches).__name__}",
                           hint="return (or yield) an iterable of dicts of arrays, one dict per batch")
        yield from batches
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"data source {src.source} failed: {_cause(e)}",
                       hint="run the function on its own to fix it; --debug shows the traceback") from e


def _cause(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _split(batch: Any, specs: list[InputSpec], axes: dict[str, int | None], where: str,
           k: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if not isinstance(batch, dict):
        raise BadInput(f"data source {where}: batch {k} is a {type(batch).__name__}, expected a dict of arrays")
    missing = [s.name for s in specs if s.name not in batch]
    if missing:
        raise BadInput(f"data source {where}: batch {k} lacks inputs {missing} (it has {sorted(batch)})")
    feed = {s.name: _array(batch[s.name], s, where, k) for s in specs}
    labels = batch.get("labels")
    if labels is None:
        return feed, None
    labels, rows = np.asarray(labels), next((feed[n].shape[ax] for n, ax in axes.items() if ax is not None), 1)
    if labels.ndim == 0 or len(labels) != rows:
        raise BadInput(f"data source {where}: batch {k} has {labels.size if labels.ndim == 0 else len(labels)} "
                       f"labels for {rows} rows", hint="yield one label per row of the batch")
    return feed, labels


def _array(value: Any, s: InputSpec, where: str, k: int) -> np.ndarray:
    """One input of one batch as a contiguous array of the signature's dtype, finite and of the right shape."""
    dtype = s.dtype if s.dtype != "bfloat16" else np.float32
    try:
        arr = np.asarray(value, dtype=dtype, order="C")  # (ascontiguousarray would make a rank-0 input rank 1)
    except (TypeError, ValueError) as e:
        raise BadInput(f"data source {where}: batch {k} input {s.name!r} cannot be read as {s.dtype} ({_cause(e)})",
                       hint="yield numeric arrays") from None
    if arr.ndim != len(s.shape) or any(isinstance(d, int) and d != n for d, n in zip(s.shape, arr.shape)):
        raise BadInput(f"data source {where}: batch {k} input {s.name!r} has shape {arr.shape}, signature is {s.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadInput(f"bad data: data source {where}, batch {k} input {s.name!r} holds NaN or inf",
                       hint="clean the data (np.nan_to_num, or drop those rows)")
    return arr


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
    """Each output over all batches: rows stacked, or (an output whose other axes vary between batches,
    such as a recurrent state with its batch on axis 1) each batch's values flattened and joined."""
    out = {}
    for name in per_batch[0]:
        parts = [np.asarray(b[name]) for b in per_batch]
        same = all(p.ndim > 0 and p.shape[1:] == parts[0].shape[1:] for p in parts)
        out[name] = np.concatenate(parts) if same else np.concatenate([p.reshape(1, -1) for p in parts], axis=1)
    return out


METRIC_VERSION = 2  # changes when a built-in metric's definition does (2: fidelity over every output)


def score(ev: Evaluation, outputs: Outputs, labels: np.ndarray | None, reference: Outputs | None) -> float:
    """The evaluation metric of ``outputs`` (higher is better)."""
    return score_outputs(ev, outputs, labels, reference)[0]


def score_outputs(ev: Evaluation, outputs: Outputs, labels: np.ndarray | None,
                  reference: Outputs | None) -> tuple[float, dict[str, float] | None]:
    """The metric, and for a fidelity metric each output's figure (the worst output decides)."""
    if ev.metric in FIDELITY:
        ref = _need(reference)
        per = {name: FIDELITY[ev.metric](np.asarray(outputs[name], np.float64), np.asarray(ref[name], np.float64))
               for name in ref}
        return min(per.values()), per
    return _score(ev, outputs, labels, reference), None


def _score(ev: Evaluation, outputs: Outputs, labels: np.ndarray | None, reference: Outputs | None) -> float:
    if ev.metric == "accuracy":
        if labels is None:
            raise BadInput(f"metric 'accuracy' needs labels, but {ev.source} yields none", hint="use 'top1-agreement'")
        return float(np.mean(_first(outputs).argmax(-1) == labels.reshape(-1)))
    if ev.metric == "top1-agreement":
        return float(np.mean(_first(outputs).argmax(-1) == _first(_need(reference)).argmax(-1)))
    return _custom_metric(ev.metric, outputs, labels)


def _custom_metric(spec: str, outputs: Outputs, labels: np.ndarray | None) -> float:
    """A user's metric function: its failures and non-numbers are bad input; NaN is an accuracy failure."""
    fn: Callable[..., float] = load_callable(spec, "metric")
    try:
        value = fn(outputs, labels)
    except Exception as e:
        raise BadInput(f"metric {spec} failed: {_cause(e)}",
                       hint="run the metric on its own to fix it; --debug shows the traceback") from e
    number = _number(value)
    if number is None:
        raise BadInput(f"metric {spec} returned {type(value).__name__}, not a number", hint="return a float")
    if not np.isfinite(number):
        raise AccuracyError(f"metric returned {'NaN' if np.isnan(number) else number}: {spec}",
                            hint="check the model's outputs and the metric on the evaluation data")
    return number


def _number(value: Any) -> float | None:
    """``value`` as a float (a Python or numpy scalar, a 0-d array); None for text, booleans and the rest."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first(outputs: Outputs) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())), dtype=np.float64)


def _need(reference: Outputs | None) -> Outputs:
    if reference is None:
        raise BadInput("this metric compares with the original model's outputs, which are not available")
    return reference


def _cosine(got: np.ndarray, ref: np.ndarray) -> float:
    """Mean per-sample cosine similarity; for an output with one value a sample (a probability, a score),
    whose cosine is only its sign, ``1 - relative L2 error`` over the batch instead."""
    if got.ndim == 0 or got.size == len(got):
        return _relative(got, ref)
    a2, b2 = got.reshape(len(got), -1), ref.reshape(len(ref), -1)
    num = np.sum(a2 * b2, axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    both_zero = (np.linalg.norm(a2, axis=1) == 0) & (np.linalg.norm(b2, axis=1) == 0)
    return float(np.mean(np.where(both_zero, 1.0, num / np.maximum(den, 1e-12))))


def _relative(got: np.ndarray, ref: np.ndarray) -> float:
    """``1 - ||got - ref|| / ||ref||`` over the whole output, at least 0 (1: identical)."""
    norm, err = float(np.linalg.norm(ref)), float(np.linalg.norm(got - ref))
    if norm == 0:
        return 1.0 if err == 0 else 0.0
    return max(0.0, 1.0 - err / norm)


SNR_CAP_DB = 100.0  # identical outputs: the figure stays finite (strict JSON)


def _snr(got: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-noise ratio in dB, ``10 log10(||ref||^2 / ||got - ref||^2)``, capped at 100 dB."""
    signal, noise = float(np.sum(ref * ref)), float(np.sum((got - ref) ** 2))
    if noise == 0:
        return SNR_CAP_DB
    return min(SNR_CAP_DB, 10 * np.log10(max(signal, 1e-300) / noise))


# Metrics comparing every output with the original model's (the worst output decides); higher is better.
FIDELITY = {"cosine": _cosine, "relative-error": _relative, "snr": _snr}
