"""ONNX Runtime backend: an offline-optimized .onnx plus the session settings to serve it.

CPU SKUs get an EXTENDED-optimized model for the CPU provider. GPU SKUs get a model optimized only
at the BASIC level (provider-independent rewrites, so each execution provider fuses for itself)
and the session settings for the SKU's execution providers (TensorRT, CUDA, MIGraphX, OpenVINO),
with the precisions the SKU runs: fp16 where the SKU has it, int8 where the model carries QDQ. The
GPU runtimes are optional extras (`onnxruntime-gpu`, `onnxruntime-openvino`, `onnxruntime-migraphx`),
never dependencies; without the provider and the device the build is portable ONNX, not measured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from mlopt.core.model import onnx_files
from mlopt.core.errors import BackendUnavailable
from mlopt.targets.backends import Availability, Backend, BackendSpec, BuildRequest, TritonRuntime, package_version
from mlopt.targets.catalog import SKU

_ORT_NOISE = (re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "), re.compile(r"Load model from \S+ failed:"),
              re.compile(r"(/onnxruntime_src/)?\S+\.(h|cc|cpp):\d+ [^\n]*?\) "), re.compile(r"Fatal error: "))


def ort_cause(e: Exception) -> str:
    """ONNX Runtime's error text (error code, model path, C++ file and signature) summarised to its cause."""
    text = " ".join(str(e).split())
    for noise in _ORT_NOISE:
        text = noise.sub("", text)
    return text.strip()[:200] or type(e).__name__

SESSION_FILE = "session.json"
ENGINE_CACHE = "/var/cache/mlopt"  # a volume in the serving container: engines survive restarts
EXTRAS = {"TensorrtExecutionProvider": "onnxruntime-gpu", "CUDAExecutionProvider": "onnxruntime-gpu",
          "MIGraphXExecutionProvider": "onnxruntime-migraphx", "OpenVINOExecutionProvider": "onnxruntime-openvino"}


def _trt(sku: SKU, int8: bool) -> dict[str, Any]:
    return {"device_id": 0, "trt_fp16_enable": "float16" in sku.dtypes, "trt_int8_enable": int8,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": f"{ENGINE_CACHE}/ort-trt",
            "trt_timing_cache_enable": True, "trt_timing_cache_path": f"{ENGINE_CACHE}/ort-trt",
            "trt_builder_optimization_level": 3, "trt_max_workspace_size": 4 << 30}


def _cuda(sku: SKU, int8: bool) -> dict[str, Any]:
    sm = re.match(r"sm_(\d+)", sku.arch)  # sm_90a -> 90
    tensor_cores = bool(sm) and int(sm.group(1)) >= 70
    return {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True,
            "arena_extend_strategy": "kSameAsRequested", "prefer_nhwc": int(tensor_cores),
            "use_tf32": int("bfloat16" in sku.dtypes)}


def _migraphx(sku: SKU, int8: bool) -> dict[str, Any]:
    return {"device_id": 0, "migraphx_fp16_enable": "float16" in sku.dtypes, "migraphx_int8_enable": int8}


def _openvino(sku: SKU, int8: bool) -> dict[str, Any]:
    return {"device_type": sku.openvino_device or "CPU", "precision": "FP16" if "float16" in sku.dtypes else "FP32",
            "cache_dir": f"{ENGINE_CACHE}/ort-openvino"}


PROVIDER_OPTIONS: dict[str, Callable[[SKU, bool], dict[str, Any]]] = {
    "TensorrtExecutionProvider": _trt, "CUDAExecutionProvider": _cuda,
    "MIGraphXExecutionProvider": _migraphx, "OpenVINOExecutionProvider": _openvino,
    "CPUExecutionProvider": lambda sku, int8: {},
}


