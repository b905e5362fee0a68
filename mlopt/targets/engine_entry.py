"""Build a TensorRT or MIGraphX engine on the GPU it serves from, cache it, and run it.

mlopt ships this file inside an artifact beside ``model.onnx`` and ``engine_plan.json``. It imports
nothing from mlopt: only the standard library, numpy, the engine library (``tensorrt`` with
``cuda-python`` for device memory, or ROCm's ``migraphx``) and, where present, ``pynvml``
(nvidia-ml-py) to identify the GPU.

    python engine_entry.py build [--cache DIR]               build the engine, or find it cached
    python engine_entry.py run IN.npz OUT.npz [--cache DIR]  run it on the arrays in IN.npz
    python engine_entry.py key                               print the cache key on this machine

The cache (``--cache``, else $MLOPT_ENGINE_CACHE, else /var/cache/mlopt) is meant to be a volume
shared by the replicas on a node. It holds one folder per key: the sha256 of the model digest, the
plan, the GPU's name and architecture, the driver version and the library version, so a driver or
library upgrade builds afresh instead of loading an engine built for something else. A folder
appears whole (built in a temporary folder, then renamed) under a file lock, so replicas starting
together build once; a cached engine whose digests do not match, or that the library cannot load,
is rebuilt. An engine shipped in the artifact's ``engine/`` folder (built where mlopt ran on the
device) is used when its key matches this machine's.

Exit codes: 0 ok, 1 failure, 2 usage, 4 the engine library or a matching GPU is missing.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PLAN_FILE = "engine_plan.json"
SHIPPED_DIR = "engine"
RECORD_FILE = "engine.json"
CACHE_ENV = "MLOPT_ENGINE_CACHE"
DEFAULT_CACHE = "/var/cache/mlopt"
KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")
TRT_ENGINE_FILE = "engine.plan"

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class EngineError(Exception):
    """A failure the entry point reports as a message and an exit code."""

    exit_code = 1


class EngineUnavailable(EngineError):
    """The engine library or a matching GPU is missing here."""

    exit_code = 4


class EngineUnreadable(EngineError):
    """The library cannot load an engine file (corrupt, or built by something else)."""


@dataclass(frozen=True)
class Device:
    """The GPU an engine is built for: what the cache key holds."""

    name: str
    arch: str  # sm_90, gfx942
    driver: str


def _log(message: str) -> None:
    print(f"engine_entry: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ devices
def nvidia_device() -> Device | None:
    """The first visible NVIDIA GPU, through NVML (nvidia-ml-py) or else nvidia-smi."""
    return _nvml_device() or _smi_device()


def _nvml_device() -> Device | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return Device(_text(pynvml.nvmlDeviceGetName(handle)), f"sm_{major}{minor}",
                      _text(pynvml.nvmlSystemGetDriverVersion()))
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _smi_device() -> Device | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
        name, cap, driver = (s.strip() for s in out.strip().splitlines()[0].rsplit(",", 2))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None
    return Device(name, "sm_" + cap.replace(".", ""), driver)


def amd_device(nodes: Path | None = None) -> Device | None:
    """The first AMD GPU in the kfd topology (CPU nodes report gfx_target_version 0)."""
    root = nodes or KFD_NODES
    if not root.is_dir():
        return None
    for node in sorted(root.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        props = _kfd_properties(node / "properties")
        if props.get("gfx_target_version", 0):
            arch = gfx_arch(props["gfx_target_version"])
            return Device(f"AMD {arch} (device 0x{props.get('device_id', 0):04x})", arch, _amdgpu_driver())
    return None


def gfx_arch(version: int) -> str:
    """kfd's gfx_target_version (major*10000 + minor*100 + stepping) as LLVM names it: 90402 -> gfx942."""
    return f"gfx{version // 10000}{version // 100 % 100:x}{version % 100:x}"


