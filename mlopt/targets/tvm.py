"""TVM backend (Relax): an ``export_library`` shared library plus the entry file to call it.

CPU SKUs the machine can run are built and validated here; other CPU architectures (aarch64) are
cross-compiled for real with a cross linker, and the library's ELF machine is checked. GPU SKUs are
cross-compiled for their architecture: CUDA ``sm_XX`` through nvcc, ROCm ``gfxNNN`` through LLVM and
ld.lld, with dlight's default GPU schedules; the library must then embed machine code for exactly
that architecture (``devcode.require_device_code``), because TVM's silent fallbacks (CUDA source,
host code) must never pass as a GPU build. With a tuning budget, MetaSchedule tunes one
static-shape library per benchmark batch size, storing the records in a database shared by every
build, so a workload tuned once is never tuned again (GPU tuning needs the device present).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mlopt.core.errors import MloptError, ModelImportFailed, UnsupportedOperator
from mlopt.core.model import FLOAT_PRECISIONS
from mlopt.runtime.tvm import ENTRY_FILE
from mlopt.targets import gpu_toolchain
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
from mlopt.targets.devcode import require_device_code
from mlopt.targets.tvm_lower import GPU_KINDS, _cross_linker, compile_module
from mlopt.targets.tvm_onnx import check_ops, check_outputs, static_onnx
from mlopt.targets.tvm_rewrite import REWRITTEN_OPS, unroll_lstms

# TVM sizes its thread pool once, from TVM_NUM_THREADS, when the runtime starts: without it, it uses
# half the cores on x86 and config_threadpool can only lower that. Set it before tvm is imported.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

SPEC = BackendSpec(
    name="tvm", loader="tvm", packages={"apache-tvm": "tvm", "apache-tvm-ffi": "tvm_ffi"},
    build_packages=("nvidia-cuda-nvcc",),
    triton=TritonRuntime("backend", "python", ("",)),  # every artifact file, beside model.py
    doctor=("tvm",), serving=("apache-tvm",),
)
# Untuned CPU builds compile in a fresh interpreter for reproducible bytes (``tvm_isolated``, about 2 s
# each). Operator-coverage tests that lower hundreds of one-node models switch it off.
ISOLATE_CPU_BUILDS = True


class TVMBackend(Backend):
    name = "tvm"
    spec = SPEC

    def availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        kind = (sku.tvm_target or {}).get("kind")
        if kind in GPU_KINDS:
            return _gpu_availability(sku, kind, host_runs_sku)
        if kind != "llvm":
            return Availability("no", False, f"{sku.name} has no TVM target TVM {package_version('apache-tvm')} "
                                             "compiles to machine code (cuda, rocm or llvm)")
        if host_runs_sku:
            return Availability("here", True)
        if os.uname().machine == sku.machine:
            return Availability("cross", False, f"this CPU cannot run {sku.arch} code; built, not measured")
        if _cross_linker(sku.machine) is None:
            return Availability("no", False, f"cross-compiling for {sku.machine} needs a linker: "
                                "apt-get install gcc-aarch64-linux-gnu (or lld)")
        return Availability("cross", False, f"cross-compiled for {sku.machine}; run it on a {sku.name} machine")

    # ------------------------------------------------------------ build
    def build(self, req: BuildRequest, out: Path) -> dict[str, Any]:
        import onnx

        proto = onnx.load(str(req.model.onnx_path))
        check_ops(proto, rewritable=REWRITTEN_OPS)
        check_outputs(proto)
        target_dict = dict(req.sku.tvm_target or {})
        kind = target_dict.get("kind", "llvm")
        details: dict[str, Any] = {"target": target_dict, "tuning_trials": req.tuning_trials}
        if kind in GPU_KINDS:
            details["toolchain"] = gpu_toolchain.prepare_cuda() if kind == "cuda" else gpu_toolchain.prepare_rocm()
        library, static, details["shapes"] = self._compile_shaped(proto, target_dict, out, req)
        out_axes = output_batch_axes(req) if static else None
        if kind in GPU_KINDS:
            details["device_code"] = _device_code(out / library, req.sku.arch)
        tuned: dict[str, str] = {}
        if req.tuning_trials > 0 and kind in GPU_KINDS and not req.device_present:
            details["tuning"] = {"status": "skipped", "reason": "GPU tuning measures on the device; none is here"}
        elif req.tuning_trials > 0:
            from mlopt.targets.tvm_tune import keep_paying, tune_static

            # tuned on the graph the static build compiles: shapes fixed and folded, If/LSTM rewritten (TVM's
            # frontend imports that where the original graph with shapes fails, e.g. YOLOv8's shape chains)
            tuned, details["tuning"] = tune_static(proto, req, target_dict, out, self._compile,
                                                   static_graph=lambda b: _static_proto(req, b))
            if kind not in GPU_KINDS:  # ships a tuned library only where it is faster than the untuned one
                tuned = keep_paying(out, tuned, lambda b: static.get(b, library), req, details["tuning"])
        entry = {
            "library": library, "function": "main", "tuned": tuned, "static": static,
            "inputs": [i.name for i in req.model.inputs], "outputs": list(req.model.outputs),
            "batch_axes": {i.name: (list(i.shape).index(req.batch_axis) if req.batch_axis in i.shape else None)
                           for i in req.model.inputs},
            **({"output_batch_axes": out_axes} if out_axes is not None else {}),
            "target": target_dict, "machine": req.sku.machine, "device": GPU_KINDS.get(kind, "cpu"),
            "requires": self.requires(req.sku),
            "runtime": {"package": "apache-tvm", "version": package_version("apache-tvm"),
                        "note": "needs only the TVM runtime library (TVM_USE_RUNTIME_LIB=1)"},
        }
        (out / ENTRY_FILE).write_text(json.dumps(entry, indent=2))
        ship_loader(out, "run_tvm.py")
        # TVM's ONNX frontend lowers QDQ to float quantize/dequantize arithmetic: no int8 kernels
        precision = req.model.precision
        if precision not in FLOAT_PRECISIONS:
            details["quantization"] = f"{precision} graph simulated in float32 (TVM lowers it without integer kernels)"
            precision = "float32"
        return {"precision": precision, "entry": ENTRY_FILE, "format": "tvm-relax-vm", "details": details}

    def _compile_shaped(self, proto: Any, target_dict: dict[str, Any], out: Path,
                        req: BuildRequest) -> tuple[str, dict[str, str], str]:
        """The untuned library: one with the signature's shapes (every dynamic axis but the batch bound
        from ``benchmark.dims``, the batch symbolic); where TVM's frontend cannot import a symbolic batch,
        one static library per benchmark batch size. Returns (default library, {batch: library}, how)."""
        rnn = sorted({n.op_type for n in proto.graph.node if n.op_type in REWRITTEN_OPS})
        try:
            if rnn:  # unrolled over the sequence, which needs every shape fixed
                raise UnsupportedOperator(f"{', '.join(rnn)} is rewritten only with static shapes")
            self._compile(proto, signature_shapes(req, None), target_dict, out / "model.so", req)
            return "model.so", {}, f"batch axis {req.batch_axis!r} symbolic, other axes from the signature"
        except Exception as e:  # the frontend's and the lowering's errors are many and untyped
            if (isinstance(e, MloptError) and not isinstance(e, UnsupportedOperator)) or \
                    not any(req.batch_axis in i.shape for i in req.model.inputs) and not rnn:
                raise
            symbolic_failure = f"{type(e).__name__}: {e}".splitlines()[0]
        static, rewrites = {}, set()
        with tempfile.TemporaryDirectory(prefix="mlopt-tvm-static-") as tmp:
            for b in sorted(req.batch_sizes):
                folded, done = _static_for_tvm(req, b, Path(tmp) / f"b{b}.onnx")
                rewrites |= done
                static[str(b)] = f"model-b{b}.so"
                self._compile(onnx_load(folded), None, target_dict, out / static[str(b)], req, source=folded)
        how = "".join(f"; {r}" for r in sorted(rewrites))
        return (static[str(min(req.batch_sizes))], static,
                f"static, one library per batch size {sorted(req.batch_sizes)}, shapes folded by ONNX Runtime's "
                f"basic optimizations (a symbolic batch failed: {symbolic_failure[:200]}){how}")

    def _compile(self, proto: Any, shapes: dict[str, list[int | str]] | None, target_dict: dict[str, Any],
                 dest: Path, req: BuildRequest, database: Any = None, source: Path | None = None) -> None:
        """The library of ``proto`` (read from ``source``, else the model's file). An untuned CPU build
        compiles in a fresh interpreter: TVM's bytes depend on the process's history (see
        ``tvm_isolated``); GPU and tuned builds compile here."""
        if ISOLATE_CPU_BUILDS and database is None and target_dict.get("kind", "llvm") not in GPU_KINDS:
            from mlopt.targets.tvm_isolated import compile_isolated

            return compile_isolated(source or req.model.onnx_path, target_dict, dest, req.sku.machine, shapes)
        return compile_module(proto, shapes, target_dict, dest, req.sku.machine, database)

    # ------------------------------------------------------------ run
    def open(self, artifact: Path, meta: dict[str, Any], threads: int) -> Runner:
        """The runtime loader, after this machine's libcuda (the driver's, else the stand-in) and
        libcudart are loaded for a CUDA build."""
        entry = json.loads((artifact / meta["entry"]).read_text())
        if entry.get("device") == "cuda":
            gpu_toolchain.load_cuda_runtime()
        return super().open(artifact, meta, threads)

    def requires(self, sku: SKU) -> dict[str, Any]:
        """Machine code for the SKU's ``mcpu``: it needs every CPU flag the SKU lists."""
        return sku.requires

    def toolchain(self) -> dict[str, str]:
        return {"apache-tvm": package_version("apache-tvm"), "apache-tvm-ffi": package_version("apache-tvm-ffi")}

    def toolchain_for(self, sku: SKU) -> dict[str, str]:
        kind = (sku.tvm_target or {}).get("kind")
        extra: dict[str, str] = {}
        if kind == "cuda":
            extra = {"nvcc": gpu_toolchain.nvcc_version() or "absent"}
        elif kind == "rocm":
            lld, bitcode = gpu_toolchain.find_lld(), gpu_toolchain.rocm_bitcode_dir()
            extra = {"ld.lld": str(lld[1]) if lld else "absent", "rocm-bitcode": str(bitcode or "absent")}
        return {**self.toolchain(), **extra}


