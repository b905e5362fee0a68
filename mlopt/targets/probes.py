"""What runtimes and toolchains this machine has, probed through an ``Env`` (so a recorded machine
replays them): GPU runtimes (CUDA, ROCm, Level Zero, oneAPI), each backend's inference runtime
(the components its ``BackendSpec.doctor`` names) and the compilers GPU builds need. No probe
imports torch, TVM or an engine library. ``mlopt doctor`` (``doctor.py``) checks them against the
catalog's SKU requirements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlopt.targets.backends import backend_specs
from mlopt.targets.catalog import Catalog
from mlopt.targets.detect import ORT_DISTS, Env, parse_version, version_at_least


@dataclass(frozen=True)
class Component:
    """A runtime or toolchain: present or not, its version, and where that was read."""

    name: str
    present: bool
    version: str | None = None
    source: str = ""
    detail: str = ""


# ------------------------------------------------------------------ runtimes


def _shown(env: Env, path: Path) -> str:
    """``path`` as it is on the machine (without a replay root)."""
    return "/" + str(path.relative_to(env.root))


def _newest(env: Env, name: str, patterns: list[str]) -> Component | None:
    """The newest ``lib.so.X.Y.Z`` matching ``patterns``, its version read from the file name."""
    files = [p for pattern in patterns for p in env.glob(pattern) if parse_version(p.name.split(".so.", 1)[-1])]
    if not files:
        return None
    best = max(files, key=lambda p: parse_version(p.name.split(".so.", 1)[1]) or ())
    return Component(name, True, best.name.split(".so.", 1)[1], _shown(env, best))


def _package(env: Env, name: str, dists: tuple[str, ...], detail: str = "") -> Component | None:
    for dist in dists:
        if env.package(dist):
            return Component(name, True, env.package(dist), f"python package {dist}", detail)
    return None


def _nvml_cuda(env: Env) -> str | None:
    nv = env.nvml()
    if nv is None:
        return None
    try:
        v = nv.nvmlSystemGetCudaDriverVersion()
        return f"{v // 1000}.{v % 1000 // 10}"
    except nv.NVMLError:
        return None
    finally:
        nv.nvmlShutdown()


def cuda_runtime(env: Env) -> Component:
    """The CUDA version the NVIDIA driver supports; without a driver, the local CUDA runtime's."""
    m = re.search(r"CUDA Version\s*:\s*([\d.]+)", env.run(["nvidia-smi", "--version"]) or "")
    if m:
        return Component("cuda", True, m.group(1), "nvidia-smi --version", "the CUDA version the driver supports")
    if version := _nvml_cuda(env):
        return Component("cuda", True, version, "NVML", "the CUDA version the driver supports")
    local = (_cuda_toolkit(env)
             or _newest(env, "cuda", ["/usr/local/cuda*/lib64/libcudart.so.*", "/usr/lib/*-linux-gnu/libcudart.so.*"])
             or _package(env, "cuda", ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12")))
    if local:
        return Component("cuda", True, local.version, local.source, "CUDA runtime library; no NVIDIA driver found")
    return Component("cuda", False, source="no NVIDIA driver, libcudart or CUDA runtime package")


def _cuda_toolkit(env: Env) -> Component | None:
    """The newest ``/usr/local/cuda-X.Y`` holding a libcudart (the toolkit's own install layout)."""
    dirs = [d for d in env.glob("/usr/local/cuda-*") if parse_version(d.name[5:]) and any(d.glob("lib*/libcudart.so*"))]
    best = max(dirs, key=lambda d: parse_version(d.name[5:]) or (), default=None)
    return Component("cuda", True, best.name[5:], _shown(env, best)) if best else None


def rocm_runtime(env: Env) -> Component:
    """ROCm from ``$ROCM_PATH/.info/version`` or ``/opt/rocm*/.info/version``."""
    versioned = sorted((_shown(env, p) for p in env.glob("/opt/rocm-*")), reverse=True)
    bases = [env.environ.get("ROCM_PATH"), "/opt/rocm", *versioned]
    for base in filter(None, bases):
        info = env.path(base) / ".info" / "version"
        if info.is_file():
            where = _shown(env, info)
            return Component("rocm", True, info.read_text().strip(), where)
    return Component("rocm", False, source="no $ROCM_PATH/.info/version or /opt/rocm*/.info/version")


def level_zero_runtime(env: Env) -> Component:
    """The oneAPI Level Zero loader, its version read from ``libze_loader.so.1.X.Y``."""
    found = _newest(env, "level_zero", ["/usr/lib/*-linux-gnu/libze_loader.so.1.*", "/usr/lib64/libze_loader.so.1.*",
                                        "/usr/local/lib/libze_loader.so.1.*"])
    return found or Component("level_zero", False, source="no libze_loader.so.1.* in /usr/lib")


def oneapi_runtime(env: Env) -> Component:
    """Intel oneAPI: ``$ONEAPI_ROOT/compiler/<version>`` or the ``intel-sycl-rt`` Python package."""
    root = env.environ.get("ONEAPI_ROOT", "/opt/intel/oneapi")
    versions = [p for p in env.glob(f"{root}/compiler/*") if p.is_dir() and parse_version(p.name)]
    if versions:
        best = max(versions, key=lambda p: parse_version(p.name) or ())
        return Component("oneapi", True, best.name, _shown(env, best))
    return (_package(env, "oneapi", ("intel-sycl-rt", "dpcpp-cpp-rt"))
            or Component("oneapi", False, source=f"no {root}/compiler/<version> or intel-sycl-rt package"))


def _tvm(env: Env) -> Component:
    version = env.package("apache-tvm")
    lib = (env.package_dir("tvm") or Path("/nonexistent")) / "lib"
    plugins = sorted(p.name[len("libtvm_runtime_"):-3] for p in lib.glob("libtvm_runtime_*.so"))
    detail = f"runtime plugins: {', '.join(plugins) or 'none (no CUDA runtime)'}" if version else ""
    return Component("tvm", bool(version), version, "python package apache-tvm" if version else "no apache-tvm", detail)


def _listed(env: Env, query: str, label: str) -> str:
    items = env.python(query)
    return f"{label}: {', '.join(items)}" if items else ""


def _absent(name: str, where: str) -> Component:
    return Component(name, False, source=where)


# The probe of each backend component a ``BackendSpec.doctor`` may name.
BACKEND_PROBES: dict[str, Callable[[Env], Component]] = {
    "tensorrt": lambda env: _package(env, "tensorrt", ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"))
    or _newest(env, "tensorrt", ["/usr/lib/*-linux-gnu/libnvinfer.so.*"]) or _absent("tensorrt", "no tensorrt"),
    "migraphx": lambda env: _newest(env, "migraphx", ["/opt/rocm*/lib/libmigraphx.so.*"])
    or _absent("migraphx", "no libmigraphx"),
    "openvino": lambda env: _package(env, "openvino", ("openvino",), _listed(env, "openvino.devices", "devices"))
    or _absent("openvino", "no openvino package"),
    "onnxruntime": lambda env: _package(env, "onnxruntime", ORT_DISTS,
                                        _listed(env, "onnxruntime.providers", "providers"))
    or _absent("onnxruntime", "no onnxruntime package"),
    "tvm": lambda env: _tvm(env),
}


def runtimes(env: Env) -> list[Component]:
    """GPU runtimes, then the inference runtimes every backend's spec names (no torch or TVM import)."""
    backend = dict.fromkeys(name for spec in backend_specs() for name in spec.doctor)
    return [cuda_runtime(env), rocm_runtime(env), level_zero_runtime(env), oneapi_runtime(env),
            *(BACKEND_PROBES[name](env) for name in backend)]


# ------------------------------------------------------------------ toolchains


def _nvcc(env: Env) -> Component:
    m = re.search(r"release [\d.]+, V([\d.]+)", env.run(["nvcc", "--version"]) or "")
    return Component("nvcc", bool(m), m.group(1) if m else None, env.which("nvcc") or "not on PATH")


def _ld_lld(env: Env) -> Component:
    found = []
    for name in ["ld.lld", *(f"ld.lld-{n}" for n in range(40, 9, -1))]:
        m = env.which(name) and re.search(r"LLD (\d+(?:\.\d+)*)", env.run([name, "--version"]) or "")
        if m:
            found.append((parse_version(m.group(1)) or (), Component("ld.lld", True, m.group(1), name)))
    return max(found, key=lambda f: f[0])[1] if found else Component("ld.lld", False, source="no ld.lld on PATH")


def _rocm_bitcode(env: Env) -> Component:
    rocm = env.environ.get("ROCM_PATH", "/opt/rocm")
    for pattern in [f"{rocm}/amdgcn/bitcode", f"{rocm}/lib/llvm/lib/clang/*/lib/amdgcn/bitcode",
                    "/opt/rocm/amdgcn/bitcode", "/usr/lib/*-linux-gnu/amdgcn/bitcode"]:
        for d in env.glob(pattern):
            if (d / "ocml.bc").is_file():
                return Component("rocm-bitcode", True, None, _shown(env, d))
    return Component("rocm-bitcode", False, source="no amdgcn/bitcode/ocml.bc under $ROCM_PATH, /opt/rocm or /usr/lib")


# The Python packages mlopt compiles with (besides the GPU toolchains).
COMPILER_PACKAGES = ("onnx", "onnxruntime", "apache-tvm", "apache-tvm-ffi", "torch")


def toolchains(env: Env) -> list[Component]:
    """What builds use here: the compiler packages, nvcc (CUDA), ld.lld and ROCm device bitcode (ROCm)."""
    packages = [_package(env, p, (p,)) or _absent(p, "not installed") for p in COMPILER_PACKAGES]
    return [*packages, _nvcc(env), _ld_lld(env), _rocm_bitcode(env)]


# What a GPU build needs here, per TVM target kind: (toolchain, minimum version, how to get it).
CROSS_NEEDS: dict[str, list[tuple[str, str | None, str]]] = {
    "cuda": [("nvcc", None, "pip install nvidia-cuda-nvcc (or install the CUDA toolkit)")],
    "rocm": [("ld.lld", "17", "install ld.lld 17 or newer (Debian/Ubuntu: apt install lld-22)"),
             ("rocm-bitcode", None, ("apt install rocm-device-libs (or ROCm) and point ROCM_PATH at the folder "
                                     "holding amdgcn/bitcode"))],
}


def cross_compile_needs(catalog: Catalog, tools: list[Component]) -> list[dict[str, Any]]:
    """For each GPU target kind in the catalog: which toolchains its builds need and whether they are here."""
    by_name = {t.name: t for t in tools}
    rows = []
    for kind, needs in CROSS_NEEDS.items():
        skus = [s.name for s in catalog.skus if s.needs_gpu and (s.tvm_target or {}).get("kind") == kind]
        for tool, minimum, fix in needs if skus else []:
            t = by_name[tool]
            ok = t.present and (minimum is None or bool(version_at_least(t.version, minimum)))
            rows.append({"target": kind, "skus": skus, "needs": tool + (f" >= {minimum}" if minimum else ""),
                         "present": ok, "found": " ".join(filter(None, [t.version, f"({t.source})"])),
                         "fix": "" if ok else fix})
    return rows
