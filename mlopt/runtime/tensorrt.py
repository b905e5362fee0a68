"""TensorRT 10 engines: built from the plan on the NVIDIA GPU they serve from, run with device
memory from cuda-python."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

from . import Runner
from .engine_plan import EngineError, EngineUnavailable, EngineUnreadable, import_library, log
from .files import write_atomic
from .gpus import Device, nvidia_device

ENGINE_FILE = "engine.plan"


class TensorRTEngine:
    """TensorRT 10: one serialized engine with an optimization profile over the plan's batches."""

    kind = "tensorrt"
    needs = "the TensorRT 10 Python package and cuda-python: pip install 'tensorrt>=10,<11' cuda-python"
    gpu = "an NVIDIA GPU (run the container with the NVIDIA runtime, e.g. --gpus all)"

    def __init__(self) -> None:
        self.trt = import_library("tensorrt", self.needs)
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
        (dest / ENGINE_FILE).write_bytes(bytes(serialized))
        write_atomic(timing, bytes(config.get_timing_cache().serialize()))
        return [ENGINE_FILE]

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
            log(f"timing cache {timing.name} unusable; starting a fresh one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    def runner(self, plan: dict[str, Any], folder: Path) -> Runner:
        return TensorRTRunner(self.trt, (folder / ENGINE_FILE).read_bytes())


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
        arr = np.require(value, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)), requirements="C")
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