def onnx_load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _static_proto(req: BuildRequest, batch: int) -> Any:
    with tempfile.TemporaryDirectory(prefix="mlopt-tvm-tune-") as tmp:
        path, _ = _static_for_tvm(req, batch, Path(tmp) / f"b{batch}.onnx")
        return onnx_load(path)


def _static_for_tvm(req: BuildRequest, batch: int, dest: Path) -> tuple[Path, set[str]]:
    """The model with every axis fixed for ``batch`` and its shape arithmetic folded (an ``If`` whose
    condition is then constant is inlined by the folding), and each LSTM unrolled into standard operators
    (TVM's frontend has neither); UnsupportedOperator naming what is left. Returns (file, what was rewritten)."""
    import onnx

    before = {n.op_type for n in onnx_load(req.model.onnx_path).graph.node}
    folded = static_onnx(req.model.onnx_path, signature_shapes(req, batch), dest)
    proto = onnx.load(str(folded))
    done = {"If inlined (the fixed shapes decide its condition)"} if "If" in before else set()
    if not any(n.op_type in REWRITTEN_OPS for n in proto.graph.node):
        return folded, done
    proto, lstms = unroll_lstms(proto)
    if lstms:
        done.add(f"{lstms} LSTM unrolled over the fixed sequence length into standard operators")
    left = sorted({f"{n.op_type} {n.name}".strip() for n in proto.graph.node if n.op_type in REWRITTEN_OPS})
    if left:
        raise ModelImportFailed(
            f"TVM cannot import this model: it has no {'/'.join(sorted({x.split()[0] for x in left}))} and mlopt "
            "could not rewrite "
            f"{', '.join(left)[:200]} with the shapes fixed (an If whose condition depends on input values, not "
            "shapes; an LSTM whose sequence_lens is not constant, or with input_forget or other "
            "activations)", hint="use the onnxruntime or openvino backend for this model")
    check_ops(proto)
    onnx.save(proto, str(folded))
    return folded, done


