"""Backends turn a Model into a build for one SKU. Heavy backends import lazily from a static table."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np

from mlopt.core.model import Model
from mlopt.core.errors import BackendUnavailable, UnknownName
from mlopt.runtime import isa
from mlopt.targets.catalog import SKU
from mlopt.core.util import package_version  # noqa: F401  (re-exported for the backends)

BACKENDS: dict[str, str] = {
    "onnxruntime": "mlopt.targets.ort:OrtBackend",
    "tvm": "mlopt.targets.tvm:TVMBackend",
    "openvino": "mlopt.targets.openvino:OpenVINOBackend",
    "tensorrt": "mlopt.targets.engines:TensorRTBackend",
    "migraphx": "mlopt.targets.engines:MIGraphXBackend",
}

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Availability:
    """What a backend can do for a SKU on this machine."""

    build: Literal["here", "cross", "on-device", "no"]  # on-device: a plan that builds when it first starts there
    run: bool  # can the build be executed (validated, measured) on this machine?
    reason: str = ""


@dataclass(frozen=True)
class BuildRequest:
    model: Model
    sku: SKU
    threads: int
    tuning_trials: int
    tuning_timeout_s: int
    tuning_dir: Path  # shared tuning records (reused across builds by workload)
    batch_axis: str
    dims: dict[str, int]
    batch_sizes: tuple[int, ...] = (1,)  # the benchmark plan's; tuned builds specialise to these
    device_present: bool = False  # the SKU's device is on this machine (GPU tuning, engine builds)


class Backend(ABC):
    """One code generator. Subclasses are registered in ``BACKENDS``."""

    name: ClassVar[str]
    atol: ClassVar[float] = 1e-4  # validation tolerance against the reference outputs
    rtol: ClassVar[float] = 1e-3

    @abstractmethod
    def availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        """Whether this backend can build (and run) for ``sku`` here."""

    @abstractmethod
    def build(self, req: BuildRequest, out: Path) -> dict[str, Any]:
        """Write the artifact's files into ``out``; return its metadata (precision, entry point ...)."""

    def requires(self, sku: SKU) -> dict[str, Any]:
        """What this backend's build for ``sku`` needs of the CPU that runs it. Portable formats
        (ONNX, OpenVINO IR) need nothing: their runtimes pick kernels for the CPU they find."""
        return {}

    def load(self, artifact: Path, meta: dict[str, Any], threads: int) -> Runner:
        """A callable running the built artifact on a feed; a build whose code this CPU cannot run
        is refused (exit 4) before any of it is loaded."""
        reason = isa.refusal(meta.get("requires"), f"build {artifact.name} ({meta.get('sku', '?')}/{self.name})")
        if reason:
            raise BackendUnavailable(reason, hint="run it on a machine of its SKU; `mlopt targets` shows what this "
                                                  "machine runs")
        return self.open(artifact, meta, threads)

    @abstractmethod
    def open(self, artifact: Path, meta: dict[str, Any], threads: int) -> Runner:
        """A callable running the built artifact on a feed (``load`` checks the CPU first)."""

    @abstractmethod
    def toolchain(self) -> dict[str, str]:
        """Versions that change this backend's output (part of the artifact key)."""

    def toolchain_for(self, sku: SKU) -> dict[str, str]:
        """Versions that change this backend's output for ``sku`` (a GPU target adds its compilers)."""
        return self.toolchain()


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name (imports its module only now)."""
    if name not in BACKENDS:
        raise UnknownName(f"unknown backend {name!r}; choose from {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


