"""TensorRT and MIGraphX: engines that must be built on the GPU they run on.

Where the library and a GPU of the SKU's architecture are here, the engine is built now, shipped in
the artifact's ``engine/`` folder, and validated and measured here. Where they are not, the build
for the SKU is a JIT build plan: ``model.onnx``, ``engine_plan.json`` (precision flags, shape
profile, workspace, library requirement) and ``engine_entry.py``, which builds the engine when the
serving container first starts on the SKU and caches it on a volume keyed by GPU, driver and library
version. Such a build is recorded as ``compiled: on-device`` and has no figures until measured
there; no engine and no number is made up here.

Both paths run the same builder code: the backend's runtime loader ``mlopt.runtime.engines``
(which imports nothing else from mlopt, because it ships into the artifact as ``mlopt_runtime/``,
beside the ``engine_entry.py`` script that calls it, and runs in the serving container).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from mlopt.core.files import sha256_file
from mlopt.core.model import onnx_files
from mlopt.core.errors import BackendUnavailable, BadInput
from mlopt.runtime import engines as entry, gpus
from mlopt.runtime.migraphx import rocm_version
from mlopt.targets.backends import (
    Availability,
    Backend,
    BackendSpec,
    BuildRequest,
    Runner,
    TritonRuntime,
    package_version,
    ship_loader,
)
from mlopt.targets.catalog import SKU

PLAN_VERSION = 1
MODEL_FILE = "model.onnx"
ENTRY_FILE = "engine_entry.py"
WORKSPACE_BYTES = 4 << 30  # TensorRT's scratch-memory ceiling while choosing kernels
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
DETECTORS = {"tensorrt": gpus.nvidia_device, "migraphx": gpus.amd_device}
ORT_THREADS = ("intra_op_thread_count",), (("inter_op_thread_count", "1"),)  # Triton runs them on ONNX Runtime
TENSORRT = BackendSpec(
    name="tensorrt", loader="engines", jit=True,
    packages={"tensorrt": "tensorrt", "tensorrt-cu13": "tensorrt", "tensorrt-cu12": "tensorrt", "cuda-python": "cuda"},
    triton=TritonRuntime("platform", "onnxruntime_onnx", ("model.onnx",), "model.onnx", "tensorrt", *ORT_THREADS),
    doctor=("tensorrt",),
)
# MIGraphX comes with ROCm, not PyPI; as an ONNX Runtime accelerator it needs ROCm's build of
# Triton's ONNX Runtime backend.
MIGRAPHX = BackendSpec(
    name="migraphx", loader="engines", jit=True, packages={}, modules=("migraphx",),
    triton=TritonRuntime("platform", "onnxruntime_onnx", ("model.onnx",), "model.onnx", "migraphx", *ORT_THREADS),
    doctor=("migraphx",),
)


@cache
def local_device(kind: str) -> gpus.Device | None:
    """This machine's GPU as the entry point sees it (cached: detection may run nvidia-smi)."""
    return DETECTORS[kind]()


def library_present(module: str) -> bool:
    """Whether ``module`` is importable, without importing it."""
    return importlib.util.find_spec(module) is not None


def engine_cache() -> Path:
    """Where engines built by ``load`` on this machine are cached."""
    return Path(os.environ.get(entry.CACHE_ENV) or Path.home() / ".cache" / "mlopt" / "engines")


def has_qdq(onnx_path: Path) -> bool:
    """Whether the model carries explicit int8 quantization (QuantizeLinear/DequantizeLinear)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type in QDQ_OPS for node in proto.graph.node)


def precision_name(flags: dict[str, bool]) -> str:
    """``int8+float16``, ``float16``, ``int8`` or ``float32`` from the plan's precision flags."""
    parts = (["int8"] if flags["int8"] else []) + (["float16"] if flags["fp16"] else [])
    return "+".join(parts) or "float32"


def copy_model(src: Path, out: Path) -> dict[str, str]:
    """Copy the ONNX file (as model.onnx) and its external data into ``out``; return their sha256."""
    files = {}
    for k, path in enumerate(onnx_files(src)):
        rel = Path(MODEL_FILE) if k == 0 else path.resolve().relative_to(src.parent.resolve())
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        files[rel.as_posix()] = sha256_file(dest)
    return files