def output_batch_axes(req: BuildRequest) -> dict[str, int | None] | None:
    """Each output's batch axis, for static builds that run other batch sizes in slices: the axis whose
    size follows the batch when the model's shapes are fixed at batch 1 and 2 (None: no axis follows it);
    None when shape inference cannot tell for every output."""
    import onnx

    dims = []
    with tempfile.TemporaryDirectory(prefix="mlopt-tvm-axes-") as tmp:
        for b in (1, 2):
            try:
                folded = static_onnx(req.model.onnx_path, signature_shapes(req, b), Path(tmp) / f"b{b}.onnx")
                proto = onnx.load(str(folded))
                for o in proto.graph.output:  # what the file declares may be stale: infer every output
                    o.type.tensor_type.ClearField("shape")
                graph = onnx.shape_inference.infer_shapes(proto).graph
            except Exception:  # ONNX Runtime or shape inference cannot fix this model's shapes: no slicing
                return None
            dims.append({o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
                         for o in graph.output})
    axes: dict[str, int | None] = {}
    for name in req.model.outputs:
        one, two = dims[0].get(name), dims[1].get(name)
        if one is None or two is None or len(one) != len(two) or None in one or None in two:
            return None
        moved = [k for k, (x, y) in enumerate(zip(one, two)) if x != y]
        if len(moved) > 1:
            return None
        axes[name] = moved[0] if moved else None
    return axes


