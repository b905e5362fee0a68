"""State shared by the stages of one build, and helpers every stage uses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mlopt.core.spec import InputSpec, fixed_batch, row_axes
from mlopt.core.util import Log
from mlopt.compiler.data import METRIC_VERSION, Batches, concat_outputs, load_batches, score_outputs
from mlopt.compiler.feeds import random_feed
from mlopt.manifest import ReferenceAccuracy
from mlopt.recipes.schema import Recipe
from mlopt.store import Store
from mlopt.targets.backends import package_version



@dataclass(frozen=True)
class Run:
    """State shared by the stages of one build. Frozen: a stage that learns the model's inputs
    gets a new Run from ``with_inputs`` (the stage timings are shared)."""

    recipe: Recipe
    store: Store
    log: Log
    stages: dict[str, float] = field(default_factory=dict)
    inputs: tuple[InputSpec, ...] = ()

    def with_inputs(self, inputs: tuple[InputSpec, ...]) -> Run:
        """This run for a model taking ``inputs``; itself (data already loaded) when they are the same."""
        return self if tuple(inputs) == self.inputs else replace(self, inputs=tuple(inputs))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.log(f"[stage] {name}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - t0, 3)

    # -------------------------------------------------------- data, loaded on first use
    def data_key(self, which: str) -> str | None:
        src = getattr(self.recipe.data, which)
        if src is None:
            return None
        h = hashlib.sha256(json.dumps(src.model_dump(mode="json"), sort_keys=True).encode())
        h.update(f"metrics {METRIC_VERSION}".encode())
        for part in (src.source.rpartition(":")[0] or src.source, getattr(src, "metric", "").rpartition(":")[0]):
            if part and Path(part).is_file():
                h.update(Path(part).read_bytes())
        return h.hexdigest()

    @cached_property
    def evaluation(self) -> Batches | None:
        ev = self.recipe.data.evaluation
        return load_batches(ev, self.inputs, self.recipe.model.batch_axis) if ev else None

    @cached_property
    def calibration(self) -> Batches | None:
        cal = self.recipe.data.calibration
        return load_batches(cal, self.inputs, self.recipe.model.batch_axis) if cal else None

    @property
    def batch_sizes(self) -> list[int]:
        """The benchmark's batch sizes, or the one a model with a fixed batch takes."""
        fixed = fixed_batch(self.inputs, self.recipe.model.batch_axis)
        return [fixed] if fixed is not None else list(self.recipe.benchmark.batch_sizes)

    def sample_feed(self, batch: int) -> dict[str, np.ndarray]:
        """A feed of ``batch`` rows (the model's own batch where it is fixed): real evaluation rows
        where shapes allow, else seeded random."""
        name = self.recipe.model.batch_axis
        batch = fixed_batch(self.inputs, name) or batch
        shapes = {i.name: i.concrete({**self.recipe.benchmark.sizes, name: batch}) for i in self.inputs}
        if self.evaluation is not None:
            tiled = _tiled(self.evaluation.feeds[0], shapes, row_axes(self.inputs, name), batch)
            if tiled is not None:
                return tiled
        return random_feed(self.inputs, shapes)


def _tiled(first: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], axes: dict[str, int | None],
           batch: int) -> dict[str, np.ndarray] | None:
    """``first``'s rows repeated to ``batch`` along each input's batch axis; None where a shape differs."""
    out = {}
    for n, shape in shapes.items():
        arr, ax = first[n], axes.get(n)
        if ax is None:
            if arr.shape != shape:
                return None
            out[n] = arr
            continue
        if arr.ndim != len(shape) or np.delete(arr.shape, ax).tolist() != np.delete(shape, ax).tolist():
            return None
        reps = math.ceil(batch / arr.shape[ax])
        out[n] = np.ascontiguousarray(np.take(np.concatenate([arr] * reps, axis=ax), np.arange(batch), axis=ax))
    return out


@dataclass(frozen=True)
class Reference:
    """The original model, computed once before the passes and builds: its metric on the evaluation
    data and its outputs there (loaded only when a metric compares with them). Both None without data."""

    accuracy: ReferenceAccuracy | None = None
    outputs: Callable[[], dict[str, np.ndarray]] | None = None


def evaluate(run: Run, runner: Callable, reference: Reference) -> float:
    """The recipe's metric of ``runner`` on the evaluation data."""
    return evaluate_outputs(run, runner, reference)[0]


def evaluate_outputs(run: Run, runner: Callable, reference: Reference) -> tuple[float, dict[str, float] | None]:
    """The recipe's metric of ``runner`` on the evaluation data, and each output's figure (fidelity metrics)."""
    ev = run.recipe.data.evaluation
    outs = concat_outputs([runner(f) for f in run.evaluation.feeds])
    assert reference.outputs is not None, "evaluate needs a reference computed on evaluation data"
    return score_outputs(ev, outs, run.evaluation.labels, reference.outputs())



def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs))



def toolchain() -> dict[str, str]:
    return {p: package_version(p) for p in ("mlopt", "onnx", "onnxruntime", "onnxscript", "torch", "apache-tvm", "numpy",
                                            "nncf")}
