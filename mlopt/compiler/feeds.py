"""Feeds and reference runs: deterministic inputs, and the ONNX Runtime CPU session every check compares with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlopt.core.spec import InputSpec
from mlopt.runtime import Runner
from mlopt.runtime.ort import onnx_file

def onnx_runner(path: Path, threads: int = 1, optimize: bool = False) -> Runner:
    """An ONNX Runtime CPU session as a function of a feed. Reference runs use basic optimizations only."""
    return onnx_file(path, threads, optimize)


def run_onnx(path: Path, feed: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    """One reference run of an ONNX file (ONNX Runtime CPU, basic optimizations)."""
    return onnx_runner(path, threads)(feed)


def ort_not_implemented() -> type[Exception]:
    """The exception ONNX Runtime raises when its provider has no kernel for an operator and type
    (a bf16 Gemm on the CPU provider): a model it cannot run, not a broken one."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    return OrtNotImplemented


def random_feed(inputs: tuple[InputSpec, ...] | list[InputSpec], shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs: normal floats, small non-negative ints (valid token ids, masks, indices)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in inputs:
        shape = shapes[i.name]
        if i.dtype.startswith(("float", "bfloat")):
            feed[i.name] = rng.standard_normal(shape).astype(np.float32 if i.dtype == "bfloat16" else i.dtype)
        elif i.dtype == "bool":
            feed[i.name] = np.ones(shape, dtype=bool)
        else:
            feed[i.name] = rng.integers(0, 2, size=shape).astype(i.dtype)
    return feed
