"""Triton model repositories per SKU: ``config.pbtxt`` built as Triton's own ``ModelConfig``
protobuf (from ``tritonclient[grpc]``) and checked again, semantically, after rendering.

Backends map to Triton as data, in each backend's ``BackendSpec.triton``: ONNX Runtime builds run
on the ``onnxruntime_onnx`` platform; TensorRT and MIGraphX builds (ONNX plus an on-device build
plan) run there too, with the engine built on the GPU by the execution accelerator and cached;
OpenVINO IR runs on the ``openvino`` backend; TVM libraries run on the ``python`` backend through
mlopt's entry point and the ``mlopt_runtime`` package shipped beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlopt.core.errors import BackendUnavailable, BadInput
from mlopt.package.onnxio import TensorDecl, graph_io
from mlopt.core.util import inside
from mlopt.targets.backends import BACKENDS, TritonRuntime, backend_spec
from mlopt.package.serving import (
    ENGINE_CACHE,
    BatchPlan,
    Deployable,
    ServingOptions,
    batch_plan,
    serve_spec,
    staged,
)


Runtime = TritonRuntime  # how Triton runs one mlopt backend (declared in the backend's BackendSpec)
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
                "uint64": "TYPE_UINT64", "uint32": "TYPE_UINT32", "uint16": "TYPE_UINT16", "uint8": "TYPE_UINT8",
                "bool": "TYPE_BOOL"}
PYTHON_MODEL = '''"""Triton Python backend model: runs an mlopt build through mlopt's entry point loaders."""
import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mlopt_entry import load_runner  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.spec = json.loads((HERE / "serve.json").read_text())
        self.run = load_runner(self.spec, HERE)

    def execute(self, requests):
        names = [i["name"] for i in self.spec["inputs"]]
        responses = []
        for request in requests:
            out = self.run({n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in names})
            tensors = [pb_utils.Tensor(n, out[n]) for n in self.spec["outputs"]]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BackendUnavailable("Triton's ModelConfig protobuf is missing (tritonclient[grpc])",
                                 hint="pip install 'mlopt[serve]'") from None
    return model_config_pb2


def runtime_of(backend: str) -> Runtime:
    """The Triton runtime of a backend, from its spec."""
    if backend not in BACKENDS:
        raise BadInput(f"no Triton runtime for backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    return backend_spec(backend).triton


def output_decls(d: Deployable) -> list[TensorDecl]:
    """Output declarations (names, types, shapes) from, in order: an ONNX file of the build or of
    another build of the same entry; an OpenVINO IR of those builds; the model the builds were
    compiled from (the final ONNX model, found by its digest among the store's cached steps, or the
    source file itself). An OpenVINO-only or TVM-only manifest needs no ONNX Runtime build."""
    arts = (d.artifact, *d.siblings)
    found = next((graph_io(a.path / "model.onnx")[1] for a in arts if (a.path / "model.onnx").is_file()), None)
    found = found or next((ir_outputs(a.path / "model.xml") for a in arts if (a.path / "model.xml").is_file()), None)
    final = found or final_model(d)
    if isinstance(final, Path):
        found = graph_io(final)[1]
    if not found:
        raise BadInput(f"{d.slug}: no ONNX model or OpenVINO IR to read output shapes from: no build of the entry "
                       f"has one, and the model it was compiled from is no longer in store {d.artifact.path.parents[1]}",
                       hint="compile again with the same store (its cache keeps the model), or add the onnxruntime "
                            "backend")
    names = list(d.model.outputs)
    return sorted(found, key=lambda o: names.index(o.name) if o.name in names else len(names))


IR_TYPES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "f64": "float64",
            "fp64": "float64", "bf16": "bfloat16", "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8",
            "u64": "uint64", "u32": "uint32", "u16": "uint16", "u8": "uint8", "boolean": "bool", "bool": "bool"}


def ir_outputs(xml: Path) -> list[TensorDecl]:
    """Output declarations of an OpenVINO IR, read from its XML (no OpenVINO needed): each Result
    layer's input port gives the shape and type; the port feeding it carries the tensor's name."""
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    feeds = {(e.get("to-layer"), e.get("to-port")): (e.get("from-layer"), e.get("from-port")) for e in root.iter("edge")}
    out = []
    for layer in layers.values():
        if layer.get("type") != "Result":
            continue
        port = layer.find("input/port")
        src_layer, src_port = feeds.get((layer.get("id"), port.get("id") if port is not None else None), (None, None))
        src = layers.get(src_layer)
        feeding = next((q for q in src.iter("port") if q.get("id") == src_port), None) if src is not None else None
        name = (layer.get("output_names") or (feeding.get("names") if feeding is not None else None)
                or layer.get("name") or "").split(",")[0]
        dims = [int(x.text or "-1") for x in port.findall("dim")] if port is not None else []
        kind = (port.get("precision") if port is not None else None) or _ir_type(layer)
        if kind.lower() not in IR_TYPES:
            raise BadInput(f"{xml}: output {name!r} has element type {kind!r}, which Triton configs do not map")
        out.append(TensorDecl(name.strip(), IR_TYPES[kind.lower()], tuple("batch" if x < 0 else x for x in dims)))
    return out