def _kfd_properties(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split() for line in lines)
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _amdgpu_driver() -> str:
    version = Path("/sys/module/amdgpu/version")
    if version.is_file():
        return "amdgpu " + version.read_text().strip()
    return "kernel " + os.uname().release  # the in-tree amdgpu driver is versioned by the kernel


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------ plan helpers
def concrete_shapes(plan: dict[str, Any], batch: int) -> dict[str, list[int]]:
    """Each input's shape with the batch axis bound to ``batch`` and other named axes from the plan."""
    bound = {**plan["dims"], plan["batch_axis"]: batch}
    shapes = {}
    for spec in plan["inputs"]:
        missing = [d for d in spec["shape"] if isinstance(d, str) and d not in bound]
        if missing:
            raise EngineError(f"input {spec['name']!r}: the plan gives no size for axis {missing[0]!r}")
        shapes[spec["name"]] = [d if isinstance(d, int) else int(bound[d]) for d in spec["shape"]]
    return shapes


def shape_profile(plan: dict[str, Any]) -> dict[str, dict[str, list[int]]]:
    """TensorRT optimization profile: the smallest batch, then the largest as both opt and max."""
    low, high = min(plan["batches"]), max(plan["batches"])
    small, large = concrete_shapes(plan, low), concrete_shapes(plan, high)
    dynamic = [s["name"] for s in plan["inputs"] if any(isinstance(d, str) for d in s["shape"])]
    return {n: {"min": small[n], "opt": large[n], "max": large[n]} for n in dynamic}


def _batch_of(plan: dict[str, Any], feed: dict[str, np.ndarray]) -> int:
    for spec in plan["inputs"]:
        if plan["batch_axis"] in spec["shape"]:
            return int(feed[spec["name"]].shape[spec["shape"].index(plan["batch_axis"])])
    return int(plan["batches"][0])


def _input_dtypes(plan: dict[str, Any]) -> dict[str, np.dtype]:
    return {s["name"]: np.dtype(s["dtype"]) for s in plan["inputs"]}


