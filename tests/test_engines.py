"""TensorRT and MIGraphX engines: availability, JIT build plans, and the shipped entry point.

tensorrt and migraphx are absent here, so the entry point runs against small fakes of the API subset
it uses (written below into a folder on the path): a fake build records itself and "serializes" an
engine holding the ONNX model and the build settings; a fake run evaluates that ONNX with
onnxruntime through fake device memory, so numerics can be checked. Tests marked ``gpu`` use the
real library on a real GPU and are skipped elsewhere.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_onnx

from mlopt.core.model import Model, file_digest
from mlopt.recipes.schema import InputSpec
from mlopt import runtime
from mlopt.runtime import engines as entry, gpus
from mlopt.runtime.files import sha256_file
from mlopt.targets import engines
from mlopt.targets.backends import Availability, BuildRequest, get_backend
from mlopt.targets.catalog import load_catalog

FAKE_TENSORRT = '''
"""Fake TensorRT 10 (the subset engine_entry uses)."""
import base64, ctypes, json, os, time
import numpy as np
import onnx, onnxruntime as ort

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.13.3.9")
MAGIC = b"FAKETRT\\n"
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


class Logger:
    WARNING = 2
    def __init__(self, severity=2):
        self.severity = severity

class BuilderFlag:
    FP16, INT8 = "FP16", "INT8"

class MemoryPoolType:
    WORKSPACE = "WORKSPACE"

class TensorIOMode:
    INPUT, OUTPUT = "INPUT", "OUTPUT"

def nptype(dtype):
    return np.dtype(dtype).type

class _TimingCache:
    def __init__(self, data):
        self.data = bytes(data)
    def serialize(self):
        return self.data + b"timing-entry\\n"

class _Profile:
    def __init__(self):
        self.shapes = {}
    def set_shape(self, name, min, opt, max):
        self.shapes[name] = [list(min), list(opt), list(max)]

class _Config:
    def __init__(self):
        self.flags, self.pools, self.profiles, self.timing = set(), {}, [], None
    def set_flag(self, flag):
        self.flags.add(flag)
    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size
    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1
    def create_timing_cache(self, data):
        return _TimingCache(data)
    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache
        return True
    def get_timing_cache(self):
        return self.timing

class _Network:
    model = None

class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []
    def parse_from_file(self, path):
        try:
            self.network.model = onnx.load(path).SerializeToString()
        except Exception as e:
            self.errors.append(str(e))
            return False
        return True
    @property
    def num_errors(self):
        return len(self.errors)
    def get_error(self, i):
        return self.errors[i]

class Builder:
    def __init__(self, logger):
        pass
    def create_network(self, flags=0):
        return _Network()
    def create_builder_config(self):
        return _Config()
    def create_optimization_profile(self):
        return _Profile()
    def build_serialized_network(self, network, config):
        if os.environ.get("FAKE_TRT_LOG"):
            with open(os.environ["FAKE_TRT_LOG"], "a") as f:
                f.write(f"{os.getpid()}\\n")
        time.sleep(float(os.environ.get("FAKE_TRT_BUILD_SECONDS", "0")))
        header = {"flags": sorted(config.flags), "workspace": config.pools.get("WORKSPACE"),
                  "profiles": [p.shapes for p in config.profiles], "timing_in": len(config.timing.data)}
        return MAGIC + json.dumps(header).encode() + b"\\n" + base64.b64encode(network.model)

class Runtime:
    def __init__(self, logger):
        pass
    def deserialize_cuda_engine(self, data):
        if not bytes(data).startswith(MAGIC):
            return None
        header, model = bytes(data)[len(MAGIC):].split(b"\\n", 1)
        return _Engine(json.loads(header), base64.b64decode(model))

class _Engine:
    def __init__(self, header, model):
        self.header, self.sess = header, ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.ins = {i.name: i for i in self.sess.get_inputs()}
        self.outs = {o.name: o for o in self.sess.get_outputs()}
        self.names = list(self.ins) + list(self.outs)
        self.num_io_tensors = len(self.names)
    def get_tensor_name(self, i):
        return self.names[i]
    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.ins else TensorIOMode.OUTPUT
    def get_tensor_dtype(self, name):
        return ORT_TYPES[(self.ins.get(name) or self.outs[name]).type]
    def get_tensor_profile_shape(self, name, index):
        return self.header["profiles"][index][name]
    def create_execution_context(self):
        return _Context(self)

class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}
    def set_input_shape(self, name, shape):
        profiles = self.engine.header["profiles"]
        if profiles and name in profiles[0]:
            low, _, high = profiles[0][name]
            if any(s < a or s > b for s, a, b in zip(shape, low, high)):
                return False
        self.shapes[name] = tuple(shape)
        return True
    def _feed(self, read):
        feed = {}
        for name, shape in self.shapes.items():
            dtype = np.dtype(self.engine.get_tensor_dtype(name))
            size = int(np.prod(shape)) * dtype.itemsize
            data = ctypes.string_at(self.addresses[name], size) if read else bytes(size)
            feed[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        return feed
    def get_tensor_shape(self, name):
        return self.engine.sess.run([name], self._feed(read=False))[0].shape
    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
    def execute_async_v3(self, stream_handle):
        outs = self.engine.sess.run(list(self.engine.outs), self._feed(read=True))
        for name, value in zip(self.engine.outs, outs):
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True
'''

FAKE_CUDART = '''
"""Fake cuda-python runtime: "device" memory is host memory."""
import ctypes

class cudaError_t:
    cudaSuccess = 0

class cudaMemcpyKind:
    cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

_memory = {}

def cudaMalloc(size):
    buf = ctypes.create_string_buffer(size)
    _memory[ctypes.addressof(buf)] = buf
    return 0, ctypes.addressof(buf)

def cudaFree(ptr):
    _memory.pop(ptr, None)
    return (0,)

def cudaStreamCreate():
    return 0, 7

def cudaStreamDestroy(stream):
    return (0,)

def cudaMemcpyAsync(dst, src, count, kind, stream):
    ctypes.memmove(dst, src, count)
    return (0,)

def cudaStreamSynchronize(stream):
    return (0,)
'''

FAKE_PYNVML = '''
"""Fake NVML: one GPU described by FAKE_GPU_NAME / FAKE_GPU_CC / FAKE_DRIVER, none when unset."""
import os

class NVMLError(Exception):
    pass

def nvmlInit():
    if not os.environ.get("FAKE_GPU_NAME"):
        raise NVMLError("NVML Shared Library Not Found")

def nvmlShutdown():
    pass

def nvmlDeviceGetCount():
    return 1

def nvmlDeviceGetHandleByIndex(index):
    return index

def nvmlDeviceGetName(handle):
    return os.environ["FAKE_GPU_NAME"]

def nvmlDeviceGetCudaComputeCapability(handle):
    major, minor = os.environ.get("FAKE_GPU_CC", "9.0").split(".")
    return int(major), int(minor)

def nvmlSystemGetDriverVersion():
    return os.environ.get("FAKE_DRIVER", "580.65.06")
'''

FAKE_MIGRAPHX = '''
"""Fake MIGraphX (the subset engine_entry uses): programs are ONNX run by onnxruntime."""
import base64, json, os
import numpy as np
import onnx, onnxruntime as ort

__version__ = os.environ.get("FAKE_MIGRAPHX_VERSION", "2.12.0")
MAGIC = b"FAKEMXR\\n"

class argument:
    def __init__(self, data):
        self.data = np.array(data)
    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

class _Target:
    def __init__(self, name):
        self.name = name

def get_target(name):
    return _Target(name)

class shape:
    class dynamic_dimension:
        def __init__(self, min, max, optimals=()):
            self.min, self.max, self.optimals = min, max, set(optimals)

class program:
    def __init__(self, model, dims, fp16=False, target=None):
        self.model, self.dims, self.fp16, self.target = model, dims, fp16, target
    def compile(self, t, offload_copy=True):
        self.target = t.name
    def run(self, params):
        for name, dims in self.dims.items():
            got = list(np.array(params[name]).shape)
            if dims and isinstance(dims[0], list):  # dynamic: [min, max, optimals] per dimension
                assert len(got) == len(dims) and all(lo <= g <= hi for g, (lo, hi, _) in zip(got, dims)), (name, dims)
            else:
                assert got == list(dims), (name, dims)
        sess = ort.InferenceSession(self.model, providers=["CPUExecutionProvider"])
        return [argument(o) for o in sess.run(None, {k: np.array(v) for k, v in params.items()})]

def parse_onnx(filename, default_dim_value=1, map_input_dims=None, skip_unknown_operators=False,
               print_program_on_error=False, map_dyn_input_dims=None):
    dims = dict(map_input_dims or {})
    dims.update({n: [[d.min, d.max, sorted(d.optimals)] for d in ds] for n, ds in (map_dyn_input_dims or {}).items()})
    if os.environ.get("FAKE_MGX_LOG"):
        with open(os.environ["FAKE_MGX_LOG"], "a") as f:
            f.write(json.dumps(dims) + "\\n")
    return program(onnx.load(filename).SerializeToString(), dims)

def quantize_fp16(prog, ins_names=("all",)):
    prog.fp16 = True

def save(p, filename, format="msgpack"):
    header = {"dims": p.dims, "fp16": p.fp16, "target": p.target}
    with open(filename, "wb") as f:
        f.write(MAGIC + json.dumps(header).encode() + b"\\n" + base64.b64encode(p.model))

def load(filename, format="msgpack"):
    data = open(filename, "rb").read()
    if not data.startswith(MAGIC):
        raise RuntimeError("Invalid MIGraphX program file")
    header, model = data[len(MAGIC):].split(b"\\n", 1)
    header = json.loads(header)
    return program(base64.b64decode(model), header["dims"], header["fp16"], header["target"])
'''

POISON_MLOPT = 'raise ImportError("engine_entry.py must not import mlopt")\n'
FAKE_NAMES = ["tensorrt", "pynvml", "cuda", "cuda.bindings", "cuda.bindings.runtime", "migraphx"]
H100_ENV = {"FAKE_GPU_NAME": "NVIDIA H100 80GB HBM3", "FAKE_GPU_CC": "9.0", "FAKE_DRIVER": "580.65.06"}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with fake tensorrt, cuda-python, pynvml and migraphx, and a poisoned mlopt beside it."""
    root = tmp_path_factory.mktemp("fakes")
    for rel, text in {"tensorrt/__init__.py": FAKE_TENSORRT, "cuda/__init__.py": "",
                      "cuda/bindings/__init__.py": "", "cuda/bindings/runtime.py": FAKE_CUDART,
                      "pynvml.py": FAKE_PYNVML, "migraphx.py": FAKE_MIGRAPHX,
                      "poison/mlopt/__init__.py": POISON_MLOPT}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def fake_libs(fakes: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the fakes on this process's path (the real pynvml is shadowed too)."""
    for name in FAKE_NAMES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(fakes))
    for key, value in H100_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(gpus, "_smi_device", lambda: None)  # a real nvidia-smi must not answer
    detect = engines.local_device
    detect.cache_clear()
    yield fakes
    for name in FAKE_NAMES:
        sys.modules.pop(name, None)
    detect.cache_clear()


