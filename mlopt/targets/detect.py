"""What this machine has: CPU model and features, GPUs and drivers, runtimes, toolchains. Cheap to call.

GPU and runtime detection is a set of small probes, each reading the machine through an ``Env``
(commands to run, a filesystem root, installed packages), so tests replay recorded tool outputs
(``mlopt.targets.doctor.replay_env``) for machines we do not have. No probe imports torch or TVM.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from mlopt.core.errors import UnknownName
from mlopt.runtime import isa
from mlopt.runtime.gpus import gfx_arch, sm_arch, sm_from_capability
from mlopt.targets.catalog import SKU, Catalog
from mlopt.core.util import package_version

X86_LEVELS, NOTABLE = isa.X86_LEVELS, isa.NOTABLE
HOST_TARGET = "host"  # the target name that resolves to the best catalog SKU this machine runs


@lru_cache(maxsize=1)
def _real_cpu_flags() -> frozenset[str]:
    return isa.real_cpu_flags()


def cpu_flags() -> frozenset[str]:
    """The CPU flags mlopt relies on: this CPU's, narrowed by ``MLOPT_CPU_FLAGS`` (``mlopt.runtime.isa``)."""
    return isa.narrow(_real_cpu_flags(), os.environ.get(isa.ENV))


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
    found = {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "x86_level": x86_level(flags),
        "features": sorted(f for f in NOTABLE if f in flags),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    override = os.environ.get(isa.ENV, "").strip()
    return {**found, "cpu_flags_override": override} if override else found


def host_runs(sku: SKU) -> tuple[bool, str]:
    """Can code built for ``sku`` run on this machine (and so be validated and measured here)?"""
    if sku.needs_gpu:
        gpu = next((g for g in _gpus_here() if _is_sku(g, sku)), None)
        if gpu is None:
            return False, f"{sku.name} is a GPU SKU and this machine has no matching GPU"
        return True, ""
    reason = isa.refusal(sku.requires, f"{sku.name} code")
    return (False, reason) if reason else (True, "")


def host_sku(catalog: Catalog) -> SKU:
    """The catalog's best CPU SKU this machine runs: the one whose code needs the most CPU flags
    (x86-64-v4 over v3 over v2; on Arm, SVE over plain NEON), the catalog's order breaking ties."""
    runnable = [s for s in catalog.skus if s.kind == "cpu" and host_runs(s)[0]]
    if not runnable:
        cpus = [s.name for s in catalog.skus if s.kind == "cpu"]
        raise UnknownName(f"no CPU SKU in the catalog runs on this machine ({platform.machine()}, "
                          f"{', '.join(isa.notable(cpu_flags())) or 'no notable CPU flags'}); "
                          f"the catalog has {', '.join(cpus) or 'none'}",
                          hint="add a SKU for this CPU with --catalog FILE, or name a target instead of 'host'")
    return max(runnable, key=lambda s: (len(s.requirements.cpu_flags), -catalog.skus.index(s)))


def get_target(catalog: Catalog, name: str) -> SKU:
    """The SKU a target name stands for: 'host' resolved on this machine, else a catalog name or alias."""
    return host_sku(catalog) if name.strip().lower() == HOST_TARGET else catalog.get(name)


def resolve_targets(catalog: Catalog, names: Sequence[str]) -> list[tuple[SKU, str | None]]:
    """Each target name as (SKU, the name 'host' when it stood for it); duplicates are dropped, so
    ``[host, cpu-x86-64-v4]`` on an AVX-512 machine builds that SKU once."""
    out: list[tuple[SKU, str | None]] = []
    for name in names:
        sku = get_target(catalog, name)
        requested = HOST_TARGET if name.strip().lower() == HOST_TARGET else None
        known = next((i for i, (s, _) in enumerate(out) if s.name == sku.name), None)
        if known is None:
            out.append((sku, requested))
        elif requested:
            out[known] = (sku, requested)
    return out


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
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"present at {path} (version unknown)"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip()[:80] if lines else f"present at {path}"


# ------------------------------------------------------------------ how probes read the machine


def _run_live(cmd: Sequence[str]) -> str | None:
    path = shutil.which(cmd[0])
    if not path:
        return None
    try:
        done = subprocess.run([path, *cmd[1:]], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _installed(name: str) -> str | None:
    version = package_version(name)
    return None if version == "absent" else version


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates a top-level package without importing it
    locations = spec.submodule_search_locations if spec else None
    return Path(next(iter(locations))) if locations else None


def _load_nvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py; needs libnvidia-ml.so.1 from the driver, absent on most machines
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


# ONNX Runtime ships as one of these distributions, all importing as ``onnxruntime``.
ORT_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-openvino")


def _python_live(query: str) -> list[str] | None:
    try:
        if query == "onnxruntime.providers" and any(_installed(d) for d in ORT_DISTS):
            import onnxruntime

            return list(onnxruntime.get_available_providers())
        if query == "openvino.devices" and _installed("openvino"):
            import openvino

            return list(openvino.Core().available_devices)
    except (ImportError, OSError, RuntimeError) as e:  # a broken install is a finding, not a crash
        return [f"cannot import: {e}"]
    return None


@dataclass(frozen=True)
class Env:
    """Where probes read the machine. ``live_env()`` is this machine; tests pass recorded outputs."""

    run: Callable[[Sequence[str]], str | None] = _run_live  # stdout of a command, None when absent or failing
    which: Callable[[str], str | None] = shutil.which
    root: Path = Path("/")  # filesystem root for /sys, /opt and /usr paths
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    package: Callable[[str], str | None] = _installed  # installed Python distribution version
    package_dir: Callable[[str], Path | None] = _package_dir
    python: Callable[[str], list[str] | None] = _python_live  # cheap in-process queries (providers, devices)
    nvml: Callable[[], Any] = _load_nvml  # the initialised pynvml module, or None

    def path(self, p: str | Path) -> Path:
        """``p`` (an absolute path on the machine) under this environment's root."""
        return self.root / str(p).lstrip("/")

    def glob(self, pattern: str) -> list[Path]:
        """Paths matching an absolute glob ``pattern`` under the root, sorted."""
        return sorted(Path(p) for p in glob.glob(str(self.path(pattern))))


def live_env() -> Env:
    """This machine."""
    return Env()


# ------------------------------------------------------------------ versions


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """The leading dotted number of ``text``: '580.65.06' -> (580, 65, 6), '6.2.0-66' -> (6, 2, 0)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def version_at_least(found: str | None, need: str) -> bool | None:
    """Is ``found`` >= ``need``, numerically per dotted field? None when either cannot be read."""
    have, want = parse_version(found), parse_version(need)
    if have is None or want is None:
        return None
    width = max(len(have), len(want))
    return have + (0,) * (width - len(have)) >= want + (0,) * (width - len(want))


gfx_name = gfx_arch  # KFD's packed ISA number to an LLVM target (the runtime's one detector)


# ------------------------------------------------------------------ GPUs


@dataclass(frozen=True)
class GPU:
    """One GPU as a detection tool reports it."""

    vendor: str  # nvidia | amd | intel
    name: str  # product name as the tool prints it, matched against the catalog's device.match
    arch: str | None = None  # sm_90, gfx942 ...; None where the tool does not say
    driver: str | None = None  # kernel driver version
    memory_mib: int | None = None
    pci_id: str | None = None  # "vendor:device", e.g. "10de:2330"
    source: str = ""  # the tool (or tools) it was read from

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _hex4(value: str | int | None) -> str | None:
    try:
        return f"{int(value, 16) if isinstance(value, str) else int(value):04x}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _pci(vendor: str | int | None, device: str | int | None) -> str | None:
    v, d = _hex4(vendor), _hex4(device)
    return f"{v}:{d}" if v and d else None


def _mib(text: str | None) -> int | None:
    m = re.match(r"\s*(\d+)", text or "")
    return int(m.group(1)) if m else None


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,pci.device_id",
                    "--format=csv,noheader"]


def nvidia_smi_gpus(env: Env) -> list[GPU]:
    """NVIDIA GPUs from ``nvidia-smi --query-gpu=... --format=csv,noheader``."""
    found = []
    for line in (env.run(NVIDIA_SMI_QUERY) or "").splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 5:
            continue
        name, driver, memory, cap, pci = cells
        combined = int(pci, 16) if re.fullmatch(r"0[xX][0-9a-fA-F]+", pci) else None  # 0x233010DE: device, vendor
        found.append(GPU("nvidia", name, sm_from_capability(cap),
                         driver, _mib(memory), _pci(combined & 0xFFFF, combined >> 16) if combined else None,
                         "nvidia-smi"))
    return found


def nvml_gpus(env: Env) -> list[GPU]:
    """NVIDIA GPUs through NVML (``pynvml``), where libnvidia-ml loads."""
    nv = env.nvml()
    if nv is None:
        return []
    try:
        driver = str(nv.nvmlSystemGetDriverVersion())
        found = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
            combined = nv.nvmlDeviceGetPciInfo(h).pciDeviceId
            found.append(GPU("nvidia", str(nv.nvmlDeviceGetName(h)), sm_arch(major, minor), driver,
                             nv.nvmlDeviceGetMemoryInfo(h).total // 2**20,
                             _pci(combined & 0xFFFF, combined >> 16), "nvml"))
        return found
    except nv.NVMLError:
        return []
    finally:
        nv.nvmlShutdown()


AMD_SMI_STATIC = ["amd-smi", "static", "--asic", "--bus", "--driver", "--vram", "--json"]


def _amd_smi_memory(vram: dict[str, Any]) -> int | None:
    size = vram.get("size")
    if isinstance(size, dict):  # ROCm 6.4+: {"value": 196592, "unit": "MB"}
        return _mib(str(size.get("value")))
    return _mib(str(vram.get("vram_size_mb", vram.get("vram_size", ""))))  # ROCm 6.0-6.3


def amd_smi_gpus(env: Env) -> list[GPU]:
    """AMD GPUs from ``amd-smi static --json`` (a list up to ROCm 6.3, ``{"gpu_data": [...]}`` since)."""
    data = _json(env.run(AMD_SMI_STATIC))
    records = data.get("gpu_data", []) if isinstance(data, dict) else data or []
    found = []
    for rec in records:
        asic, driver = rec.get("asic") or {}, rec.get("driver") or {}
        if not isinstance(asic, dict) or not asic.get("market_name"):
            continue
        version = driver.get("version", driver.get("driver_version")) if isinstance(driver, dict) else None
        found.append(GPU("amd", asic["market_name"], asic.get("target_graphics_version"),
                         version if version not in (None, "N/A") else None,
                         _amd_smi_memory(rec.get("vram") or {}), _pci(asic.get("vendor_id"), asic.get("device_id")),
                         "amd-smi"))
    return found


ROCM_SMI = ["rocm-smi", "--showproductname", "--showdriverversion", "--json"]


def rocm_smi_gpus(env: Env) -> list[GPU]:
    """AMD GPUs from ``rocm-smi --showproductname --showdriverversion --json``."""
    data = _json(env.run(ROCM_SMI))
    if not isinstance(data, dict):
        return []
    system = {k.lower(): v for k, v in (data.get("system") or {}).items()}
    found = []
    for key in sorted((k for k in data if re.fullmatch(r"card\d+", k)), key=lambda k: int(k[4:])):
        card = {k.lower(): v for k, v in data[key].items()}  # "Card Series" (ROCm 6) / "Card series" (older)
        found.append(GPU("amd", card.get("card series") or card.get("device name") or key, card.get("gfx version"),
                         system.get("driver version"), None, _pci("1002", card.get("card model")), "rocm-smi"))
    return found


def _properties(path: Path) -> dict[str, str]:
    pairs = (line.split(None, 1) for line in path.read_text().splitlines() if line.strip())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}


def kfd_gpus(env: Env) -> list[GPU]:
    """AMD GPUs from the KFD topology (``/sys/class/kfd/kfd/topology/nodes/*/properties``)."""
    nodes = env.glob("/sys/class/kfd/kfd/topology/nodes/*/properties")
    driver_file = env.path("/sys/module/amdgpu/version")  # present with the amdgpu-dkms driver
    driver = driver_file.read_text().strip() if driver_file.is_file() else None
    found = []
    for props_file in sorted(nodes, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        props = _properties(props_file)
        target = int(props.get("gfx_target_version", "0") or 0)
        if not target:  # CPU nodes report 0
            continue
        pci = _pci(int(props.get("vendor_id", 0)), int(props.get("device_id", 0)))
        memory = int(props.get("local_mem_size", 0)) // 2**20 or None
        found.append(GPU("amd", f"AMD {gfx_name(target)} GPU [{pci}]", gfx_name(target), driver, memory, pci, "kfd"))
    return found


XPU_SMI = ["xpu-smi", "discovery", "-j"]


def xpu_smi_gpus(env: Env) -> list[GPU]:
    """Intel GPUs from ``xpu-smi discovery -j``."""
    data = _json(env.run(XPU_SMI))
    found = []
    for dev in (data or {}).get("device_list", []) if isinstance(data, dict) else []:
        if dev.get("device_type", "GPU") != "GPU":
            continue
        memory = dev.get("memory_physical_size_byte")
        found.append(GPU("intel", dev.get("device_name", "Intel GPU"), None, dev.get("driver_version"),
                         int(memory) // 2**20 if memory else None, _pci("8086", dev.get("pci_device_id")),
                         "xpu-smi"))
    return found


def drm_intel_gpus(env: Env) -> list[GPU]:
    """Intel GPUs from ``/sys/class/drm/card*/device/{vendor,device}`` (vendor 0x8086)."""
    found = []
    for card in env.glob("/sys/class/drm/card*"):
        vendor, device = card / "device" / "vendor", card / "device" / "device"
        if not re.fullmatch(r"card\d+", card.name) or not vendor.is_file() or not device.is_file():
            continue
        if vendor.read_text().strip().lower() == "0x8086":
            pci = _pci("8086", device.read_text().strip())
            found.append(GPU("intel", f"Intel GPU [{pci}]", None, None, None, pci, "drm"))
    return found


# Per vendor, the probes in order of preference: the first that finds GPUs lists them, later ones only
# fill fields it left empty (kfd gives the gfx target that rocm-smi may not; amd-smi gives the name).
GPU_PROBES: dict[str, list[Callable[[Env], list[GPU]]]] = {
    "nvidia": [nvml_gpus, nvidia_smi_gpus],
    "amd": [amd_smi_gpus, rocm_smi_gpus, kfd_gpus],
    "intel": [xpu_smi_gpus, drm_intel_gpus],
}
_FILLABLE = ("arch", "driver", "memory_mib", "pci_id")


def _fill(gpu: GPU, donor: GPU) -> GPU:
    missing = {f: getattr(donor, f) for f in _FILLABLE if getattr(gpu, f) is None and getattr(donor, f) is not None}
    return replace(gpu, **missing, source=f"{gpu.source}+{donor.source}") if missing else gpu


def _merge(listed: list[GPU], other: list[GPU]) -> list[GPU]:
    if len(other) == len(listed):
        return [_fill(g, d) for g, d in zip(listed, other)]
    if other and len({(d.arch, d.driver, d.pci_id) for d in other}) == 1:  # one kind of GPU: any record will do
        return [_fill(g, other[0]) for g in listed]
    return listed


def _complete(gpus: list[GPU]) -> bool:
    return all(getattr(g, f) is not None for g in gpus for f in _FILLABLE)


def detect_gpus(env: Env | None = None) -> list[GPU]:
    """Every GPU the probes find, one record per device."""
    env = env or live_env()
    found: list[GPU] = []
    for probes in GPU_PROBES.values():
        listed: list[GPU] = []
        for probe in probes:
            if listed and _complete(listed):
                break
            more = probe(env)
            listed = _merge(listed, more) if listed else more
        found += listed
    return found


@lru_cache(maxsize=1)
def _gpus_here() -> tuple["GPU", ...]:
    return tuple(detect_gpus())


def _is_sku(gpu: "GPU", sku: SKU) -> bool:
    """A detected GPU is this SKU: same vendor, named or PCI-identified as it, same arch where known."""
    named = sku.matches_device(gpu.name) or (gpu.pci_id or "").lower() in (p.lower() for p in sku.device.pci_ids)
    return gpu.vendor == sku.vendor and named and (gpu.arch is None or gpu.arch == sku.arch)


def gpus() -> list[dict[str, Any]]:
    """GPUs on this machine as plain dicts (vendor, name, arch, driver, memory_mib, pci_id, source)."""
    return [g.as_dict() for g in detect_gpus()]
