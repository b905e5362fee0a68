"""Build a TensorRT or MIGraphX engine on the GPU it serves from, cache it, and run it: the
runtime loader of both JIT backends (the engines themselves are in ``tensorrt.py`` and
``migraphx.py``, the GPU detection in ``gpus.py``).

mlopt ships this package inside such an artifact (as ``mlopt_runtime/``) beside ``model.onnx``,
``engine_plan.json`` and the script ``engine_entry.py`` that calls ``main``. It imports nothing else
from mlopt: only the standard library, numpy, the engine library (``tensorrt`` with ``cuda-python``
for device memory, or ROCm's ``migraphx``) and, where present, ``pynvml`` (nvidia-ml-py) to
identify the GPU.

    python engine_entry.py build [--cache DIR]               build the engine, or find it cached
    python engine_entry.py run IN.npz OUT.npz [--cache DIR]  run it on the arrays in IN.npz
    python engine_entry.py key                               print the cache key on this machine

The cache (``--cache``, else $MLOPT_ENGINE_CACHE, else /var/cache/mlopt) is meant to be a volume
shared by the replicas on a node. It holds one folder per key: the sha256 of the model digest, the
plan, the GPU's name and architecture, the driver version and the library version, so a driver or
library upgrade builds afresh instead of loading an engine built for something else. A folder
appears whole (built in a temporary folder, then renamed) under a file lock, so replicas starting
together build once; a cached engine whose digests do not match, or that the library cannot load,
is rebuilt. An engine shipped in the artifact's ``engine/`` folder (built where mlopt ran on the
device) is used when its key matches this machine's.

Exit codes: 0 ok, 1 failure, 2 usage, 4 the engine library or a matching GPU is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import Runner
from .engine_plan import (  # noqa: F401  (the plan helpers are part of this module's interface)
    PLAN_FILE,
    EngineError,
    EngineUnavailable,
    EngineUnreadable,
    concrete_shapes,
    log,
    shape_profile,
)
from .files import flock, sha256_file
from .gpus import Device, amd_device, gfx_arch, nvidia_device  # noqa: F401  (re-exported)

SHIPPED_DIR = "engine"
RECORD_FILE = "engine.json"
CACHE_ENV = "MLOPT_ENGINE_CACHE"
DEFAULT_CACHE = "/var/cache/mlopt"
ENGINES = {"tensorrt": "tensorrt:TensorRTEngine", "migraphx": "migraphx:MIGraphXEngine"}  # module:class, lazily


def engine_class(kind: str) -> Any:
    """The engine class for ``kind`` (its module imported now)."""
    module, _, cls = ENGINES[kind].partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


# ------------------------------------------------------------------ cache
@dataclass(frozen=True)
class Context:
    """Everything one engine depends on, and the cache key naming it."""

    root: Path
    plan: dict[str, Any]
    engine: Any
    device: Device
    key: str


def load_plan(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / PLAN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {root / PLAN_FILE}: {e}") from None


def cache_key(plan: dict[str, Any], device: Device, library_version: str) -> str:
    """sha256 of the model digest, the plan, the GPU, its driver and the library version."""
    blob = {"model": plan["model"]["digest"], "plan": plan, "gpu": device.name, "arch": device.arch,
            "driver": device.driver, "library": f"{plan['engine']} {library_version}"}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def prepare(root: Path) -> Context:
    """Read the plan, import the library, find the GPU and compute the key (no building)."""
    plan = load_plan(root)
    if plan.get("engine") not in ENGINES:
        raise EngineError(f"{PLAN_FILE} names engine {plan.get('engine')!r}; this entry knows {sorted(ENGINES)}")
    engine = engine_class(plan["engine"])()
    _check_library(plan, engine.version)
    device = engine.device()
    if device is None:
        raise EngineUnavailable(f"no GPU found; building this {plan['engine']} engine needs {engine.gpu}")
    if device.arch != plan["target"]["arch"]:
        log(f"warning: this plan is for {plan['target']['arch']} GPUs; this GPU is {device.name} "
             f"({device.arch}). Building for this GPU; mlopt's figures are for the plan's architecture.")
    return Context(root, plan, engine, device, cache_key(plan, device, engine.version))


def _check_library(plan: dict[str, Any], version: str) -> None:
    majors = plan["library"].get("majors") or []
    major = version.split(".")[0]
    if majors and (not major.isdigit() or int(major) not in majors):
        raise EngineUnavailable(f"{plan['engine']} {version} is installed; this plan needs "
                                f"{plan['library']['requires']} ({plan['library'].get('why', '')})")



def _record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def intact(folder: Path, key: str) -> bool:
    """Whether ``folder`` holds a whole engine for ``key`` whose files match their digests."""
    record = _record(folder)
    if record is None or record.get("key") != key:
        return False
    try:
        return all(sha256_file(folder / name) == digest for name, digest in record["files"].items())
    except OSError:
        return False



def _check_model(ctx: Context) -> None:
    for name, digest in ctx.plan["model"]["files"].items():
        path = ctx.root / name
        if not path.is_file() or sha256_file(path) != digest:
            raise EngineError(f"{name} is missing or differs from the model the plan was made for")


def build_into(ctx: Context, folder: Path, timing_dir: Path) -> Path:
    """Build the engine into a temporary folder beside ``folder``, then rename it into place."""
    _check_model(ctx)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{ctx.key[:12]}-", dir=folder.parent))
    try:
        log(f"building the {ctx.plan['engine']} engine for {ctx.device.name} ({ctx.device.arch}) ...")
        t0 = time.perf_counter()
        timing = timing_dir / f"{ctx.plan['engine']}-{ctx.engine.version}-{ctx.device.arch}.timing"
        names = ctx.engine.build(ctx.plan, ctx.root / ctx.plan["model"]["file"], tmp, timing)
        seconds = round(time.perf_counter() - t0, 3)
        record = {"key": ctx.key, "build_id": uuid.uuid4().hex, "files": {n: sha256_file(tmp / n) for n in names},
                  "device": asdict(ctx.device), "library": ctx.engine.version, "build_seconds": seconds}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built in {seconds} s: {folder}")
    return folder


def ensure_engine(ctx: Context, cache: Path, use_shipped: bool = True) -> tuple[Path, bool]:
    """The folder of an intact engine for this machine, building it once; and whether it was built now."""
    shipped = ctx.root / SHIPPED_DIR
    if use_shipped and intact(shipped, ctx.key):
        return shipped, False
    folder = cache / ctx.key
    if intact(folder, ctx.key):
        return folder, False
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineError(f"cannot create the engine cache {cache}: {e}; mount a writable volume there "
                          f"or set {CACHE_ENV}") from None
    with flock(cache / f"{ctx.key}.lock"):
        if intact(folder, ctx.key):  # another replica built it while this one waited
            return folder, False
        return build_into(ctx, folder, cache / "timing"), True


def _discard(folder: Path, build_id: str | None, cache: Path, key: str) -> None:
    """Remove an unreadable cached engine, unless another replica has replaced it meanwhile."""
    with flock(cache / f"{key}.lock"):
        record = _record(folder)
        if record is not None and record.get("build_id") == build_id:
            shutil.rmtree(folder)


def open_engine(ctx: Context, cache: Path) -> tuple[Runner, Path, bool]:
    """A runner for this machine's engine, rebuilding a cached one the library cannot load."""
    folder, built = ensure_engine(ctx, cache)
    try:
        return ctx.engine.runner(ctx.plan, folder), folder, built
    except EngineUnreadable as e:
        if built:
            raise
        log(f"{e}; rebuilding")
        if folder.parent == cache:
            _discard(folder, (_record(folder) or {}).get("build_id"), cache, ctx.key)
        folder, built = ensure_engine(ctx, cache, use_shipped=False)
        return ctx.engine.runner(ctx.plan, folder), folder, built