@pytest.fixture
def kfd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kfd topology with a CPU node and an MI300X (gfx942)."""
    nodes = tmp_path / "kfd"
    for node, text in {"0": "cpu_cores_count 96\ngfx_target_version 0\n",
                       "1": "simd_count 1216\ngfx_target_version 90402\ndevice_id 29857\n"}.items():
        (nodes / node).mkdir(parents=True)
        (nodes / node / "properties").write_text(text)
    monkeypatch.setattr(gpus, "KFD_NODES", nodes)
    return nodes


def model_of(path: Path, shape: tuple = ("batch", 4)) -> Model:
    spec = InputSpec(name="x", shape=list(shape), dtype="float32")
    return Model(name="tiny", onnx_path=path, inputs=(spec,), outputs=("y",), digest=file_digest(path))


def request(model: Model, sku_name: str, tmp: Path, device_present: bool = False, dims: dict | None = None,
            ranges: dict | None = None) -> BuildRequest:
    return BuildRequest(model=model, sku=load_catalog().get(sku_name), threads=1, tuning_trials=0,
                        tuning_timeout_s=60, tuning_dir=tmp / "tuning", batch_axis="batch", dims=dims or {},
                        batch_sizes=(1, 4), device_present=device_present, ranges=ranges or {})


def seq_onnx(path: Path) -> Path:
    """x[batch, seq] -> Relu -> y[batch, seq]: a model whose second axis real traffic varies."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "seq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def build_artifact(tmp: Path, backend: str, sku: str, model: Path | None = None, shape: tuple = ("batch", 4),
                   **kw) -> tuple[Path, dict]:
    out = tmp / f"artifact-{backend}-{sku}"
    out.mkdir()
    meta = get_backend(backend).build(request(model_of(model or tiny_onnx(tmp / "tiny.onnx"), shape), sku, tmp, **kw),
                                      out)
    return out, meta