def _ir_type(layer: Any) -> str:
    data = layer.find("data")
    return data.get("element_type", "f32") if data is not None else "f32"


def final_model(d: Deployable) -> Path | None:
    """The ONNX model the entry's builds were compiled from, when the store's cache still has it
    (its ingest or last pass step), or the recipe's ONNX source file, checked by digest."""
    from mlopt.core.model import file_digest

    digest = d.model.final_digest
    cache = d.artifact.path.parents[1] / "cache"
    for meta in sorted(cache.glob("*/*/meta.json")):
        try:
            step = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(step, dict) or step.get("digest") != digest:
            continue
        candidate = meta.parent / Path(str(step.get("file", "model.onnx"))).name  # a file of the step itself
        if candidate.is_file() and file_digest(candidate) == digest:
            return candidate
    source = Path(d.model.source)
    return source if source.suffix == ".onnx" and source.is_file() and file_digest(source) == digest else None


def instance_group(d: Deployable) -> tuple[str, int]:
    """CPU: one instance per ``threads`` cores; GPU: two (copies overlap compute) when the model is
    small beside the device memory, else one."""
    if d.sku.kind == "gpu":
        size = d.entry.artifact.size_bytes if d.entry.artifact else 0
        roomy = d.sku.memory_gb is not None and 4 * size < d.sku.memory_gb * 1e9 / 2
        return "KIND_GPU", 2 if roomy else 1
    return "KIND_CPU", max(1, (d.sku.vcpus or d.threads) // d.threads)


def model_config(d: Deployable, plan: BatchPlan) -> Any:
    """The ``ModelConfig`` protobuf for one deployable."""
    pb = _pb()
    rt = runtime_of(d.backend)
    c = pb.ModelConfig(name=d.model.name, max_batch_size=plan.max_batch_size)
    setattr(c, rt.key, rt.value)
    if rt.default_file:
        c.default_model_filename = rt.default_file
    strip = 1 if plan.max_batch_size > 0 else 0
    for i in d.model.inputs:
        c.input.add(name=i.name, data_type=pb.DataType.Value(TRITON_TYPES[i.dtype]), dims=_dims(i.shape[strip:]))
    for o in output_decls(d):
        c.output.add(name=o.name, data_type=pb.DataType.Value(TRITON_TYPES[o.dtype]), dims=_dims(o.shape[strip:]))
    if plan.max_batch_size > 0:
        c.dynamic_batching.preferred_batch_size.extend(plan.preferred)
        c.dynamic_batching.max_queue_delay_microseconds = plan.queue_delay_us
    kind, count = instance_group(d)
    c.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=count)
    _tune(c, d, rt)
    return c


def _dims(shape: Any) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _tune(c: Any, d: Deployable, rt: Runtime) -> None:
    for key in rt.thread_parameters:
        c.parameters[key].string_value = str(d.threads)
    for key, value in rt.parameters:
        c.parameters[key].string_value = value
    if rt.accelerator:
        acc = c.optimization.execution_accelerators.gpu_execution_accelerator.add(name=rt.accelerator)
        for key, value in _accelerator_parameters(d, rt.accelerator).items():
            acc.parameters[key] = value


