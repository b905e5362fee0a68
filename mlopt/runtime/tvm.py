"""TVM loader: the build's ``export_library`` shared libraries run by the Relax VM on the device
its ``tvm_entry.json`` names (``cpu``, ``cuda`` or ``rocm``), with the TVM runtime alone
(``TVM_USE_RUNTIME_LIB=1`` works: the compiler library stays out of images).

    python run_tvm.py inputs.npz outputs.npz   # the script shipped beside the library calls ``main``
    python run_tvm.py --load-only              # load the library and its device code, run nothing
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from . import Runner, Unavailable, isa

ENTRY_FILE = "tvm_entry.json"


def _init_threads() -> None:
    # TVM sizes its thread pool once, from TVM_NUM_THREADS, when the runtime starts: without it, it
    # uses half the cores on x86 and config_threadpool can only lower that. Set before tvm loads.
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def read_entry(folder: Path, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The build's ``tvm_entry.json``: libraries, function, inputs, outputs, target and device."""
    return json.loads((folder / ((meta or {}).get("entry") or ENTRY_FILE)).read_text())


def load_cuda_plugin() -> None:
    """Load ``libtvm_runtime_cuda`` if ``import tvm`` did not (the runtime-only mode skips device
    plugins, and ``import tvm`` skips it where libcuda was not loadable at the time)."""
    import tvm
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unavailable(f"TVM {tvm.__version__}'s CUDA runtime plugin does not load (is the NVIDIA driver "
                          f"installed?): {first}") from None


def device(entry: Mapping[str, Any]) -> Any:
    """The TVM device the build runs on, from its entry; refused (exit 4) where it is not here."""
    import tvm

    kind = entry.get("device", "cpu")
    if kind == "cuda":
        load_cuda_plugin()
    what = f"this build needs a {kind} device ({entry.get('target')})"
    try:
        dev = tvm.device(kind, 0)
        present = bool(dev.exist)
    except Exception as e:  # a runtime built without the device's support has no device API for it
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise Unavailable(f"{what}; this TVM runtime cannot open one: {first}") from None
    if not present:
        raise Unavailable(f"{what}; none is visible")
    return dev


def libraries(entry: Mapping[str, Any]) -> dict[int | None, str]:
    """Library per batch size (None: the default library; static builds have one per batch size)."""
    return {None: entry["library"], **{int(b): f for b, f in {**entry.get("static", {}),
                                                               **entry.get("tuned", {})}.items()}}


def vm(folder: Path, library: str, dev: Any) -> Any:
    """The Relax VM running one of the build's libraries on ``dev``."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(tvm.runtime.load_module(str(folder / library)), dev)


def load(folder: Path, meta: Mapping[str, Any], threads: int | None = None) -> Runner:
    """The Relax VM over each of the build's libraries, on the build's device."""
    _init_threads()
    import numpy as np
    import tvm

    entry = read_entry(folder, meta)
    if threads:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
    dev = device(entry)
    vms = {b: vm(folder, lib, dev) for b, lib in libraries(entry).items()}
    names, fn = entry["inputs"], entry["function"]

    def once(machine: Any, feed: dict[str, Any]) -> dict[str, Any]:
        # C order, as TVM tensors need; np.require keeps 0-d inputs 0-d (ascontiguousarray would not)
        res = machine[fn](*[tvm.runtime.tensor(np.require(feed[n], requirements="C"), dev) for n in names])
        single = hasattr(res, "numpy") or not hasattr(res, "__len__") or type(res).__name__ in ("Shape", "ShapeTuple")
        outs = [res] if single else list(res)
        return {n: _array(o) for n, o in zip(entry["outputs"], outs)}

    def _array(value: Any) -> Any:
        """A tensor's values; a shape the VM returns (a ShapeTuple, or one int for a rank-0 shape) as int64."""
        if hasattr(value, "numpy"):
            return value.numpy()
        return np.asarray(list(value) if hasattr(value, "__len__") else value, dtype=np.int64)

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        first = feed[names[0]] if names else None  # a model of constants takes no input
        batch = len(first) if np.ndim(first) else None
        if batch in vms or len(vms) == 1 or batch is None:
            return once(vms.get(batch, vms[None]), feed)
        if not entry.get("static"):
            return once(vms[None], feed)
        return chunked(batch, feed)

    def chunked(batch: int, feed: dict[str, Any]) -> dict[str, Any]:
        """A batch no static library was built for: in slices of the largest built size that divides it."""
        step = max((b for b in vms if b is not None and batch % b == 0), default=None)
        if step is None:
            raise ValueError(f"this build has static libraries for batch sizes {sorted(b for b in vms if b)}; "
                             f"a batch of {batch} is none of them nor a multiple of one")
        parts = [once(vms[step], {n: (v[k:k + step] if np.ndim(v) and len(v) == batch else v) for n, v in feed.items()})
                 for k in range(0, batch, step)]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    return run


def load_only(folder: Path) -> str:
    """Load every library of the build (and its device code) without running it."""
    _init_threads()
    import tvm

    entry = read_entry(folder)
    if entry.get("device") == "cuda":
        load_cuda_plugin()
    for lib in set(libraries(entry).values()):
        tvm.runtime.load_module(str(folder / lib))
    return f"loaded {entry['library']} for {entry['target']}"


def main(folder: Path, argv: list[str]) -> int:
    """``run_tvm.py``: run the build in ``folder`` on an .npz of inputs, or only load it."""
    entry = read_entry(folder)
    target = entry.get("target") or {}
    refused = isa.refusal(entry.get("requires"), f"build {folder.name} ({target.get('mcpu') or target.get('kind')})")
    if refused:  # never load code this CPU cannot run: it would die of SIGILL
        print(f"run_tvm.py: {refused}", file=sys.stderr)
        return isa.EXIT_CODE
    try:
        if argv == ["--load-only"]:
            print(load_only(folder))
            return 0
        if len(argv) != 2:
            print("usage: run_tvm.py inputs.npz outputs.npz | --load-only", file=sys.stderr)
            return 2
        import numpy as np

        run = load(folder, {})
        with np.load(argv[0]) as data:
            feed = {k: data[k] for k in data.files}
        np.savez(argv[1], **run(feed))
    except Unavailable as e:
        print(f"run_tvm.py: {e}", file=sys.stderr)
        return e.exit_code
    return 0
