"""What GPU code a built library really holds, read from its bytes (no GPU, no driver needed).

TVM falls back silently: without the CUDA runtime plugin it embeds CUDA *source* (compiled at load
time on the GPU machine), and without GPU schedules it compiles kernels as host code. A build for
``sm_90`` or ``gfx942`` is only accepted when the library embeds device code for exactly that
architecture: a fatbin whose entries are ELF cubins for the SM (NVIDIA), or an AMDGPU ELF code
object whose ``e_flags`` name the gfx target (AMD).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from mlopt.core.errors import BackendUnavailable

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
ELF_MAGIC = b"\x7fELF"
EM_CUDA, EM_AMDGPU = 190, 224
FATBIN_KINDS = {1: "ptx", 2: "cubin"}
# EF_AMDGPU_MACH values (LLVM's ELF.h): the low byte of an AMDGPU code object's e_flags.
AMDGPU_MACH = {
    0x2C: "gfx900", 0x2F: "gfx906", 0x30: "gfx908", 0x3F: "gfx90a", 0x40: "gfx940", 0x4B: "gfx941",
    0x4C: "gfx942", 0x4F: "gfx950", 0x36: "gfx1030", 0x41: "gfx1100", 0x46: "gfx1101", 0x47: "gfx1102",
    0x48: "gfx1200", 0x4E: "gfx1201",
}


@dataclass(frozen=True)
class DeviceCode:
    """One piece of device code embedded in a host library."""

    kind: str  # cubin, ptx, amdgpu-elf, cuda-source
    arch: str  # sm_90, gfx942, or "" when unknown
    bytes: int


def inspect_library(path: Path) -> list[DeviceCode]:
    """Every fatbin entry, AMDGPU code object and embedded CUDA source found in ``path``."""
    data = path.read_bytes()
    found = _fatbin_entries(data) + _amdgpu_objects(data)
    if not found and b"__global__" in data:
        found.append(DeviceCode("cuda-source", "", data.count(b"__global__")))
    return found


def require_device_code(path: Path, arch: str) -> list[DeviceCode]:
    """Raise unless ``path`` embeds machine code (cubin SASS or an AMDGPU ELF) for ``arch``."""
    codes = inspect_library(path)
    kind = "cubin" if arch.startswith("sm_") else "amdgpu-elf"
    if not any(c.kind == kind and c.arch == arch for c in codes):
        seen = ", ".join(f"{c.kind}:{c.arch or '?'}" for c in codes) or "no device code at all (host code only)"
        raise BackendUnavailable(
            f"{path.name} holds no {kind} for {arch} (found: {seen}); refusing to ship it as an {arch} build",
            hint="a CUDA build needs nvcc and the CUDA runtime plugin (see `mlopt doctor`); "
                 "a ROCm build needs ld.lld and the ROCm device bitcode",
        )
    return codes


def _fatbin_entries(data: bytes) -> list[DeviceCode]:
    found, at = [], data.find(FATBIN_MAGIC)
    while at >= 0 and at + 16 <= len(data):
        _, _, header, size = struct.unpack_from("<IHHQ", data, at)
        pos, end = at + header, at + header + size
        while pos + 64 <= min(end, len(data)):  # an entry header is 64 bytes; a truncated one is not read
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
            if entry_header == 0:
                break
            found.append(_fatbin_entry(data, pos, kind, entry_header, payload))
            pos += entry_header + payload
        at = data.find(FATBIN_MAGIC, max(end, at + 4))
    return found


def _fatbin_entry(data: bytes, pos: int, kind: int, header: int, payload: int) -> DeviceCode:
    arch = struct.unpack_from("<I", data, pos + 28)[0]
    body = data[pos + header: pos + header + 64]
    if FATBIN_KINDS.get(kind) == "cubin" and body.startswith(ELF_MAGIC):
        elf_arch = _cubin_arch(body)
        if elf_arch != arch:  # the fatbin header and the cubin disagree: trust neither
            return DeviceCode("cubin-mismatch", f"sm_{arch}/sm_{elf_arch}", payload)
    return DeviceCode(FATBIN_KINDS.get(kind, f"kind{kind}"), f"sm_{arch}", payload)


def _cubin_arch(elf: bytes) -> int:
    machine = struct.unpack_from("<H", elf, 18)[0]
    if machine != EM_CUDA:
        return -1
    flags, abi_version = struct.unpack_from("<I", elf, 48)[0], elf[8]
    # ELF ABI version 8 (CUDA 12.8+) moved the SM number to bits 8-15 of e_flags; older: bits 0-7.
    return (flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF


def _amdgpu_objects(data: bytes) -> list[DeviceCode]:
    found, at = [], data.find(ELF_MAGIC, 1)
    while at >= 0:
        if at + 64 <= len(data) and data[at + 4] == 2 and struct.unpack_from("<H", data, at + 18)[0] == EM_AMDGPU:
            mach = struct.unpack_from("<I", data, at + 48)[0] & 0xFF
            shoff, = struct.unpack_from("<Q", data, at + 40)
            shentsize, shnum = struct.unpack_from("<HH", data, at + 58)
            found.append(DeviceCode("amdgpu-elf", AMDGPU_MACH.get(mach, f"mach-0x{mach:x}"), shoff + shentsize * shnum))
        at = data.find(ELF_MAGIC, at + 4)
    return found
