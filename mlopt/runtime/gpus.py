"""The GPU this machine has, as an engine's cache key names it: NVIDIA through NVML (nvidia-ml-py)
or nvidia-smi, AMD through the kfd topology. The one GPU-architecture detector: ``mlopt doctor``'s
probes and the engine loaders both read the architecture names from here. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")


@dataclass(frozen=True)
class Device:
    """The GPU an engine is built for: what the cache key holds."""

    name: str
    arch: str  # sm_90, gfx942
    driver: str



def nvidia_device() -> Device | None:
    """The first visible NVIDIA GPU, through NVML (nvidia-ml-py) or else nvidia-smi."""
    return _nvml_device() or _smi_device()


def _nvml_device() -> Device | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return Device(_text(pynvml.nvmlDeviceGetName(handle)), sm_arch(major, minor),
                      _text(pynvml.nvmlSystemGetDriverVersion()))
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _smi_device() -> Device | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
        name, cap, driver = (s.strip() for s in out.strip().splitlines()[0].rsplit(",", 2))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None
    arch = sm_from_capability(cap)
    return Device(name, arch, driver) if arch else None


def amd_device(nodes: Path | None = None) -> Device | None:
    """The first AMD GPU in the kfd topology (CPU nodes report gfx_target_version 0)."""
    root = nodes or KFD_NODES
    if not root.is_dir():
        return None
    for node in sorted(root.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        props = _kfd_properties(node / "properties")
        if props.get("gfx_target_version", 0):
            arch = gfx_arch(props["gfx_target_version"])
            return Device(f"AMD {arch} (device 0x{props.get('device_id', 0):04x})", arch, _amdgpu_driver())
    return None


def gfx_arch(version: int) -> str:
    """kfd's gfx_target_version (major*10000 + minor*100 + stepping) as LLVM names it: 90402 -> gfx942,
    90010 -> gfx90a, 110501 -> gfx1151."""
    return f"gfx{version // 10000}{version // 100 % 100:x}{version % 100:x}"


def sm_arch(major: int | str, minor: int | str) -> str:
    """A CUDA compute capability as its architecture name: (9, 0) -> sm_90."""
    return f"sm_{major}{minor}"


def sm_from_capability(cap: str) -> str | None:
    """``nvidia-smi``'s compute_cap text as an architecture name: "9.0" -> sm_90 (None if not N.N)."""
    major, dot, minor = cap.strip().partition(".")
    return sm_arch(major, minor) if dot and major.isdigit() and minor.isdigit() else None


def _kfd_properties(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split() for line in lines)
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _amdgpu_driver() -> str:
    version = Path("/sys/module/amdgpu/version")
    if version.is_file():
        return "amdgpu " + version.read_text().strip()
    return "kernel " + os.uname().release  # the in-tree amdgpu driver is versioned by the kernel


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