class EngineBackend(Backend):
    """A backend whose engine is built by ``engine_entry`` on a GPU of the SKU's architecture."""

    vendor: ClassVar[str]
    kind: ClassVar[str]  # mlopt.runtime.engines.ENGINES key
    gpu: ClassVar[str]
    formats: ClassVar[dict[str, str]]  # by how it is compiled: here / on-device
    library: ClassVar[dict[str, Any]]  # the library the plan needs on the device (the entry checks "majors")

    def availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        if sku.vendor != self.vendor or not sku.needs_gpu:
            return Availability("no", False, f"{self.name} builds engines for {self.vendor} GPUs; "
                                f"{sku.name} is a {sku.vendor} {sku.kind}")
        missing = self.missing_here(sku)
        if missing:
            return Availability("on-device", False, f"JIT build plan: the {self.name} engine is built when the "
                                f"container first starts on a {sku.name} ({missing}); no figures until measured there")
        return Availability("here", True)

    def missing_here(self, sku: SKU) -> str:
        """Why the engine cannot be built here for ``sku`` (empty when it can)."""
        absent = [m for m in self.spec.run_modules if not library_present(m)]
        if absent:
            return f"{', '.join(absent)} not installed here"
        device = local_device(self.kind)
        if device is None:
            return f"this machine has no {self.gpu}"
        if device.arch != sku.arch:
            return f"this machine's GPU is {device.name} ({device.arch}), not {sku.arch}"
        return ""

    # ------------------------------------------------------------ build
    def build(self, req: BuildRequest, out: Path) -> dict[str, Any]:
        files = copy_model(req.model.onnx_path, out)
        plan = self.plan(req, files, has_qdq(req.model.onnx_path))
        (out / entry.PLAN_FILE).write_text(json.dumps(plan, indent=2))
        ship_loader(out, ENTRY_FILE)
        # device_present is set from availability(): "here" only with the library and a matching GPU
        compiled = "here" if req.device_present else "on-device"
        if compiled == "here":
            self._build_now(out, req.tuning_dir / "engines")
        details = {"compiled": compiled, "engine": self.kind, "target": plan["target"],
                   "precision": plan["precision"], "batches": plan["batches"], "library": plan["library"],
                   "build_command": f"python {ENTRY_FILE} build",
                   "cache": f"${entry.CACHE_ENV} (default {entry.DEFAULT_CACHE}), one engine per GPU, driver and "
                            "library version"}
        return {"precision": precision_name(plan["precision"]), "entry": ENTRY_FILE, "plan": entry.PLAN_FILE,
                "format": self.formats[compiled], "details": {**details, **self.plan_details(plan)}}

    def plan(self, req: BuildRequest, files: dict[str, str], qdq: bool) -> dict[str, Any]:
        """The engine plan: everything the entry point needs to build the engine on the device."""
        axes = {d for spec in req.model.inputs for d in spec.shape if isinstance(d, str)}
        plan = {
            "plan_version": PLAN_VERSION, "engine": self.kind,
            # the architecture, not the SKU's name: SKUs of one architecture share a build (and its key)
            "target": {"vendor": req.sku.vendor, "arch": req.sku.arch},
            "model": {"file": MODEL_FILE, "digest": req.model.digest, "files": files},
            "inputs": [spec.model_dump() for spec in req.model.inputs], "outputs": list(req.model.outputs),
            "batch_axis": req.batch_axis, "batches": sorted(set(req.batch_sizes)),
            "dims": {k: v for k, v in sorted(req.dims.items()) if k in axes and k != req.batch_axis},
            # axes real traffic varies: the engine accepts every size in the range (TensorRT's profile,
            # MIGraphX's dynamic dimensions); the others are fixed at their benchmark size
            "ranges": {k: {"min": lo, "opt": opt, "max": hi} for k, (lo, opt, hi) in sorted(req.ranges.items())
                       if k in axes and k != req.batch_axis},
            # int8 follows the model: the engines read explicit QDQ, they do not calibrate
            "precision": {"fp16": "float16" in req.sku.dtypes, "int8": qdq},
            "library": dict(self.library),
        }
        try:
            for batch in plan["batches"]:
                entry.concrete_shapes(plan, batch)
        except entry.EngineError as e:
            raise BadInput(str(e), hint="give the axis a size in the recipe's benchmark.dims") from None
        return self.extend_plan(plan)

    def extend_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Engine-specific plan fields."""
        return plan

    def plan_details(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Engine-specific facts for the manifest's candidate details."""
        return {}

    def _build_now(self, out: Path, timing_dir: Path) -> None:
        try:
            ctx = entry.prepare(out)
            entry.build_into(ctx, out / entry.SHIPPED_DIR, timing_dir)
        except entry.EngineError as e:
            raise BackendUnavailable(f"{self.name}: {e}") from None

    # ------------------------------------------------------------ run
    def open(self, artifact: Path, meta: dict[str, Any], threads: int) -> Runner:
        """The runtime loader, with this machine's engine cache (not the serving containers' volume)."""
        try:
            return entry.load(artifact, {**meta, "engine_cache": str(engine_cache())}, threads)
        except entry.EngineError as e:
            raise BackendUnavailable(f"{self.name}: {e}") from None


class TensorRTBackend(EngineBackend):
    name = "tensorrt"
    spec = TENSORRT
    vendor = "nvidia"
    kind = "tensorrt"
    gpu = "NVIDIA GPU"
    formats: ClassVar[dict[str, str]] = {"here": "tensorrt-plan", "on-device": "tensorrt-plan-jit"}
    library: ClassVar[dict[str, Any]] = {
        "package": "tensorrt", "requires": "tensorrt>=10,<11", "majors": [10], "runtime": "cuda-python",
        "why": "TensorRT 11 removed the FP16/INT8 builder flags (weak typing) this plan uses"}

    def extend_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        return {**plan, "profile": entry.shape_profile(plan), "workspace_bytes": WORKSPACE_BYTES}

    def plan_details(self, plan: dict[str, Any]) -> dict[str, Any]:
        return {"profile": plan["profile"], "workspace_bytes": plan["workspace_bytes"]}

    def toolchain(self) -> dict[str, str]:
        found = [package_version(p) for p in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")]
        return {"tensorrt": next((v for v in found if v != "absent"), "absent"),
                "cuda-python": package_version("cuda-python")}


class MIGraphXBackend(EngineBackend):
    name = "migraphx"
    spec = MIGRAPHX
    vendor = "amd"
    kind = "migraphx"
    gpu = "AMD GPU"
    formats: ClassVar[dict[str, str]] = {"here": "migraphx-program", "on-device": "migraphx-jit"}
    library: ClassVar[dict[str, Any]] = {"package": "migraphx", "requires": "MIGraphX from ROCm", "majors": [],
                                         "note": "comes with ROCm (apt-get install migraphx), not from PyPI"}

    def toolchain(self) -> dict[str, str]:
        return {"migraphx": rocm_version() if library_present("migraphx") else "absent"}
