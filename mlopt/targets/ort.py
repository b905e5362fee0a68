"""ONNX Runtime backend: an offline-optimized .onnx plus the session settings to serve it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlopt.compiler.model import onnx_files
from mlopt.errors import BackendUnavailable
from mlopt.targets.backends import Availability, Backend, BuildRequest, Runner, package_version
from mlopt.targets.catalog import SKU

SESSION_FILE = "session.json"


class OrtBackend(Backend):
    name = "onnxruntime"
    atol = 1e-4
    rtol = 1e-3

    def availability(self, sku: SKU, host_runs_sku: bool) -> Availability:
        if sku.kind != "cpu":
            return Availability("no", False, "GPU execution providers come with the GPU SKU support")
        if host_runs_sku:
            return Availability("here", True)
        return Availability("cross", False, f"this machine cannot run {sku.arch} code; the model is portable ONNX")

    def build(self, req: BuildRequest, out: Path) -> dict[str, Any]:
        import onnxruntime as ort

        # EXTENDED fusions are portable across CPUs; layout (NCHWc) rewrites depend on the
        # exact CPU, so they are left to session creation on the serving machine (ORT_ENABLE_ALL).
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(out / "model.onnx")
        opts.log_severity_level = 3
        if len(onnx_files(req.model.onnx_path)) > 1:  # external weights stay external, beside the model
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(req.model.onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendUnavailable(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:300]}") from None
        session = {
            "providers": ["CPUExecutionProvider"],
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "intra_op_num_threads": req.sku.threads or req.threads,
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
        }
        (out / SESSION_FILE).write_text(json.dumps(session, indent=2))
        return {"precision": "float32", "entry": "model.onnx", "session": SESSION_FILE, "format": "onnx"}

    def load(self, artifact: Path, meta: dict[str, Any], threads: int) -> Runner:
        import onnxruntime as ort

        settings = json.loads((artifact / meta["session"]).read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["graph_optimization_level"])
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = settings["inter_op_num_threads"]
        opts.execution_mode = getattr(ort.ExecutionMode, settings["execution_mode"])
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(artifact / meta["entry"]), opts, providers=settings["providers"])
        names = [o.name for o in sess.get_outputs()]

        def run(feed: dict[str, Any]) -> dict[str, Any]:
            return dict(zip(names, sess.run(names, feed)))

        return run

    def toolchain(self) -> dict[str, str]:
        return {"onnxruntime": package_version("onnxruntime")}