def _accelerator_parameters(d: Deployable, name: str) -> dict[str, str]:
    plan = _plan(d)
    precision = plan.get("precision") or {}
    if name == "tensorrt":
        mode = "INT8" if precision.get("int8") else "FP16" if precision.get("fp16") else "FP32"
        return {"precision_mode": mode, "max_workspace_size_bytes": str(plan.get("workspace_bytes", 1 << 30)),
                "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"{ENGINE_CACHE}/triton-trt"}
    return {"fp16_enable": "1" if precision.get("fp16") else "0", "int8_enable": "1" if precision.get("int8") else "0"}


def _plan(d: Deployable) -> dict[str, Any]:
    path = d.artifact.path / "engine_plan.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def render(config: Any, notes: tuple[str, ...] = ()) -> str:
    """config.pbtxt text: the protobuf text format, after comments saying how it was chosen."""
    from google.protobuf import text_format

    head = "".join(f"# {n}\n" for n in ("Written by mlopt from the manifest's measurements.", *notes))
    return head + text_format.MessageToString(config)


def validate(text: str, where: str = "config.pbtxt") -> Any:
    """Parse ``text`` as Triton's ModelConfig and check what the protobuf cannot: a preferred batch
    size above max_batch_size, batching without a batch axis, empty or zero dimensions ..."""
    from google.protobuf import text_format

    pb = _pb()
    try:
        c = text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as e:
        raise BadInput(f"{where}: not a Triton ModelConfig: {e}") from None
    problems = _semantic_problems(c, pb)
    if problems:
        raise BadInput(f"{where}: " + "; ".join(problems))
    return c


def _semantic_problems(c: Any, pb: Any) -> list[str]:
    out = []
    if not (c.platform or c.backend):
        out.append("neither platform nor backend is set")
    if c.max_batch_size < 0:
        out.append(f"max_batch_size {c.max_batch_size} is negative")
    if c.HasField("dynamic_batching"):
        sizes = list(c.dynamic_batching.preferred_batch_size)
        if c.max_batch_size == 0:
            out.append("dynamic_batching needs max_batch_size > 0")
        out += [f"preferred_batch_size {s} is above max_batch_size {c.max_batch_size}" for s in sizes
                if c.max_batch_size and s > c.max_batch_size]
        out += [f"preferred_batch_size {s} is not positive" for s in sizes if s <= 0]
        if len(set(sizes)) != len(sizes):
            out.append(f"preferred_batch_size repeats a size: {sizes}")
    for kind, tensors in (("input", c.input), ("output", c.output)):
        if not tensors:
            out.append(f"no {kind}s")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            out.append(f"{kind} names repeat: {names}")
        for t in tensors:
            if t.data_type == pb.TYPE_INVALID:
                out.append(f"{kind} {t.name!r} has no data_type")
            if any(d == 0 or d < -1 for d in t.dims):
                out.append(f"{kind} {t.name!r} has a dimension that is 0 or below -1: {list(t.dims)}")
    for g in c.instance_group:
        if g.count < 1:
            out.append(f"instance_group count {g.count} is below 1")
    gpu = any(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in c.instance_group)
    if c.optimization.execution_accelerators.gpu_execution_accelerator and not gpu:
        out.append("a GPU execution accelerator is configured but no instance_group is KIND_GPU")
    return out


def config_text(d: Deployable, options: ServingOptions) -> str:
    """The validated config.pbtxt of one deployable."""
    plan = batch_plan(d, options)
    text = render(model_config(d, plan), plan.notes)
    validate(text, f"{d.slug} config.pbtxt")
    return text


def version_files(d: Deployable) -> list[Path]:
    """The artifact files Triton loads from the model's version folder."""
    rt = runtime_of(d.backend)
    return [p for p in sorted(d.artifact.path.iterdir())
            if p.is_file() and p.name != "artifact.json" and any(p.name.startswith(f) for f in rt.files)]


def python_backend_files(d: Deployable, options: ServingOptions) -> dict[str, bytes]:
    """model.py and serve.json for builds Triton runs on its Python backend (besides mlopt_entry.py
    and the mlopt_runtime package)."""
    if runtime_of(d.backend).value != "python":
        return {}
    spec = {**serve_spec(d, options), "model_dir": None}
    return {"model.py": PYTHON_MODEL.encode(), "serve.json": json.dumps(spec, indent=2).encode()}


def write_repository(d: Deployable, out: Path, options: ServingOptions) -> Path:
    """Write ``out/<model>/config.pbtxt`` and ``out/<model>/1/``; returns the model folder. Every
    file is a real file (a hard link to the store's where the file system allows, else a copy; no
    symlinks), so the folder survives ``cp -r``; it is written beside its place and renamed in, so a
    failure leaves the previous folder or none."""
    from mlopt.package import entry

    text = config_text(d, options)  # fails before anything is written
    folder = inside(out, d.model.name)
    with staged(folder) as tmp:
        version = tmp / "1"
        version.mkdir()
        (tmp / "config.pbtxt").write_text(text)
        for src in version_files(d):
            _link_or_copy(src, version / src.name)
        extra = python_backend_files(d, options)
        for name, data in extra.items():
            inside(version, name).write_bytes(data)
        if extra:
            from mlopt import runtime

            shutil.copyfile(entry.__file__, version / "mlopt_entry.py")
            runtime.ship(version)  # the loaders mlopt_entry.py calls
    return folder


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        dest.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dest)
