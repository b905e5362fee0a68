"""The anchors bench/compare.py runs beside mlopt's builds: what a user gets from one line of each tool.

Each anchor is one function returning an ``Anchor``: a runner (feed -> {output name: array}) that the
bench times and scores, or the reason it did not run (a tool that is missing, a model it does not fit,
an install that could not reach an index); an anchor never ends the bench.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], dict[str, np.ndarray]]

ROOT = Path(__file__).resolve().parents[1]
OLIVE_VENV = ROOT / "bench" / ".venv-olive"
# Olive's own environment: pinned, apart from mlopt's (olive-ai pulls transformers, optuna, torch); torch
# first, so pip takes the CPU build from the local wheels instead of a CUDA one
# (olive-ai 0.13.0 imports requests for its telemetry without declaring it)
OLIVE_PINS = (["torch==2.13.0"], ["olive-ai[cpu]==0.13.0", "onnxruntime==1.32.0", "onnx==1.23.2", "requests"])


@dataclass
class Anchor:
    """One contender: its runner, or why it did not run; the seconds its build took and what it did."""

    name: str
    runner: Runner | None = None
    reason: str = ""
    build_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def not_run(name: str, reason: str) -> Anchor:
    return Anchor(name, reason=" ".join(reason.split())[:240])


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# ---------------------------------------------------------------- torch


def torch_eager(module: Any, inputs: list[str], outputs: list[str]) -> Anchor:
    """The model as PyTorch runs it, in inference mode."""
    return Anchor("torch eager", _torch_runner(module, inputs, outputs))


def torch_compiled(module: Any, inputs: list[str], outputs: list[str]) -> Anchor:
    """``torch.compile(module)`` with its defaults (inductor); compiled on the first call, in the warm-up."""
    import torch

    t0 = time.perf_counter()
    try:
        compiled = torch.compile(module)
    except Exception as e:  # a torch without a working inductor on this machine
        return not_run("torch.compile", first_line(e))
    return Anchor("torch.compile", _torch_runner(compiled, inputs, outputs), build_s=time.perf_counter() - t0)


def _torch_runner(module: Any, inputs: list[str], outputs: list[str]) -> Runner:
    import torch

    def run(feed: Feed) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(feed[n]) for n in inputs])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return {name: o.numpy() for name, o in zip(outputs, outs)}

    return run


# ---------------------------------------------------------------- ONNX Runtime


def ort_session_runner(onnx_file: Path, threads: int) -> Runner:
    """An ONNX Runtime CPU session with its default options (all graph optimizations), ``threads`` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feed: dict(zip(names, sess.run(None, feed)))


def ort_defaults(onnx_file: Path, threads: int) -> Anchor:
    """The exported ONNX file in ONNX Runtime, default session options."""
    return Anchor("ORT fp32 defaults", ort_session_runner(onnx_file, threads))


def is_bert_like(onnx_file: Path) -> bool:
    """A BERT-style encoder: what ONNX Runtime's transformer optimizer (model_type bert) is for."""
    import onnx

    names = {i.name for i in onnx.load(str(onnx_file), load_external_data=False).graph.input}
    return {"input_ids", "attention_mask"} <= names


def ort_fused_int8(onnx_file: Path, work: Path, threads: int) -> Anchor:
    """ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU fusion), then dynamic int8 weights:
    the two calls a user of ONNX Runtime would make for a BERT-style model on CPU."""
    name = "ORT fused + dynamic int8"
    if not is_bert_like(onnx_file):
        return not_run(name, "not a BERT-style model (no input_ids/attention_mask inputs)")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    work.mkdir(parents=True, exist_ok=True)
    fused, int8 = work / "fused.onnx", work / "fused-int8.onnx"
    t0 = time.perf_counter()
    try:
        opt = optimize_model(str(onnx_file), model_type="bert", num_heads=0, hidden_size=0)
        opt.save_model_to_file(str(fused))
        quantize_dynamic(str(fused), str(int8), weight_type=QuantType.QInt8)
    except Exception as e:  # the optimizer or quantizer refusing this graph is a result, not a crash
        return not_run(name, first_line(e))
    return Anchor(name, ort_session_runner(int8, threads), build_s=time.perf_counter() - t0,
                  details={"fused_ops": _fused_ops(opt.get_fused_operator_statistics())})


def _fused_ops(stats: dict[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in stats.items() if v}


# ---------------------------------------------------------------- OpenVINO


def openvino_defaults(onnx_file: Path, threads: int) -> Anchor:
    """``openvino.compile_model`` on the ONNX file for the CPU: default config but the thread count
    every contender gets."""
    name = "OpenVINO fp32 defaults"
    try:
        import openvino as ov
    except ImportError as e:
        return not_run(name, f"openvino not installed ({e})")
    t0 = time.perf_counter()
    try:
        compiled = ov.Core().compile_model(str(onnx_file), "CPU", {"INFERENCE_NUM_THREADS": threads})
    except Exception as e:
        return not_run(name, first_line(e))
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def run(feed: Feed) -> dict[str, np.ndarray]:
        res = request.infer(feed)
        return {n: np.array(res[o]) for n, o in zip(names, compiled.outputs)}

    return Anchor(name, run, build_s=time.perf_counter() - t0)


# ---------------------------------------------------------------- Olive


def olive_auto_opt_int8(onnx_file: Path, work: Path, threads: int, log: Callable[[str], None]) -> Anchor:
    """``olive auto-opt`` on the ONNX file for the CPU provider at int8 (its peephole and transformer
    optimizers, then dynamic int8), run from Olive's own venv (made on first use); timed in ONNX Runtime."""
    name = "Olive auto-opt int8"
    olive = ensure_olive(log)
    if isinstance(olive, str):
        return not_run(name, olive)
    out = work / "olive"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(olive), "auto-opt", "-m", str(onnx_file), "--device", "cpu", "--provider", "CPUExecutionProvider",
           "--precision", "int8", "-o", str(out), "--log_level", "3"]
    t0 = time.perf_counter()
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"}  # the bench may run offline: nothing to send
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    seconds = time.perf_counter() - t0
    models = sorted(out.rglob("*.onnx")) if out.is_dir() else []
    if proc.returncode != 0 or not models:
        return not_run(name, f"olive auto-opt exited {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}")
    return Anchor(name, ort_session_runner(models[0], threads), build_s=seconds,
                  details={"model": str(models[0].relative_to(out)), "command": " ".join(cmd[1:])})


def ensure_olive(log: Callable[[str], None]) -> Path | str:
    """The ``olive`` executable of bench/.venv-olive, installed there if missing; or why it is not there
    (no index reachable, a failed install): offline, the anchor is reported as not run."""
    exe = OLIVE_VENV / "bin" / "olive"
    if exe.is_file():
        return exe
    log(f"installing olive-ai into {OLIVE_VENV} (once)")
    steps = [[sys.executable, "-m", "venv", "--clear", str(OLIVE_VENV)]] + \
        [[str(OLIVE_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--retries", "2", "--timeout", "30", *pins]
         for pins in OLIVE_PINS]  # offline, pip gives up in about a minute instead of retrying for many
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"could not install olive-ai ({cmd[-1]} step exited {proc.returncode}: " \
                   f"{_last_line(proc.stderr)})"
    return exe if exe.is_file() else f"olive-ai installed but {exe} is missing"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:200]
