"""Which CPU instructions this machine runs, and a check that a build's code needs no more.

Standalone: it imports only the standard library, because it ships beside every loader that runs
without mlopt (``run_tvm.py`` in a TVM artifact, the image entry point, the Triton Python model,
``gpu_check.py``), inside the shipped package ``mlopt_runtime``.

``MLOPT_CPU_FLAGS`` narrows what mlopt believes this CPU has (it can only take flags away, never add
one the CPU lacks, so it can never make mlopt run code the CPU cannot):
  - an x86-64 level, ``x86-64-v3`` or ``x86-64-v2``: drop every flag of the levels above it
    (``x86-64-v3`` on an AVX-512 machine behaves like an AVX2 machine);
  - a list of flags, comma or space separated: keep only those.
Every decision mlopt makes about running code here (which SKUs the host runs, what is validated and
measured, what a loader refuses) reads ``cpu_flags()``, so the override governs them all.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

ENV = "MLOPT_CPU_FLAGS"
EXIT_CODE = 4  # mlopt's exit code for "toolchain or device unavailable"

# x86-64 micro-architecture levels (psABI), by the /proc/cpuinfo flags each adds to the one before.
X86_LEVELS = {
    "x86-64-v2": ["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"],
    "x86-64-v3": ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"],
    "x86-64-v4": ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
}
# Per level, the flags of every extension past it (its own list says what it needs): a machine
# narrowed to the level has none of them.
_PAST_V3 = r"avx512|amx|avx_vnni|avx_ifma|avx_ne|avx_vnni_int"
_PAST_V2 = r"avx|fma|f16c|bmi|abm|movbe|xsave|vaes|vpclmulqdq|gfni|" + _PAST_V3
_ABOVE = {"x86-64-v2": re.compile(f"^({_PAST_V2})"), "x86-64-v3": re.compile(f"^({_PAST_V3})"),
          "x86-64-v4": re.compile(r"^amx")}
NOTABLE = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
           "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16"]


class UnsupportedCPU(RuntimeError):
    """A build needs instructions (or a machine type) this CPU does not have."""

    exit_code = EXIT_CODE


def real_cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags ``/proc/cpuinfo`` lists (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def narrow(flags: frozenset[str], override: str | None) -> frozenset[str]:
    """``flags`` as ``MLOPT_CPU_FLAGS=override`` narrows them (see the module docstring)."""
    text = (override or "").strip()
    if not text:
        return flags
    if text in X86_LEVELS:
        levels = list(X86_LEVELS)
        dropped = {f for name in levels[levels.index(text) + 1:] for f in X86_LEVELS[name]}
        return frozenset(f for f in flags if f not in dropped and not _ABOVE[text].match(f))
    wanted = {f for f in re.split(r"[,\s]+", text) if f}
    return flags & frozenset(wanted)


def cpu_flags() -> frozenset[str]:
    """The flags mlopt may rely on here: the CPU's, narrowed by ``MLOPT_CPU_FLAGS``."""
    return narrow(real_cpu_flags(), os.environ.get(ENV))


def machine() -> str:
    """This machine's architecture as ``uname -m`` says it (x86_64, aarch64)."""
    return platform.machine()


def notable(flags: frozenset[str]) -> list[str]:
    """The flags worth naming in a message, in a fixed order."""
    return [f for f in NOTABLE if f in flags]


def missing(requires: dict | None, flags: frozenset[str] | None = None) -> list[str]:
    """What of ``requires`` (``{"machine": "x86_64", "cpu_flags": [...]}``) this CPU lacks."""
    if not requires:
        return []
    flags = cpu_flags() if flags is None else flags
    want = requires.get("machine")
    if want and want != machine():
        return [f"machine:{want}"]
    return [f for f in requires.get("cpu_flags") or [] if f not in flags]


def refusal(requires: dict | None, what: str) -> str | None:
    """The one-line reason ``what`` cannot run on this CPU, or None when it can."""
    lack = missing(requires)
    if not lack:
        return None
    if lack[0].startswith("machine:"):
        return f"{what} is {lack[0].split(':', 1)[1]} code; this machine is {machine()}"
    flags = cpu_flags()
    has = notable(flags) or sorted(flags & {"sse4_2", "avx"}) or ["none of avx2, fma, avx512f"]
    override = f" ({ENV}={os.environ[ENV]})" if os.environ.get(ENV) else ""
    return f"{what} needs {', '.join(lack)}; this CPU has {', '.join(has)}{override}"


def require(requires: dict | None, what: str) -> None:
    """Raise ``UnsupportedCPU`` unless this CPU runs code that needs ``requires``."""
    reason = refusal(requires, what)
    if reason:
        raise UnsupportedCPU(reason)
