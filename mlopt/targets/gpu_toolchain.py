"""Finding and preparing the GPU compilers TVM needs to cross-compile on a machine without a GPU.

CUDA: nvcc (from ``PATH``, ``CUDA_HOME``, ``/usr/local/cuda*`` or the ``nvidia-cuda-nvcc`` wheel in
this environment) and TVM's CUDA runtime plugin, which links ``libcudart.so.13`` and
``libcuda.so.1``. Without a driver there is no ``libcuda.so.1``, the plugin does not load, and TVM
silently embeds CUDA source instead of a cubin; so where the driver is absent mlopt compiles a
stand-in ``libcuda.so.1`` (every call reports "no device": the usual trick for building CUDA code
without a driver) and loads the plugin itself. ROCm: ``ld.lld`` 17 or newer and the ROCm device
bitcode (Debian's ``rocm-device-libs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from mlopt.core.errors import BackendUnavailable

STUB_SOURCE = """/* libcuda.so.1 stand-in written by mlopt for machines without the NVIDIA driver:
   every call reports CUDA_ERROR_NO_DEVICE (100). Used only to compile, never to run. */
#define STUB(name) int name(void) { return 100; }
STUB(cuInit) STUB(cuDriverGetVersion) STUB(cuDeviceGet) STUB(cuDeviceGetCount) STUB(cuDeviceGetName)
STUB(cuDeviceGetAttribute) STUB(cuFuncSetAttribute) STUB(cuGetErrorName) STUB(cuGetErrorString)
STUB(cuLaunchKernel) STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction) STUB(cuModuleGetGlobal)
STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled) STUB(cuGetProcAddress)
STUB(cuGetProcAddress_v2) STUB(cuGetExportTable) STUB(cuCtxGetCurrent) STUB(cuCtxSetCurrent)
"""
MIN_LLD = 17
BITCODE_DIRS = ["/opt/rocm/amdgcn/bitcode", "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode", "/usr/lib/amdgcn/bitcode"]


# ------------------------------------------------------------------ CUDA
@lru_cache(maxsize=1)
def cuda_home() -> Path | None:
    """The CUDA toolkit root holding ``bin/nvcc``, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(_real_nvcc(Path(nvcc)).parent.parent))
    candidates.append(str(Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                          / "site-packages" / "nvidia" / "cu13"))
    candidates += sorted((str(p) for p in Path("/usr/local").glob("cuda*")), reverse=True)
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file():
            return Path(c)
    return None


def _real_nvcc(nvcc: Path) -> Path:
    """Follow wrapper scripts (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) to the real binary."""
    try:
        text = nvcc.read_text(errors="ignore")[:500]
    except OSError:
        return nvcc
    m = re.search(r"exec\s+(\S+/nvcc)\b", text)
    return Path(m.group(1)) if m and Path(m.group(1)).is_file() else nvcc.resolve()


@lru_cache(maxsize=1)
def nvcc_version() -> str | None:
    home = cuda_home()
    if home is None:
        return None
    out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_missing() -> str | None:
    """Why TVM cannot compile CUDA here, or None."""
    if cuda_home() is None:
        return "no nvcc found: pip install 'mlopt[cuda]' (the nvidia-cuda-nvcc wheel) or install the CUDA toolkit"
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler (cc/gcc) to link the host side of the library"
    return None


@lru_cache(maxsize=1)
def prepare_cuda() -> dict[str, str]:
    """Make TVM's CUDA codegen produce real cubins in this process; returns what was used."""
    problem = cuda_missing()
    if problem:
        raise BackendUnavailable(f"TVM CUDA builds need nvcc: {problem}")
    home = cuda_home()
    assert home is not None
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    os.environ.setdefault("CUDA_HOME", str(home))
    os.environ["PATH"] = f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"nvcc": str(home / "bin" / "nvcc"), "nvcc_version": nvcc_version() or "?", **load_cuda_runtime()}


@lru_cache(maxsize=1)
def load_cuda_runtime() -> dict[str, str]:
    """libcuda (the driver's, else the stand-in), libcudart and TVM's CUDA runtime plugin, in this process."""
    home = cuda_home()
    used = {"libcuda": _load_libcuda(), "libcudart": _load_libcudart(home)}
    _load_tvm_cuda_plugin()
    return used


def _load_libcuda() -> str:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return "driver"
    except OSError:
        stub = _stub_path()
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        return f"stub {stub}"


def _load_libcudart(home: Path | None) -> str:
    local = [str(p) for d in ("lib", "lib64") for p in (home / d).glob("libcudart.so.13*")] if home else []
    for lib in ["libcudart.so.13", *local]:
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            return lib
        except OSError:
            continue
    raise BackendUnavailable("TVM's CUDA plugin needs libcudart.so.13", hint="pip install 'mlopt[cuda]'")