def qdq_onnx(path: Path) -> Path:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul(W) -> y: explicit int8 quantization."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(np.ones((4, 3), np.float32), "W")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("MatMul", ["d", "W"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def reference(onnx_path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, feed))}


def run_entry(artifact: Path, fakes: Path, *args: str, env: dict[str, str] | None = None,
              with_fakes: bool = True) -> subprocess.CompletedProcess:
    """Run the shipped engine_entry.py as the container would: its own folder, no mlopt importable."""
    path = [str(fakes / "poison")] + ([str(fakes)] if with_fakes else [])
    full = {"PATH": os.path.dirname(sys.executable), "PYTHONPATH": os.pathsep.join(path), "HOME": str(artifact),
            **(H100_ENV if with_fakes else {}), **(env or {})}
    return subprocess.run([sys.executable, str(artifact / "engine_entry.py"), *args], capture_output=True,
                          text=True, env=full, cwd=artifact, timeout=120, check=False)


def build_count(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


# ------------------------------------------------------------------ availability
def test_availability_is_on_device_without_library_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = load_catalog()
    monkeypatch.setattr(engines, "library_present", lambda module: False)
    trt = get_backend("tensorrt").availability(catalog.get("h100"), host_runs_sku=False)
    assert trt.build == "on-device" and trt.run is False
    assert "JIT build plan" in trt.reason and "h100" in trt.reason and "tensorrt" in trt.reason
    mgx = get_backend("migraphx").availability(catalog.get("mi300x"), host_runs_sku=False)
    assert mgx.build == "on-device" and "migraphx not installed" in mgx.reason

    monkeypatch.setattr(engines, "library_present", lambda module: True)
    monkeypatch.setattr(engines, "local_device", lambda kind: None)
    assert "no NVIDIA GPU" in get_backend("tensorrt").availability(catalog.get("h100"), False).reason
    a100 = entry.Device("NVIDIA A100-SXM4-80GB", "sm_80", "580.65.06")
    monkeypatch.setattr(engines, "local_device", lambda kind: a100)
    wrong = get_backend("tensorrt").availability(catalog.get("h100"), False)
    assert wrong.build == "on-device" and "sm_80, not sm_90" in wrong.reason.replace("(", "").replace(")", "")


def test_availability_is_here_with_library_and_matching_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "library_present", lambda module: True)
    monkeypatch.setattr(engines, "local_device", lambda kind: entry.Device("NVIDIA H200", "sm_90", "580.65.06"))
    assert get_backend("tensorrt").availability(load_catalog().get("h100"), False) == Availability("here", True)


