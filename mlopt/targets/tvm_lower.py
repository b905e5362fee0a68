"""Lowering for the TVM backend: an ONNX model to a shared library for a target and a machine.

Used in-process (GPU and tuned builds) and by ``tvm_isolated``'s fresh interpreter (untuned CPU builds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mlopt.core.errors import BackendUnavailable
from mlopt.targets import gpu_toolchain
from mlopt.targets.tvm_onnx import import_onnx

GPU_KINDS = {"cuda": "cuda", "rocm": "rocm"}  # TVM target kind -> runtime device
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
CROSS_LINKERS = {"aarch64": ["aarch64-linux-gnu-gcc", "ld.lld", "ld.lld-22", "ld.lld-19", "ld.lld-18", "ld.lld-17"]}

def elf_machine(path: Path) -> int:
    """e_machine of an ELF file (62 x86-64, 183 aarch64)."""
    head = path.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise BackendUnavailable(f"{path.name} is not an ELF shared library")
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def _cross_linker(machine: str) -> str | None:
    for tool in CROSS_LINKERS.get(machine, []):
        if shutil.which(tool):
            return tool
    return None


def compile_module(proto: Any, shapes: dict[str, list[int]] | None, target_dict: dict[str, Any], dest: Path,
                   machine: str, database: Any = None) -> None:
    """Import ``proto``, lower it for ``target_dict`` (applying tuning records from ``database``), and
    export the library for ``machine`` at ``dest``, checking its ELF machine."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = import_onnx(proto, shapes, from_onnx)
    gpu = target_dict.get("kind") in GPU_KINDS
    host = {"kind": "llvm", "mtriple": f"{machine}-linux-gnu"}
    target = tvm.target.Target(target_dict, host=host) if gpu else tvm.target.Target(target_dict)
    with target:
        mod = relax.get_pipeline("zero")(mod)  # legalize and fuse: the default pipeline does not fuse on CPU
    if database is not None:
        with target, database, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if gpu:
        mod = _gpu_schedules(mod, target)
    quiet = gpu_toolchain.drop_native_warnings("Cannot get maximum number of threads for AMD codegen")
    with target, quiet:  # the CUDA compile callback reads the architecture from the current target
        ex = tvm.compile(mod, target=target)
    ex.export_library(str(dest), **_linker(machine))
    got = elf_machine(dest)
    if got != ELF_MACHINES[machine]:
        raise BackendUnavailable(f"TVM built {dest.name} for ELF machine {got}, not {machine}")


def _gpu_schedules(mod: Any, target: Any) -> Any:
    """dlight's default GPU schedules: without thread bindings TVM would emit host code for kernels."""
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)


def _linker(machine: str) -> dict[str, Any]:
    """export_library options: the host compiler natively, a cross linker for another machine."""
    if os.uname().machine == machine:
        return {}
    tool = _cross_linker(machine)
    if tool is None:
        raise BackendUnavailable(f"no linker for {machine}", hint="apt-get install gcc-aarch64-linux-gnu")
    if "gcc" in tool:
        from tvm.support import cc

        return {"fcompile": cc.cross_compiler(tool)}

    def lld_shared(output: str, objects: list[str], options: Any = None) -> None:
        subprocess.run([tool, "-shared", "-o", output, *objects], check=True)

    lld_shared.output_format = "so"  # type: ignore[attr-defined]
    return {"fcompile": lld_shared}