def _stub_path() -> Path:
    """Compile the libcuda.so.1 stand-in once per user (atomically: builds may run in parallel)."""
    import hashlib

    version = hashlib.sha256(STUB_SOURCE.encode()).hexdigest()[:12]  # a changed stub is built anew
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlopt" / "cuda-stub" / version
    stub = cache / "libcuda.so.1"
    if stub.is_file():
        return stub
    cache.mkdir(parents=True, exist_ok=True)
    src, tmp = cache / f"stub.{os.getpid()}.c", cache / f".libcuda.{os.getpid()}.so"
    src.write_text(STUB_SOURCE)
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    res = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
                         capture_output=True, text=True)
    src.unlink()
    if res.returncode != 0:
        raise BackendUnavailable(f"could not compile the libcuda.so.1 stand-in with {cc}: {res.stderr.strip()[:300]}")
    os.replace(tmp, stub)
    return stub


def _load_tvm_cuda_plugin() -> None:
    """Load ``libtvm_runtime_cuda`` if ``import tvm`` could not (it had no libcuda then): the
    runtime loader's own plugin loading."""
    from mlopt.runtime import Unavailable
    from mlopt.runtime.tvm import load_cuda_plugin

    try:
        load_cuda_plugin()
    except Unavailable as e:
        raise BackendUnavailable(str(e)) from None


# ------------------------------------------------------------------ ROCm
@lru_cache(maxsize=1)
def find_lld() -> tuple[str, int] | None:
    """The newest ``ld.lld`` on PATH, with its major version, if it is at least ``MIN_LLD``."""
    best: tuple[str, int] | None = None
    names = ["ld.lld"] + [f"ld.lld-{v}" for v in range(MIN_LLD, 40)] + ["/opt/rocm/llvm/bin/ld.lld"]
    for name in names:
        path = shutil.which(name)
        if not path:
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"LLD (\d+)", out)
        if m and int(m.group(1)) >= MIN_LLD and (best is None or int(m.group(1)) > best[1]):
            best = (path, int(m.group(1)))
    return best


def rocm_bitcode_dir() -> Path | None:
    """The folder holding the ROCm device bitcode (ocml.bc, ockl.bc ...)."""
    env = os.environ.get("ROCM_PATH")
    dirs = ([f"{env}/amdgcn/bitcode"] if env else []) + BITCODE_DIRS
    return next((Path(d) for d in dirs if (Path(d) / "ocml.bc").is_file()), None)


def rocm_missing() -> str | None:
    """Why TVM cannot compile ROCm code objects here, or None."""
    missing = []
    if find_lld() is None:
        missing.append(f"ld.lld {MIN_LLD} or newer (apt-get install lld-22)")
    if rocm_bitcode_dir() is None:
        missing.append("the ROCm device bitcode (apt-get install rocm-device-libs, or set ROCM_PATH)")
    return "; ".join(missing) or None


@lru_cache(maxsize=1)
def prepare_rocm() -> dict[str, str]:
    """Point TVM's ROCm codegen at the bitcode and the linker found here; returns what was used."""
    problem = rocm_missing()
    if problem:
        raise BackendUnavailable(f"TVM ROCm builds need {problem}")
    bitcode, (lld, _) = rocm_bitcode_dir(), find_lld()  # type: ignore[misc]
    import tvm_ffi
    from tvm.support.rocm import callback_rocm_bitcode_path

    def link(obj_bin: bytes) -> bytearray:
        return bytearray(_rocm_link(lld, obj_bin))

    def bitcode_files(rocdl_dir: Any = None) -> Any:  # the folder found here, without touching ROCM_PATH
        return callback_rocm_bitcode_path(f"{bitcode}/")

    tvm_ffi.register_global_func("tvm_callback_rocm_link", link, override=True)
    tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", bitcode_files, override=True)
    return {"ld.lld": lld, "bitcode": str(bitcode)}


def _rocm_link(lld: str, obj_bin: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        obj, out = Path(tmp) / "rocm_kernel.o", Path(tmp) / "rocm_kernel.co"
        obj.write_bytes(bytes(obj_bin))
        # --no-undefined: a code object with undefined symbols fails only at load time on the GPU
        res = subprocess.run([lld, "--no-undefined", "-shared", str(obj), "-o", str(out)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ld.lld failed: {res.stderr.strip()[:500]}")
        return out.read_bytes()


@contextlib.contextmanager
def drop_native_warnings(*patterns: str) -> Iterator[None]:
    """Hide C++ log lines matching ``patterns`` (TVM's ROCm codegen warns once per kernel that it
    cannot ask a device for its thread limit, which is expected here: it then uses the target's 256).
    Everything else written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            kept = [line for line in text.splitlines() if not any(p in line for p in patterns)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