# ------------------------------------------------------------------ TensorRT
class TensorRTEngine:
    """TensorRT 10: one serialized engine with an optimization profile over the plan's batches."""

    kind = "tensorrt"
    needs = "the TensorRT 10 Python package and cuda-python: pip install 'tensorrt>=10,<11' cuda-python"
    gpu = "an NVIDIA GPU (run the container with the NVIDIA runtime, e.g. --gpus all)"

    def __init__(self) -> None:
        self.trt = _import("tensorrt", self.needs)
        self.version = str(self.trt.__version__)

    def device(self) -> Device | None:
        return nvidia_device()

    def build(self, plan: dict[str, Any], model: Path, dest: Path, timing: Path) -> list[str]:
        """Parse the ONNX, set precision flags, profile and timing cache; write the serialized engine."""
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {model.name}: {errors}")
        config = self._config(builder, plan)
        self._load_timing_cache(config, timing)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError("TensorRT could not build the engine (its log above says why)")
        (dest / TRT_ENGINE_FILE).write_bytes(bytes(serialized))
        _write_atomic(timing, bytes(config.get_timing_cache().serialize()))
        return [TRT_ENGINE_FILE]

    def _config(self, builder: Any, plan: dict[str, Any]) -> Any:
        trt = self.trt
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan["workspace_bytes"]))
        # TensorRT reads int8 from the model's explicit QuantizeLinear/DequantizeLinear pairs; the
        # INT8 flag lets it pick int8 kernels for them.
        for flag, wanted in (("FP16", plan["precision"]["fp16"]), ("INT8", plan["precision"]["int8"])):
            if wanted:
                config.set_flag(getattr(trt.BuilderFlag, flag))
        if plan["profile"]:
            profile = builder.create_optimization_profile()
            for name, shapes in plan["profile"].items():
                profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
            config.add_optimization_profile(profile)
        return config

    def _load_timing_cache(self, config: Any, timing: Path) -> None:
        data = timing.read_bytes() if timing.is_file() else b""
        try:
            cache = config.create_timing_cache(data)
            ok = config.set_timing_cache(cache, ignore_mismatch=False)
        except (RuntimeError, TypeError, ValueError):
            ok = False
        if not ok:  # unreadable or from another device: start an empty one (the file is replaced after)
            _log(f"timing cache {timing.name} unusable; starting a fresh one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    def runner(self, plan: dict[str, Any], folder: Path) -> Runner:
        return TensorRTRunner(self.trt, (folder / TRT_ENGINE_FILE).read_bytes())


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EngineUnavailable("running a TensorRT engine needs cuda-python for device memory: "
                                    "pip install cuda-python") from None
    return cudart


class TensorRTRunner:
    """Runs a deserialized engine: device buffers from cuda-python, grown on demand and reused."""

    def __init__(self, trt: Any, engine_bytes: bytes) -> None:
        self.trt, self.cudart = trt, _cudart()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        try:
            self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        except RuntimeError as e:
            raise EngineUnreadable(f"TensorRT cannot deserialize the engine: {e}") from None
        if self.engine is None:
            raise EngineUnreadable("TensorRT cannot deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = self._cuda(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        held = [self._put(name, feed[name]) for name in self.inputs]  # alive until the stream syncs
        outs = {name: self._bind_output(name) for name in self.outputs}
        if not self.context.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT execution failed (its log above says why)")
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in outs.items():
            self._cuda(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes, d2h,
                                                   self.stream))
        self._cuda(self.cudart.cudaStreamSynchronize(self.stream))
        del held
        return outs

    def _put(self, name: str, value: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(value, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
        if not self.context.set_input_shape(name, tuple(arr.shape)):
            raise EngineError(f"input {name!r} of shape {tuple(arr.shape)} is outside the engine's profile "
                              f"(min, opt, max: {self.engine.get_tensor_profile_shape(name, 0)})")
        ptr = self._buffer(name, arr.nbytes)
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._cuda(self.cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
        self.context.set_tensor_address(name, ptr)
        return arr

    def _bind_output(self, name: str) -> np.ndarray:
        shape = tuple(self.context.get_tensor_shape(name))
        host = np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
        self.context.set_tensor_address(name, self._buffer(name, host.nbytes))
        return host

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                self._cuda(self.cudart.cudaFree(ptr))
            ptr, size = int(self._cuda(self.cudart.cudaMalloc(max(nbytes, 1)))), max(nbytes, 1)
            self.buffers[name] = (ptr, size)
        return ptr

    def _cuda(self, result: tuple[Any, ...]) -> Any:
        err, *values = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA call failed: {err}")
        return values[0] if len(values) == 1 else values

    def close(self) -> None:
        """Free the device buffers and the stream."""
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers = {}
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        with suppress(Exception):  # at interpreter exit the CUDA bindings may already be gone
            self.close()


# ------------------------------------------------------------------ MIGraphX
class MIGraphXEngine:
    """MIGraphX: one compiled program per planned batch size (static shapes compile best)."""

    kind = "migraphx"
    needs = ("MIGraphX's Python module, which comes with ROCm, not PyPI: apt-get install migraphx, "
             "then PYTHONPATH=/opt/rocm/lib")
    gpu = "an AMD GPU (run the container with /dev/kfd and /dev/dri)"

    def __init__(self) -> None:
        self.mgx = _import("migraphx", self.needs)
        # builds from source report "dev": the ROCm release tells such builds apart in the cache key
        self.version = f"{getattr(self.mgx, '__version__', 'unknown')}+rocm{rocm_version()}"

    def device(self) -> Device | None:
        return amd_device()

    def build(self, plan: dict[str, Any], model: Path, dest: Path, timing: Path) -> list[str]:
        """Parse, quantize to fp16 where planned, compile for the GPU and save, per batch size."""
        mgx, names = self.mgx, []
        for batch in plan["batches"]:
            prog = mgx.parse_onnx(str(model), map_input_dims=concrete_shapes(plan, batch))
            if plan["precision"]["fp16"]:
                mgx.quantize_fp16(prog)
            # int8 needs no call: MIGraphX lowers the model's QuantizeLinear/DequantizeLinear itself
            prog.compile(mgx.get_target("gpu"), offload_copy=True)
            names.append(f"batch{batch}.mxr")
            mgx.save(prog, str(dest / names[-1]))
        return names

    def runner(self, plan: dict[str, Any], folder: Path) -> Runner:
        progs = {}
        for batch in plan["batches"]:
            try:
                progs[int(batch)] = self.mgx.load(str(folder / f"batch{batch}.mxr"))
            except RuntimeError as e:
                raise EngineUnreadable(f"MIGraphX cannot load batch{batch}.mxr: {e}") from None
        dtypes = _input_dtypes(plan)

        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            batch = _batch_of(plan, feed)
            if batch not in progs:
                raise EngineError(f"no MIGraphX program for batch {batch}; the plan compiled {sorted(progs)}")
            args = {n: self.mgx.argument(np.ascontiguousarray(feed[n], dtype=t)) for n, t in dtypes.items()}
            outs = progs[batch].run(args)
            return {n: np.array(o) for n, o in zip(plan["outputs"], outs)}

        return run


def rocm_version() -> str:
    """The ROCm release this machine has (its .info/version file), or "unknown"."""
    info = Path(os.environ.get("ROCM_PATH", "/opt/rocm")) / ".info" / "version"
    return info.read_text().strip() if info.is_file() else "unknown"


ENGINES: dict[str, type] = {"tensorrt": TensorRTEngine, "migraphx": MIGraphXEngine}


def _import(module: str, needs: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineUnavailable(f"{module} is not importable ({e}); this build needs {needs}") from None


# ------------------------------------------------------------------ cache
@dataclass(frozen=True)
class Context:
    """Everything one engine depends on, and the cache key naming it."""

    root: Path
    plan: dict[str, Any]
    engine: Any
    device: Device
    key: str


def load_plan(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / PLAN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {root / PLAN_FILE}: {e}") from None


def cache_key(plan: dict[str, Any], device: Device, library_version: str) -> str:
    """sha256 of the model digest, the plan, the GPU, its driver and the library version."""
    blob = {"model": plan["model"]["digest"], "plan": plan, "gpu": device.name, "arch": device.arch,
            "driver": device.driver, "library": f"{plan['engine']} {library_version}"}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def prepare(root: Path) -> Context:
    """Read the plan, import the library, find the GPU and compute the key (no building)."""
    plan = load_plan(root)
    if plan.get("engine") not in ENGINES:
        raise EngineError(f"{PLAN_FILE} names engine {plan.get('engine')!r}; this entry knows {sorted(ENGINES)}")
    engine = ENGINES[plan["engine"]]()
    _check_library(plan, engine.version)
    device = engine.device()
    if device is None:
        raise EngineUnavailable(f"no GPU found; building this {plan['engine']} engine needs {engine.gpu}")
    if device.arch != plan["target"]["arch"]:
        _log(f"warning: this plan is for {plan['target']['arch']} GPUs; this GPU is {device.name} "
             f"({device.arch}). Building for this GPU; mlopt's figures are for the plan's architecture.")
    return Context(root, plan, engine, device, cache_key(plan, device, engine.version))


def _check_library(plan: dict[str, Any], version: str) -> None:
    majors = plan["library"].get("majors") or []
    major = version.split(".")[0]
    if majors and (not major.isdigit() or int(major) not in majors):
        raise EngineUnavailable(f"{plan['engine']} {version} is installed; this plan needs "
                                f"{plan['library']['requires']} ({plan['library'].get('why', '')})")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def intact(folder: Path, key: str) -> bool:
    """Whether ``folder`` holds a whole engine for ``key`` whose files match their digests."""
    record = _record(folder)
    if record is None or record.get("key") != key:
        return False
    try:
        return all(file_sha256(folder / name) == digest for name, digest in record["files"].items())
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock: released by the kernel if the holder dies, so no stale locks."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_model(ctx: Context) -> None:
    for name, digest in ctx.plan["model"]["files"].items():
        path = ctx.root / name
        if not path.is_file() or file_sha256(path) != digest:
            raise EngineError(f"{name} is missing or differs from the model the plan was made for")


def build_into(ctx: Context, folder: Path, timing_dir: Path) -> Path:
    """Build the engine into a temporary folder beside ``folder``, then rename it into place."""
    _check_model(ctx)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{ctx.key[:12]}-", dir=folder.parent))
    try:
        _log(f"building the {ctx.plan['engine']} engine for {ctx.device.name} ({ctx.device.arch}) ...")
        t0 = time.perf_counter()
        timing = timing_dir / f"{ctx.plan['engine']}-{ctx.engine.version}-{ctx.device.arch}.timing"
        names = ctx.engine.build(ctx.plan, ctx.root / ctx.plan["model"]["file"], tmp, timing)
        seconds = round(time.perf_counter() - t0, 3)
        record = {"key": ctx.key, "build_id": uuid.uuid4().hex, "files": {n: file_sha256(tmp / n) for n in names},
                  "device": asdict(ctx.device), "library": ctx.engine.version, "build_seconds": seconds}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"built in {seconds} s: {folder}")
    return folder


def ensure_engine(ctx: Context, cache: Path, use_shipped: bool = True) -> tuple[Path, bool]:
    """The folder of an intact engine for this machine, building it once; and whether it was built now."""
    shipped = ctx.root / SHIPPED_DIR
    if use_shipped and intact(shipped, ctx.key):
        return shipped, False
    folder = cache / ctx.key
    if intact(folder, ctx.key):
        return folder, False
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineError(f"cannot create the engine cache {cache}: {e}; mount a writable volume there "
                          f"or set {CACHE_ENV}") from None
    with _locked(cache / f"{ctx.key}.lock"):
        if intact(folder, ctx.key):  # another replica built it while this one waited
            return folder, False
        return build_into(ctx, folder, cache / "timing"), True


def _discard(folder: Path, build_id: str | None, cache: Path, key: str) -> None:
    """Remove an unreadable cached engine, unless another replica has replaced it meanwhile."""
    with _locked(cache / f"{key}.lock"):
        record = _record(folder)
        if record is not None and record.get("build_id") == build_id:
            shutil.rmtree(folder)


def open_engine(ctx: Context, cache: Path) -> tuple[Runner, Path, bool]:
    """A runner for this machine's engine, rebuilding a cached one the library cannot load."""
    folder, built = ensure_engine(ctx, cache)
    try:
        return ctx.engine.runner(ctx.plan, folder), folder, built
    except EngineUnreadable as e:
        if built:
            raise
        _log(f"{e}; rebuilding")
        if folder.parent == cache:
            _discard(folder, (_record(folder) or {}).get("build_id"), cache, ctx.key)
        folder, built = ensure_engine(ctx, cache, use_shipped=False)
        return ctx.engine.runner(ctx.plan, folder), folder, built


def open_runner(root: Path, cache: Path | None = None) -> Runner:
    """The callable a server uses: feed dict in, output dict out."""
    return open_engine(prepare(root), cache or default_cache())[0]


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


# ------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine_entry.py", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, default=Path(__file__).resolve().parent,
                   help="folder holding engine_plan.json and the model (default: this file's folder)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("build", "build the engine, or find it in the cache"), ("run", "run the engine"),
                       ("key", "print the cache key for this machine")):
        cmd = sub.add_parser(name, help=text)
        if name == "run":
            cmd.add_argument("inputs", type=Path, help=".npz of the model's inputs")
            cmd.add_argument("outputs", type=Path, help=".npz to write the outputs to")
        if name != "key":
            cmd.add_argument("--cache", type=Path, default=None,
                             help=f"engine cache folder (default: ${CACHE_ENV} or {DEFAULT_CACHE})")
    return p


def _command(args: argparse.Namespace) -> None:
    ctx = prepare(args.artifact)
    if args.command == "key":
        print(ctx.key)
        return
    runner, folder, built = open_engine(ctx, args.cache or default_cache())
    if args.command == "build":
        print(json.dumps({"key": ctx.key, "engine": str(folder), "built": built}))
        return
    with np.load(args.inputs) as data:
        feed = {k: data[k] for k in data.files}
    np.savez(args.outputs, **runner(feed))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors become one message on stderr and an exit code."""
    args = _parser().parse_args(argv)
    try:
        _command(args)
    except EngineError as e:
        print(f"engine_entry: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