def provider_settings(sku: SKU, int8: bool) -> list[list[Any]]:
    """[[provider, options], ...] in the SKU's order, as ``InferenceSession(providers=...)`` takes them."""
    unknown = [p for p in sku.onnxruntime_providers if p not in PROVIDER_OPTIONS]
    if unknown:
        raise BackendUnavailable(f"{sku.name} names unknown ONNX Runtime providers {unknown}; "
                                 f"choose from {', '.join(PROVIDER_OPTIONS)}")
    return [[p, PROVIDER_OPTIONS[p](sku, int8)] for p in sku.onnxruntime_providers]


def _precision(sku: SKU, model_precision: str) -> str:
    """The precision a GPU SKU's session runs the model in: the model's, plus fp16 where the first
    provider computes float layers in fp16 (TensorRT, MIGraphX, OpenVINO GPU with fp16 enabled)."""
    accelerated = [p for p in sku.onnxruntime_providers if p != "CPUExecutionProvider"]
    fp16 = bool(accelerated) and "float16" in sku.dtypes and accelerated[0] != "CUDAExecutionProvider"
    if not fp16 or model_precision == "float16":
        return model_precision
    return "int8+float16" if model_precision == "int8" else "float16"


SPEC = BackendSpec(
    name="onnxruntime", loader="ort", packages={"onnxruntime": "onnxruntime"},
    triton=TritonRuntime("platform", "onnxruntime_onnx", ("model.onnx",), "model.onnx",
                         thread_parameters=("intra_op_thread_count",), parameters=(("inter_op_thread_count", "1"),)),
    doctor=("onnxruntime",), serving=("onnxruntime",),
)


class OrtBackend(Backend):
    name = "onnxruntime"
    spec = SPEC

    def availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        if sku.kind != "cpu":
            return self._gpu_availability(sku, host_runs_sku)
        if host_runs_sku:
            return Availability("here", True)
        return Availability("cross", False, f"this machine cannot run {sku.arch} code; the model is portable ONNX")

    def _gpu_availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        import onnxruntime as ort

        main = next((p for p in sku.onnxruntime_providers if p != "CPUExecutionProvider"), None)
        if main is None:
            return Availability("no", False, f"{sku.name} names no GPU execution provider")
        if host_runs_sku and main in ort.get_available_providers():
            return Availability("here", True)
        return Availability("cross", False, f"portable ONNX with {main} settings; serve it with "
                                            f"{EXTRAS.get(main, 'an onnxruntime build with that provider')} on the SKU")

    def build(self, req: BuildRequest, out: Path) -> dict[str, Any]:
        import onnxruntime as ort

        gpu = req.sku.kind == "gpu"
        # CPU: EXTENDED fusions are portable across CPUs; layout (NCHWc) rewrites depend on the exact
        # CPU, so they are left to session creation on the serving machine (ORT_ENABLE_ALL). GPU: only
        # BASIC rewrites, which every execution provider reads; each provider fuses for itself.
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if gpu
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        opts.optimized_model_filepath = str(out / "model.onnx")
        opts.log_severity_level = 3
        if len(onnx_files(req.model.onnx_path)) > 1:  # external weights stay external, beside the model
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(req.model.onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendUnavailable(f"ONNX Runtime cannot load the model: {ort_cause(e)}") from None
        model_precision = req.model.precision
        int8 = model_precision == "int8"
        session = {
            "providers": provider_settings(req.sku, int8) if gpu else ["CPUExecutionProvider"],
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "intra_op_num_threads": req.sku.threads or req.threads,
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
            "requires": {"package": EXTRAS.get(req.sku.onnxruntime_providers[0], "onnxruntime"),
                         "min_version": package_version("onnxruntime")},
        }
        (out / SESSION_FILE).write_text(json.dumps(session, indent=2))
        precision = _precision(req.sku, model_precision) if gpu else model_precision
        return {"precision": precision, "entry": "model.onnx", "session": SESSION_FILE, "format": "onnx",
                "details": {"providers": [p if isinstance(p, str) else p[0] for p in session["providers"]]}}

    def toolchain(self) -> dict[str, str]:
        return {"onnxruntime": package_version("onnxruntime")}