def open_runner(root: Path, cache: Path | None = None) -> Runner:
    """The callable a server uses: feed dict in, output dict out."""
    return open_engine(prepare(root), cache or default_cache())[0]


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)



def load(folder: Path, meta: Mapping[str, Any], threads: int | None = None) -> Runner:
    """The runtime loader: the engine for this machine's GPU, built once into the cache
    (``meta["engine_cache"]``, else $MLOPT_ENGINE_CACHE, else /var/cache/mlopt)."""
    cache = meta.get("engine_cache")
    return open_runner(folder, Path(cache) if cache else None)


# ------------------------------------------------------------------ CLI
def _parser(artifact: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine_entry.py", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, default=artifact,
                   help="folder holding engine_plan.json and the model (default: the script's folder)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("build", "build the engine, or find it in the cache"), ("run", "run the engine"),
                       ("key", "print the cache key for this machine")):
        cmd = sub.add_parser(name, help=text)
        if name == "run":
            cmd.add_argument("inputs", type=Path, help=".npz of the model's inputs")
            cmd.add_argument("outputs", type=Path, help=".npz to write the outputs to")
        if name != "key":
            cmd.add_argument("--cache", type=Path, default=None,
                             help=f"engine cache folder (default: ${CACHE_ENV} or {DEFAULT_CACHE})")
    return p


def _command(args: argparse.Namespace) -> None:
    ctx = prepare(args.artifact)
    if args.command == "key":
        print(ctx.key)
        return
    runner, folder, built = open_engine(ctx, args.cache or default_cache())
    if args.command == "build":
        print(json.dumps({"key": ctx.key, "engine": str(folder), "built": built}))
        return
    with np.load(args.inputs) as data:
        feed = {k: data[k] for k in data.files}
    np.savez(args.outputs, **runner(feed))


def main(argv: list[str] | None = None, artifact: Path | None = None) -> int:
    """``engine_entry.py``: errors become one message on stderr and an exit code. ``artifact``: the
    folder of the script that calls this (the artifact), else the current folder."""
    args = _parser(artifact or Path.cwd()).parse_args(argv)
    try:
        _command(args)
    except EngineError as e:
        print(f"engine_entry: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