def test_engines_serve_only_their_vendor() -> None:
    catalog = load_catalog()
    for backend, sku in [("tensorrt", "mi300x"), ("migraphx", "h100"), ("tensorrt", "cpu-x86-64-v4"),
                         ("migraphx", "max-1550")]:
        avail = get_backend(backend).availability(catalog.get(sku), host_runs_sku=False)
        assert avail.build == "no" and avail.run is False and sku in avail.reason


def test_local_gpu_detection_reads_kfd_and_nvml(fake_libs: Path, kfd: Path) -> None:
    assert entry.amd_device() == entry.Device("AMD gfx942 (device 0x74a1)", "gfx942", gpus._amdgpu_driver())
    assert entry.nvidia_device() == entry.Device("NVIDIA H100 80GB HBM3", "sm_90", "580.65.06")
    assert [entry.gfx_arch(v) for v in (90402, 90010, 110000, 100300)] == ["gfx942", "gfx90a", "gfx1100", "gfx1030"]


# ------------------------------------------------------------------ JIT plans
def test_h100_build_is_a_tensorrt_jit_plan(tmp_path: Path) -> None:
    out, meta = build_artifact(tmp_path, "tensorrt", "h100")
    assert sorted(p.name for p in out.iterdir()) == ["engine_entry.py", "engine_plan.json", "mlopt_runtime", "model.onnx"]
    assert meta["format"] == "tensorrt-plan-jit" and meta["entry"] == "engine_entry.py"
    assert meta["precision"] == "float16" and meta["details"]["compiled"] == "on-device"
    plan = json.loads((out / "engine_plan.json").read_text())
    assert plan["engine"] == "tensorrt" and plan["target"] == {"vendor": "nvidia", "arch": "sm_90"}
    assert plan["precision"] == {"fp16": True, "int8": False}
    assert plan["profile"] == {"x": {"min": [1, 4], "opt": [4, 4], "max": [4, 4]}}
    assert plan["library"]["majors"] == [10] and plan["workspace_bytes"] > 0
    assert plan["model"]["files"] == {"model.onnx": sha256_file(out / "model.onnx")}
    assert plan["model"]["digest"] == file_digest(tmp_path / "tiny.onnx")
    assert (out / "engine_entry.py").read_text() == runtime.script("engine_entry.py").read_text()
    assert sorted(p.name for p in (out / "mlopt_runtime").iterdir()) == sorted(p.name for p in runtime.sources())
    assert all((out / "mlopt_runtime" / p.name).read_bytes() == p.read_bytes() for p in runtime.sources())


