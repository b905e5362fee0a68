"""OpenVINO backend: OpenVINO IR (``model.xml`` + ``model.bin``) plus the settings to compile it on the SKU's device.

CPU SKUs this machine runs are built, validated and measured here beside ONNX Runtime and TVM, with
fp32 weights and dynamic dimensions kept dynamic. Intel GPU SKUs (``openvino_device: GPU``) get an
IR built here, with fp16 weights where the GPU runs fp16; the GPU plugin compiles it on the device,
so it runs here only where OpenVINO itself sees a GPU. ``openvino`` is imported only inside methods.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Any


from mlopt.core.errors import BackendUnavailable, UnsupportedOperator
from mlopt.runtime import Unavailable
from mlopt.runtime.openvino import CONFIG_FILE, output_ports
from mlopt.targets.backends import (
    Availability,
    Backend,
    BackendSpec,
    BuildRequest,
    TritonRuntime,
    package_version,
    ship_loader,
)
from mlopt.targets.catalog import SKU

MODEL_FILE = "model.xml"
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
GPU_REASON = "IR built here; runs on the Intel GPU with the OpenVINO GPU plugin (Level Zero/OpenCL runtime)"



def ov_device(sku: SKU) -> str | None:
    """The OpenVINO device for ``sku``: its catalog field, else CPU for CPU SKUs; None for other GPUs."""
    if sku.openvino_device:
        return sku.openvino_device
    return "CPU" if sku.kind == "cpu" else None


@lru_cache(maxsize=1)
def host_has_gpu() -> bool:
    """Whether OpenVINO sees a GPU on this machine (GPU, GPU.0 ...)."""
    import openvino as ov

    return any(d.split(".")[0] == "GPU" for d in ov.Core().available_devices)


def compile_config(device: str, precision: str, threads: int) -> dict[str, Any]:
    """compile_model properties: latency hint, an explicit inference precision, CPU threads.

    The precision is explicit because the CPU plugin silently runs bf16 on CPUs with AVX512-BF16 or
    AMX, which breaks validation of a float32 build against its reference.
    """
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                              "INFERENCE_PRECISION_HINT": "f16" if precision == "float16" else "f32"}
    if device == "CPU":
        config["INFERENCE_NUM_THREADS"] = threads
    return config


SPEC = BackendSpec(
    name="openvino", loader="openvino", packages={"openvino": "openvino"},
    triton=TritonRuntime("backend", "openvino", ("model.xml", "model.bin"), "model.xml",
                         thread_parameters=("INFERENCE_NUM_THREADS",)),
    doctor=("openvino",), serving=("openvino",),
)


class OpenVINOBackend(Backend):
    name = "openvino"
    spec = SPEC

    def availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        if importlib.util.find_spec("openvino") is None:
            return Availability("no", False, "the openvino package is not installed: pip install 'mlopt[openvino]'")
        device = ov_device(sku)
        if device is None:
            return Availability("no", False, f"OpenVINO has no device plugin for {sku.vendor} {sku.kind} SKUs")
        if device.split(".")[0] == "GPU":
            return Availability("here", True) if host_has_gpu() else Availability("cross", False, GPU_REASON)
        if host_runs_sku:
            return Availability("here", True)
        return Availability("cross", False, _cpu_cross_reason(sku))

    # ------------------------------------------------------------ build
    def build(self, req: BuildRequest, out: Path) -> dict[str, Any]:
        import openvino as ov

        device = ov_device(req.sku)
        if device is None:
            raise BackendUnavailable(f"{req.sku.name} has no OpenVINO device", hint="set openvino_device in the catalog")
        model, shaped = _convert_for(req)
        stable_names(model, req.model.onnx_path)
        _output_ports(model.outputs, list(req.model.outputs))  # OpenVINO keeps ONNX tensor names: check, fail early
        fp16 = device.split(".")[0] == "GPU" and "float16" in req.sku.dtypes
        ov.save_model(model, str(out / MODEL_FILE), compress_to_fp16=fp16)
        precision = "float16" if fp16 else "float32"
        entry = {
            "model": MODEL_FILE, "device": device,
            "config": compile_config(device, precision, req.sku.threads or req.threads),
            "inputs": [i.name for i in req.model.inputs], "outputs": list(req.model.outputs),
            "runtime": {"package": "openvino", "version": package_version("openvino")},
        }
        (out / CONFIG_FILE).write_text(json.dumps(entry, indent=2))
        ship_loader(out, "run_openvino.py")
        details = {"device": device, "compress_to_fp16": fp16, "qdq_nodes": _qdq_nodes(req.model.onnx_path),
                   "input_shapes": {p.get_any_name(): str(p.get_partial_shape()) for p in model.inputs}}
        if shaped:
            details["input_shapes_from_signature"] = shaped
        # OpenVINO's low-precision transformations run QDQ graphs with int8 kernels
        shown = f"int8+{precision}" if details["qdq_nodes"] else precision
        return {"precision": shown, "entry": MODEL_FILE, "config": CONFIG_FILE, "format": "openvino-ir",
                "details": details}

    def toolchain(self) -> dict[str, str]:
        return {"openvino": package_version("openvino")}


def _cpu_cross_reason(sku: SKU) -> str:
    if platform.machine() != sku.machine:
        return f"OpenVINO IR is portable; built here, the {sku.machine} CPU plugin compiles it on a {sku.name} machine"
    return f"this CPU cannot run {sku.arch} code; the IR is built here, not measured"


def _convert_for(req: BuildRequest) -> tuple[Any, str | None]:
    """The converted model, its inputs as dynamic as the ONNX file has them; where OpenVINO cannot convert
    that (an operator that needs a known rank behind an ``If``), again with the signature's shapes: the
    batch axis dynamic, an axis with a ``benchmark.dims`` range bounded to it, other named axes fixed to
    their ``benchmark.dims`` value. Returns (model, why the shapes were given, or None)."""
    try:
        return _convert(req.model.onnx_path), None
    except UnsupportedOperator as first:
        shapes = _signature_shapes(req)
        if shapes is None:
            raise
        try:
            model = _convert(req.model.onnx_path, shapes)
        except UnsupportedOperator:
            raise first from None
        return model, (f"converted with the signature's shapes ({first.message[:160]} with the file's own); "
                       "traffic must fit them")


def _signature_shapes(req: BuildRequest) -> list[tuple[str, Any]] | None:
    """OpenVINO input shapes from the signature (None when it names no axis the recipe binds)."""
    import openvino as ov

    def dim(d: int | str) -> Any:
        if isinstance(d, int):
            return ov.Dimension(d)
        if d in req.ranges:
            lo, _, hi = req.ranges[d]
            return ov.Dimension(lo, hi)
        return ov.Dimension(req.dims[d]) if d in req.dims and d != req.batch_axis else ov.Dimension(-1)

    if not any(isinstance(d, str) and (d in req.dims or d in req.ranges) for i in req.model.inputs for d in i.shape) \
            and not any(len(i.shape) == 0 for i in req.model.inputs):
        return None
    return [(i.name, ov.PartialShape([dim(d) for d in i.shape])) for i in req.model.inputs]


def _convert(onnx_path: Path, shapes: list[tuple[str, Any]] | None = None) -> Any:
    """convert_model from the ONNX path (it reads external-data files beside the model itself)."""
    import openvino as ov

    try:
        return ov.convert_model(str(onnx_path), **({"input": shapes} if shapes else {}))
    except Exception as e:  # the frontend raises OpConversionFailure, GeneralFailure ...; keep the message
        raise UnsupportedOperator(f"OpenVINO cannot convert the model: {conversion_cause(e)}",
                                  hint="use the onnxruntime backend for this model") from None


def conversion_cause(e: Exception) -> str:
    """The useful part of OpenVINO's conversion error: its summary of the failed operators and the first
    operator's reason (the message's first line only names a C++ source line)."""
    text = str(e).strip()
    failed = re.search(r"Conversion is failed for: ([^\n]+)", text)
    reasons = [line.strip() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith(("Check ", "FrontEnd API", "[ONNX Frontend]",
                                                                  "While validating", "--", "Summary",
                                                                  "Model wasn't"))]
    if failed:
        why = f" ({reasons[0][:160]})" if reasons else ""
        return f"{type(e).__name__}: operators {failed.group(1).strip()[:200]} failed to convert{why}"
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(e).__name__}: {first}"


AUTO_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*)_\d+$")


def stable_names(model: Any, onnx_path: Path) -> None:
    """Rename the operations OpenVINO named itself from a process-wide counter (``Reshape_19290``,
    which depends on what was converted before in the same process) to per-model ones
    (``Reshape_0``, ``Reshape_1`` in graph order), so one ONNX file always gives the same IR bytes.
    Names taken from the ONNX graph (nodes, tensors, weights) are kept as they are."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.initializer} | {i.name for i in graph.input}
    counters: dict[str, int] = {}
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        m = AUTO_NAME.match(name)
        if not m or name in taken:
            continue
        prefix = m.group(1)
        while f"{prefix}_{counters.get(prefix, 0)}" in taken:
            counters[prefix] = counters.get(prefix, 0) + 1
        new = f"{prefix}_{counters.get(prefix, 0)}"
        counters[prefix] = counters.get(prefix, 0) + 1
        taken.add(new)
        op.set_friendly_name(new)


def _output_ports(outputs: Any, names: list[str]) -> dict[str, Any]:
    """ONNX output name -> OpenVINO output port, in the ONNX order (the runtime loader's own mapping)."""
    try:
        return output_ports(outputs, names)
    except Unavailable as e:
        raise BackendUnavailable(str(e)) from None


def _qdq_nodes(onnx_path: Path) -> int:
    """QuantizeLinear/DequantizeLinear nodes: OpenVINO runs such a QDQ model's marked ops in int8."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return sum(n.op_type in QDQ_OPS for n in proto.graph.node)