def signature_shapes(req: BuildRequest, batch: int | None) -> dict[str, list[int | str]]:
    """Each input's shape for TVM's frontend: dynamic axes bound from ``benchmark.dims``, the batch axis
    bound to ``batch`` (None keeps it symbolic, by name)."""
    bound = {**req.dims, **({req.batch_axis: batch} if batch is not None else {})}
    return {i.name: [d if isinstance(d, int) else bound.get(d, d) for d in i.shape] for i in req.model.inputs}


def _gpu_availability(sku: SKU, kind: str, host_runs_sku: bool) -> Availability:
    problem = gpu_toolchain.cuda_missing() if kind == "cuda" else gpu_toolchain.rocm_missing()
    if problem:
        return Availability("no", False, f"cannot compile TVM {kind} code here: {problem}")
    if host_runs_sku and kind == "cuda":
        return Availability("here", True)
    how = f"nvcc {gpu_toolchain.nvcc_version()}" if kind == "cuda" else "LLVM AMDGPU + ld.lld"
    runs = ("runs on the GPU with the TVM runtime (a few MB)" if kind == "cuda" else
            "runs on the GPU with a TVM runtime built with ROCm (USE_ROCM=ON; the PyPI wheel has no HIP)")
    return Availability("cross", False, f"cross-compiled for {sku.arch} with {how}; {runs}")


def _device_code(library: Path, arch: str) -> list[dict[str, Any]]:
    codes = require_device_code(library, arch)
    return [{"kind": c.kind, "arch": c.arch, "bytes": c.bytes} for c in codes]