def test_mi300x_build_is_a_migraphx_jit_plan(tmp_path: Path) -> None:
    out, meta = build_artifact(tmp_path, "migraphx", "mi300x")
    assert meta["format"] == "migraphx-jit" and meta["precision"] == "float16"
    plan = json.loads((out / "engine_plan.json").read_text())
    assert plan["engine"] == "migraphx" and plan["target"]["arch"] == "gfx942" and plan["batches"] == [1, 4]
    assert "ROCm" in plan["library"]["requires"] and "profile" not in plan


def test_int8_follows_the_models_qdq(tmp_path: Path) -> None:
    _, meta = build_artifact(tmp_path, "tensorrt", "h100", model=qdq_onnx(tmp_path / "qdq.onnx"))
    assert meta["precision"] == "int8+float16" and meta["details"]["precision"] == {"fp16": True, "int8": True}


def test_external_weights_travel_with_the_plan(tmp_path: Path) -> None:
    import onnx

    src = tmp_path / "src"
    src.mkdir()
    proto = onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx")))
    onnx.save(proto, str(src / "big.onnx"), save_as_external_data=True, location="big.onnx.data",
              size_threshold=0)
    out, _ = build_artifact(tmp_path, "tensorrt", "h100", model=src / "big.onnx")
    plan = json.loads((out / "engine_plan.json").read_text())
    assert sorted(plan["model"]["files"]) == ["big.onnx.data", "model.onnx"] and (out / "big.onnx.data").is_file()


