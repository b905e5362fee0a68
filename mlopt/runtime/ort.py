"""ONNX Runtime loader: the build's ``model.onnx`` with its ``session.json`` settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from . import Runner, Unavailable

SESSION_FILE = "session.json"


def settings(folder: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The build's session settings (none when the build has no session file)."""
    path = folder / (meta.get("session") or SESSION_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def providers(wanted: list[Any], available: list[str]) -> list[Any]:
    """The wanted providers (names or [name, options]) this onnxruntime build has, in order."""
    named = [p if isinstance(p, str) else tuple(p) for p in wanted]
    have = [p for p in named if (p if isinstance(p, str) else p[0]) in available]
    if not have:
        names = [p if isinstance(p, str) else p[0] for p in named]
        raise Unavailable(f"none of the execution providers {names} is in this onnxruntime build "
                          f"(it has {', '.join(available)})")
    return have


def onnx_file(path: Path, threads: int = 1, optimize: bool = False) -> Runner:
    """An ONNX file on ONNX Runtime's CPU provider: the reference every check compares with (basic
    graph optimizations), or with ``optimize`` all of them (what a pass's accuracy judge runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feed: dict(zip(names, sess.run(names, feed)))


def load(folder: Path, meta: Mapping[str, Any], threads: int | None = None) -> Runner:
    """A session on the build's execution providers; ``threads`` overrides the build's intra-op threads."""
    import onnxruntime as ort

    s = settings(folder, meta)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                            s.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    opts.intra_op_num_threads = int(threads or s.get("intra_op_num_threads") or 0)
    opts.inter_op_num_threads = int(s.get("inter_op_num_threads", 1))
    opts.execution_mode = getattr(ort.ExecutionMode, s.get("execution_mode", "ORT_SEQUENTIAL"))
    opts.log_severity_level = 3
    wanted = s.get("providers") or meta.get("providers") or ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(folder / (meta.get("entry") or "model.onnx")), opts,
                                providers=providers(wanted, ort.get_available_providers()))
    names = [o.name for o in sess.get_outputs()]

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(names, sess.run(names, feed)))

    return run
