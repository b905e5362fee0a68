"""Backends turn a Model into a build for one SKU. Heavy backends import lazily from a static table.

A backend is one room: its module in ``mlopt/targets`` (the ``Backend`` subclass and its
``BackendSpec``: packages, Triton mapping, JIT or not, what doctor checks, what an image pins) and its
runtime loader in ``mlopt/runtime`` (which validation, measurement, images and serving all call).
Adding one = those two files, a line in ``BACKENDS`` and the SKUs' ``backends`` in the catalog.
"""

from __future__ import annotations

import importlib
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from mlopt.core.model import Model
from mlopt.core.errors import BackendUnavailable, UnknownName
from mlopt import runtime
from mlopt.runtime import Runner, isa
from mlopt.targets.catalog import SKU
from mlopt.core.util import package_version  # noqa: F401  (re-exported for the backends)

BACKENDS: dict[str, str] = {
    "onnxruntime": "mlopt.targets.ort:OrtBackend",
    "tvm": "mlopt.targets.tvm:TVMBackend",
    "openvino": "mlopt.targets.openvino:OpenVINOBackend",
    "tensorrt": "mlopt.targets.engines:TensorRTBackend",
    "migraphx": "mlopt.targets.engines:MIGraphXBackend",
}



@dataclass(frozen=True)
class TritonRuntime:
    """How Triton runs a backend's builds."""

    key: str  # "platform" or "backend"
    value: str
    files: tuple[str, ...]  # artifact files (name prefixes) Triton loads from the version folder
    default_file: str | None = None
    accelerator: str | None = None  # gpu_execution_accelerator of the ONNX Runtime backend
    thread_parameters: tuple[str, ...] = ()  # config parameters set to the instance's thread count
    parameters: tuple[tuple[str, str], ...] = ()  # fixed config parameters


@dataclass(frozen=True)
class BackendSpec:
    """Everything the rest of mlopt knows about a backend, declared once in its module (readable
    without importing the backend's library)."""

    name: str
    loader: str  # the module of mlopt.runtime that runs its builds
    packages: dict[str, str]  # pip distribution -> the module it provides (versions key artifacts and ledgers)
    triton: TritonRuntime
    modules: tuple[str, ...] = ()  # imported before a memory probe measures a run (default: packages' modules)
    build_packages: tuple[str, ...] = ()  # distributions that change its output without being imported to run
    jit: bool = False  # the build is a plan whose engine is built on the device when the container starts
    doctor: tuple[str, ...] = ()  # `mlopt doctor` runtime components it needs
    serving: tuple[str, ...] = ()  # distributions an image pins at the build's version (requirements.txt)

    @property
    def run_modules(self) -> tuple[str, ...]:
        return self.modules or tuple(dict.fromkeys(self.packages.values()))


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
    ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # axes traffic varies: (min, opt, max)


class Backend(ABC):
    """One code generator. Subclasses are registered in ``BACKENDS``."""

    name: ClassVar[str]
    spec: ClassVar[BackendSpec]

    @abstractmethod
    def availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        """Whether this backend can build (and run) for ``sku`` here."""

    @abstractmethod
    def build(self, req: BuildRequest, out: Path) -> dict[str, Any]:
        """Write the artifact's files into ``out``; return its metadata: the fields of
        ``mlopt.core.artifact.BuildOutput`` (precision, entry, format, details, the backend's own files),
        which the compiler validates (a key that is not a field is refused)."""

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

    def open(self, artifact: Path, meta: dict[str, Any], threads: int) -> Runner:
        """The backend's runtime loader (``mlopt.runtime.<spec.loader>``) on the artifact (``load``
        checks the CPU first); a missing runtime library or device is ``BackendUnavailable``."""
        try:
            return runtime.loader(self.spec.loader).load(artifact, meta, threads)
        except runtime.Unavailable as e:
            raise BackendUnavailable(f"{self.name}: {e}") from None

    @abstractmethod
    def toolchain(self) -> dict[str, str]:
        """Versions that change this backend's output (part of the artifact key)."""

    def toolchain_for(self, sku: SKU) -> dict[str, str]:
        """Versions that change this backend's output for ``sku`` (a GPU target adds its compilers)."""
        return self.toolchain()


def ship_loader(out: Path, script: str) -> None:
    """Put the script that runs a build without mlopt (``run_tvm.py`` ...) into the build folder
    ``out``, with the runtime package it calls beside it (``mlopt_runtime/``)."""
    shutil.copyfile(runtime.script(script), out / script)
    runtime.ship(out)


def backend_class(name: str) -> type[Backend]:
    """The backend class by name (imports its module only now, never the backend's library)."""
    if name not in BACKENDS:
        raise UnknownName(f"unknown backend {name!r}; choose from {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name (imports its module only now)."""
    return backend_class(name)()


def backend_spec(name: str) -> BackendSpec:
    """The ``BackendSpec`` of backend ``name``."""
    return backend_class(name).spec


def backend_specs() -> list[BackendSpec]:
    """Every backend's spec, in ``BACKENDS`` order."""
    return [backend_spec(n) for n in BACKENDS]