# ------------------------------------------------------------------ the entry point (subprocesses)
def test_entry_builds_once_then_hits_the_cache(tmp_path: Path, fakes: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    log, cache = tmp_path / "builds.log", tmp_path / "cache"
    env = {"FAKE_TRT_LOG": str(log), "MLOPT_ENGINE_CACHE": str(cache)}
    first = run_entry(out, fakes, "build", env=env)
    assert first.returncode == 0, first.stderr
    second = run_entry(out, fakes, "build", env=env)
    assert second.returncode == 0, second.stderr
    assert json.loads(first.stdout)["built"] is True and json.loads(second.stdout)["built"] is False
    assert build_count(log) == 1
    key = json.loads(first.stdout)["key"]
    engine = (cache / key / "engine.plan").read_bytes()
    header = json.loads(engine.split(b"\n")[1])
    assert header["flags"] == ["FP16"] and header["profiles"] == [{"x": [[1, 4], [4, 4], [4, 4]]}]
    assert list((cache / "timing").glob("tensorrt-10.13.3.9-sm_90.timing"))


def test_entry_run_matches_onnxruntime(tmp_path: Path, fakes: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    feed = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **feed)
    done = run_entry(out, fakes, "run", str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                     "--cache", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    got = dict(np.load(tmp_path / "out.npz"))
    np.testing.assert_allclose(got["y"], reference(out / "model.onnx", feed)["y"], rtol=1e-6, atol=1e-6)


def test_entry_key_changes_with_driver_and_gpu(tmp_path: Path, fakes: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")

    def key(**env: str) -> str:
        done = run_entry(out, fakes, "key", env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    base = key()
    assert len(base) == 64 and key() == base
    assert key(FAKE_DRIVER="590.10.01") != base
    assert key(FAKE_GPU_NAME="NVIDIA H200") != base
    assert key(FAKE_TRT_VERSION="10.14.1.48") != base


def test_concurrent_replicas_build_once(tmp_path: Path, fakes: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    log = tmp_path / "builds.log"
    env = {**H100_ENV, "PATH": os.path.dirname(sys.executable), "FAKE_TRT_LOG": str(log),
           "FAKE_TRT_BUILD_SECONDS": "1.5", "MLOPT_ENGINE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(fakes / "poison"), str(fakes)])}
    procs = [subprocess.Popen([sys.executable, str(out / "engine_entry.py"), "build"], env=env, cwd=out,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    assert build_count(log) == 1
    assert sorted(json.loads(r[0])["built"] for r in results) == [False, True]


def test_missing_library_exits_4_naming_what_is_needed(tmp_path: Path, fakes: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    done = run_entry(out, fakes, "build", with_fakes=False)
    assert done.returncode == 4
    assert "tensorrt is not importable" in done.stderr and "pip install 'tensorrt>=10,<11'" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_gpu_exits_4(tmp_path: Path, fakes: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    done = run_entry(out, fakes, "build", env={"FAKE_GPU_NAME": ""})
    assert done.returncode == 4 and "no GPU found" in done.stderr and "NVIDIA GPU" in done.stderr


def test_tensorrt_11_is_refused(tmp_path: Path, fakes: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    done = run_entry(out, fakes, "key", env={"FAKE_TRT_VERSION": "11.4.0.106"})
    assert done.returncode == 4 and "tensorrt>=10,<11" in done.stderr


def test_entry_imports_nothing_from_mlopt(tmp_path: Path, fakes: Path) -> None:
    """Every subprocess test runs the entry with a poisoned mlopt first on the path; check the poison
    works, and check the imports statically too."""
    poisoned = subprocess.run([sys.executable, "-c", "import mlopt"], capture_output=True, text=True, cwd=tmp_path,
                              env={"PYTHONPATH": str(fakes / "poison")}, timeout=60, check=False)
    assert poisoned.returncode == 1 and "must not import mlopt" in poisoned.stderr
    here = Path(runtime.__file__).parent  # the script and the runtime modules the engine loader uses
    files = [runtime.script("engine_entry.py"), *(here / f for f in ("__init__.py", "isa.py", "files.py", "gpus.py",
                                                                      "engine_plan.py", "engines.py", "tensorrt.py",
                                                                      "migraphx.py"))]
    imported = set()
    for f in files:
        tree = ast.parse(f.read_text())
        imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    # tensorrt/migraphx come through importlib; the runtime's modules import each other relatively
    assert third_party == {"numpy", "pynvml", "cuda", "mlopt_runtime"}


# ------------------------------------------------------------------ the entry point (in-process)
def test_corrupt_cached_engine_is_rebuilt(tmp_path: Path, fake_libs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    log, cache = tmp_path / "builds.log", tmp_path / "cache"
    monkeypatch.setenv("FAKE_TRT_LOG", str(log))
    assert entry.main(["--artifact", str(out), "build", "--cache", str(cache)]) == 0
    folder = cache / entry.prepare(out).key
    (folder / "engine.plan").write_bytes(b"truncated")  # digest no longer matches
    assert entry.main(["--artifact", str(out), "build", "--cache", str(cache)]) == 0
    assert build_count(log) == 2
    # digests consistent but the library cannot load it (written by something else): rebuilt on open
    (folder / "engine.plan").write_bytes(b"not an engine")
    record = json.loads((folder / "engine.json").read_text())
    record["files"]["engine.plan"] = sha256_file(folder / "engine.plan")
    (folder / "engine.json").write_text(json.dumps(record))
    assert entry.main(["--artifact", str(out), "build", "--cache", str(cache)]) == 0
    assert build_count(log) == 3 and entry.intact(folder, entry.prepare(out).key)
    header = json.loads((folder / "engine.plan").read_bytes().split(b"\n")[1])
    assert header["timing_in"] > 0  # later builds start from the saved timing cache


def test_batch_outside_the_profile_is_an_error(tmp_path: Path, fake_libs: Path) -> None:
    out, _ = build_artifact(tmp_path, "tensorrt", "h100")
    run = entry.open_runner(out, tmp_path / "cache")
    assert run({"x": np.ones((4, 4), np.float32)})["y"].shape == (4, 3)
    with pytest.raises(entry.EngineError, match="outside the engine's profile"):
        run({"x": np.ones((16, 4), np.float32)})


def test_migraphx_entry_builds_per_batch_and_runs(tmp_path: Path, fake_libs: Path, kfd: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = build_artifact(tmp_path, "migraphx", "mi300x")
    log, cache = tmp_path / "mgx.log", tmp_path / "cache"
    monkeypatch.setenv("FAKE_MGX_LOG", str(log))
    run = entry.open_runner(out, cache)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"x": [1, 4]}, {"x": [4, 4]}]
    feed = {"x": np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(feed)["y"], reference(out / "model.onnx", feed)["y"], rtol=1e-6, atol=1e-6)
    with pytest.raises(entry.EngineError, match=r"no MIGraphX program for batch 2"):
        run({"x": np.ones((2, 4), np.float32)})
    entry.open_runner(out, cache)
    assert len(log.read_text().splitlines()) == 2  # cache hit: nothing parsed or compiled again
    key = entry.prepare(out).key
    saved = json.loads((cache / key / "batch1.mxr").read_bytes().split(b"\n")[1])
    assert saved == {"dims": {"x": [1, 4]}, "fp16": True, "target": "gpu"}


def test_direct_build_ships_the_engine_and_load_runs_it(tmp_path: Path, fake_libs: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "local_device", lambda kind: entry.nvidia_device())
    backend = get_backend("tensorrt")
    assert backend.availability(load_catalog().get("h100"), False) == Availability("here", True)
    log = tmp_path / "builds.log"
    monkeypatch.setenv("FAKE_TRT_LOG", str(log))
    monkeypatch.setenv("MLOPT_ENGINE_CACHE", str(tmp_path / "cache"))
    out, meta = build_artifact(tmp_path, "tensorrt", "h100", device_present=True)
    assert meta["format"] == "tensorrt-plan" and meta["details"]["compiled"] == "here"
    assert entry.intact(out / "engine", entry.prepare(out).key)
    feed = {"x": np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)}
    got = backend.load(out, meta, threads=1)(feed)
    np.testing.assert_allclose(got["y"], reference(out / "model.onnx", feed)["y"], rtol=1e-6, atol=1e-6)
    assert build_count(log) == 1 and not (tmp_path / "cache").exists()  # the shipped engine served


# ------------------------------------------------------------------ real GPUs
def _real_nvidia() -> entry.Device | None:
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("tensorrt", "cuda")):
        return None
    engines.local_device.cache_clear()
    return entry.nvidia_device()


@pytest.mark.gpu
def test_real_tensorrt_engine_matches_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = _real_nvidia()
    if device is None:
        pytest.skip("needs tensorrt, cuda-python and an NVIDIA GPU")
    sku = next((s.name for s in load_catalog().skus if s.vendor == "nvidia" and s.arch == device.arch), None)
    if sku is None:
        pytest.skip(f"no catalog SKU has this GPU's architecture {device.arch}")
    monkeypatch.setenv("MLOPT_ENGINE_CACHE", str(tmp_path / "cache"))
    backend = get_backend("tensorrt")
    assert backend.availability(load_catalog().get(sku), False).build == "here"
    out, meta = build_artifact(tmp_path, "tensorrt", sku, device_present=True)
    feed = {"x": np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)}
    got = backend.load(out, meta, threads=1)(feed)
    np.testing.assert_allclose(got["y"], reference(out / "model.onnx", feed)["y"], rtol=2e-2, atol=2e-2)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_an_axis_range_becomes_the_tensorrt_profile_and_migraphx_dynamic_dimensions(
        tmp_path: Path, fake_libs: Path, kfd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dims {seq: {min, opt, max}}: the engines accept every sequence length in the range, not only the
    benchmark's (real traffic of another size was refused when every axis was pinned)."""
    model = seq_onnx(tmp_path / "seq.onnx")
    kw = {"dims": {"seq": 64}, "ranges": {"seq": (16, 64, 128)}, "shape": ("batch", "seq")}
    out, _ = build_artifact(tmp_path, "tensorrt", "h100", model=model, **kw)
    plan = json.loads((out / "engine_plan.json").read_text())
    assert plan["ranges"] == {"seq": {"min": 16, "opt": 64, "max": 128}}
    assert plan["profile"] == {"x": {"min": [1, 16], "opt": [4, 64], "max": [4, 128]}}
    run = entry.open_runner(out, tmp_path / "cache")
    for seq in (16, 100, 128):  # any length in the range, at any planned batch
        feed = {"x": np.random.default_rng(seq).standard_normal((4, seq)).astype(np.float32)}
        np.testing.assert_allclose(run(feed)["y"], np.maximum(feed["x"], 0), rtol=1e-6)
    with pytest.raises(entry.EngineError, match="outside the engine's profile"):
        run({"x": np.ones((4, 129), np.float32)})
    out, _ = build_artifact(tmp_path, "migraphx", "mi300x", model=model, **kw)
    log = tmp_path / "mgx.log"
    monkeypatch.setenv("FAKE_MGX_LOG", str(log))
    run = entry.open_runner(out, tmp_path / "cache-mgx")
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"x": [[1, 1, [1]], [16, 128, [64]]]}, {"x": [[4, 4, [4]], [16, 128, [64]]]}]
    feed = {"x": np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)}
    np.testing.assert_allclose(run(feed)["y"], np.maximum(feed["x"], 0), rtol=1e-6)


def test_an_axis_range_in_a_recipe_is_checked_and_benchmarked_at_opt() -> None:
    from mlopt.core.errors import RecipeError
    from mlopt.recipes import recipe_from_dict

    base = {"name": "r", "model": {"source": "m.onnx"}, "targets": ["host"]}
    r = recipe_from_dict({**base, "benchmark": {"dims": {"seq": {"min": 16, "opt": 64, "max": 128}, "h": 8}}})
    assert r.benchmark.sizes == {"seq": 64, "h": 8} and r.benchmark.ranges == {"seq": (16, 64, 128)}
    assert r.benchmark.largest == {"seq": 128, "h": 8}
    with pytest.raises(RecipeError, match="min <= opt <= max"):
        recipe_from_dict({**base, "benchmark": {"dims": {"seq": {"min": 64, "opt": 16, "max": 128}}}})
