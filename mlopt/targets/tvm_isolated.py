"""TVM's CPU compile in a fresh interpreter, for reproducible bytes.

The same model, target and TVM version gave different libraries from one process to the next (4
digests in 5 aarch64 builds of the digits example): the slots TVM's VM gives symbolic shapes follow
the iteration order of maps keyed by object addresses, and those addresses follow everything the
process did before, Python's string-hash seed and the address-space randomisation. A fresh
interpreter that does nothing but this compile, with a fixed seed (``PYTHONHASHSEED=0``) and without
address randomisation (``personality(ADDR_NO_RANDOMIZE)``, what ``setarch -R`` does), working in a
folder of its own on names of fixed length, makes the bytes a function of the inputs (with randomisation
on, 2 digests in 3 aarch64 builds of one model; with it off, 1 in 3 from three folders).
It also keeps a compiler crash from taking the build down with it. Costs about 2 s (TVM is imported
without torch, which it only needs for its PyTorch frontend).

Run as ``python -m mlopt.targets.tvm_isolated JOB.json``; the result is written to the job's
``result`` file: ``{}``, or the error to raise in the caller.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlopt.core import errors
from mlopt.core.errors import BackendUnavailable, MloptError


def compile_isolated(onnx_path: Path, target_dict: dict[str, Any], dest: Path, machine: str,
                     shapes: dict[str, list[int | str]] | None = None) -> None:
    """``tvm_lower.compile_module`` of the ONNX file at ``onnx_path`` in a child interpreter; its errors are
    raised here as they were there."""
    with tempfile.TemporaryDirectory(prefix="mlopt-tvm-") as tmp:
        work = Path(tmp)
        # The child sees only names of fixed length inside its own folder (the model through a link to
        # its folder, so external data still resolves; the library written beside it): where the
        # checkout or the store sits changes no allocation in the compiler, so no byte of its output.
        (work / "in").symlink_to(Path(onnx_path).resolve().parent, target_is_directory=True)
        job = {"onnx": f"in/{Path(onnx_path).name}", "target": target_dict, "dest": "out.so",
               "machine": machine, "result": "result.json", "shapes": shapes}
        (work / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.run([sys.executable, "-m", "mlopt.targets.tvm_isolated", "job.json"], env=env, cwd=work,
                              capture_output=True, text=True, preexec_fn=_fixed_addresses)
        result = work / "result.json"
        if not result.is_file():
            raise BackendUnavailable(f"TVM's compiler died ({_how(proc.returncode)}): {_tail(proc.stderr)}")
        _reraise(json.loads(result.read_text()))
        shutil.move(work / "out.so", dest)


ADDR_NO_RANDOMIZE = 0x0040000  # linux/personality.h


def _fixed_addresses() -> None:
    """In the child, before it executes Python: turn address-space randomisation off for it (Linux's
    personality(2); where the kernel refuses, the build still runs, its bytes possibly not fixed)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)  # 0xffffffff queries without changing
    if current != -1:
        libc.personality(current | ADDR_NO_RANDOMIZE)


def _how(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit {code}"


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _reraise(outcome: dict[str, Any]) -> None:
    """Raise the child's error: an MloptError as its own class; a compiler's own error under its name."""
    if not outcome:
        return
    name, message, hint = outcome["error"], outcome["message"], outcome.get("hint")
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, MloptError):
        try:
            raise cls(message, hint=hint)
        except TypeError:  # a subclass with its own constructor: keep the message
            raise BackendUnavailable(message, hint=hint) from None
    raise type(name, (RuntimeError,), {})(message)  # builds.py records "TVMError: ..." as before


def main(job_file: str) -> None:
    sys.modules["torch"] = None  # type: ignore[assignment]  # TVM's torch frontend is not used here
    job = json.loads(Path(job_file).read_text())
    outcome: dict[str, Any] = {}
    try:
        import onnx

        from mlopt.targets.tvm_lower import compile_module

        compile_module(onnx.load(job["onnx"]), job.get("shapes"), job["target"], Path(job["dest"]), job["machine"])
    except MloptError as e:
        outcome = {"error": type(e).__name__, "message": e.message, "hint": e.hint}
    except Exception as e:  # the compiler's own error: its type name and first line, as in the parent
        text = str(e).splitlines()[0][:300] if str(e) else ""
        outcome = {"error": type(e).__name__, "message": text}
    Path(job["result"]).write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1])
