"""What this machine has: CPU model and features, GPUs and drivers, toolchains. Cheap to call."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from mlopt.targets.backends import package_version
from mlopt.targets.catalog import SKU

# x86-64 micro-architecture levels (psABI), by the /proc/cpuinfo flags each adds.
X86_LEVELS = {
    "x86-64-v2": ["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"],
    "x86-64-v3": ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"],
    "x86-64-v4": ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
}
NOTABLE = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
           "asimd", "sve", "sve2", "i8mm", "bf16"]


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model name", "CPU part")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def x86_level(flags: frozenset[str]) -> str | None:
    level = None
    for name, needed in X86_LEVELS.items():
        if not all(f in flags for f in needed):
            break
        level = name
    return level


def host() -> dict[str, Any]:
    """Where a figure was measured: stamped on every measurement."""
    flags = cpu_flags()
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "x86_level": x86_level(flags),
        "features": sorted(f for f in NOTABLE if f in flags),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def host_runs(sku: SKU) -> tuple[bool, str]:
    """Can code built for ``sku`` run on this machine (and so be validated and measured here)?"""
    if sku.needs_gpu:
        return False, f"{sku.name} is a GPU SKU and this machine has no matching GPU"
    if platform.machine() != sku.machine:
        return False, f"{sku.name} is {sku.machine}; this machine is {platform.machine()}"
    missing = [f for f in sku.requirements.cpu_flags if f not in cpu_flags()]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)} that {sku.name} code uses"
    return True, ""


def toolchains() -> dict[str, str]:
    """Compilers and runtimes mlopt can use, with versions (no heavy imports)."""
    found = {p: package_version(p) for p in ("onnxruntime", "onnx", "apache-tvm", "apache-tvm-ffi", "torch")}
    for tool, args in {"nvcc": ["--version"], "ld.lld": ["--version"], "aarch64-linux-gnu-gcc": ["--version"],
                       "nvidia-smi": ["--version"], "rocm-smi": ["--version"]}.items():
        found[tool] = _tool_version(tool, args)
    return found


def _tool_version(tool: str, args: list[str]) -> str:
    path = shutil.which(tool)
    if not path:
        return "absent"
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"present at {path} (version unknown)"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip()[:80] if lines else f"present at {path}"


def gpus() -> list[dict[str, str]]:
    """GPUs visible through nvidia-smi, /sys/class/kfd (AMD) or /sys/class/drm (Intel)."""
    found: list[dict[str, str]] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout
            for line in out.strip().splitlines():
                name, driver, mem = (s.strip() for s in line.split(","))
                found.append({"vendor": "nvidia", "name": name, "driver": driver, "memory": mem})
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    kfd = Path("/sys/class/kfd/kfd/topology/nodes")
    if kfd.is_dir():
        for node in kfd.iterdir():
            props = (node / "properties").read_text() if (node / "properties").is_file() else ""
            if "gfx_target_version" in props and "gfx_target_version 0" not in props:
                found.append({"vendor": "amd", "name": f"kfd node {node.name}", "driver": "amdgpu", "memory": ""})
    for card in sorted(Path("/sys/class/drm").glob("card[0-9]*")) if Path("/sys/class/drm").is_dir() else []:
        vendor = (card / "device" / "vendor").read_text().strip() if (card / "device" / "vendor").is_file() else ""
        if vendor == "0x8086":
            found.append({"vendor": "intel", "name": card.name, "driver": "i915/xe", "memory": ""})
    return found
