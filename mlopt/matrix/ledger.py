"""Tasks answered before dispatch: a record, in the store, of every task that completed.

A task's record is keyed by everything its result depends on that can be read without importing a
compiler: the resolved recipe, the model and data files, the SKU, the Python package versions, the
compilers on the path, the machine, and where the task runs. A rerun whose key has a record, and
whose artifacts are still in the store intact, takes the recorded result instead of starting a
worker. Only complete results are recorded (exit 0, every candidate built), so a toolchain that
appears later is never hidden behind an old result.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from mlopt.matrix.tasks import Task, TaskResult
from mlopt.core.files import key_of
from mlopt.store import Store

KIND = "matrix"


def task_key(task: Task, where: str) -> str:
    """The key of a task's record: its inputs, the environment that builds it, and where it runs."""
    from mlopt.compiler import ingest
    from mlopt.compiler.run import Run
    from mlopt.recipes import recipe_from_dict

    recipe = recipe_from_dict(task.recipe, where=task.recipe_path)
    run = Run(recipe, None, lambda _: None)  # type: ignore[arg-type]  (data_key reads the recipe only)
    return key_of({"recipe": task.recipe, "sku": task.sku.model_dump(mode="json"),
                   "source": ingest.source_key(recipe.model),
                   "data": {k: run.data_key(k) for k in ("calibration", "evaluation")},
                   "environment": environment(), "where": where})


def backend_packages() -> list[str]:
    """Packages whose version changes a backend's output (its spec's), besides the pipeline's own toolchain()."""
    from mlopt.compiler.run import toolchain
    from mlopt.targets.backends import backend_specs

    names = dict.fromkeys(p for s in backend_specs() for p in (*s.packages, *s.build_packages))
    return [p for p in names if p not in toolchain()]


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Package and compiler versions, and this machine (looked up once per process)."""
    from mlopt.compiler.run import toolchain
    from mlopt.targets import detect, gpu_toolchain
    from mlopt.targets.backends import package_version

    return {"packages": {**toolchain(), **{p: package_version(p) for p in backend_packages()}},
            "tools": detect.toolchains(), "cuda": gpu_toolchain.cuda_missing(), "rocm": gpu_toolchain.rocm_missing(),
            "host": detect.host()}


def lookup(store: Store, task: Task, key: str) -> TaskResult | None:
    """The recorded result of ``task``, when its artifacts and model version are still in the store."""
    record = store.lookup_step(KIND, key)
    if record is None or not _intact(store, record["manifest"]):
        return None
    manifest = _as_replayed(record["manifest"])
    return TaskResult(task.id, 0, manifest=manifest, from_ledger=True,
                      where={"recorded": record["where"]}, started=0.0, finished=0.0)


def record(store: Store, key: str, result: TaskResult) -> bool:
    """Record a complete result (exit 0, every candidate built); False when it is not complete."""
    m = result.manifest
    if result.exit_code != 0 or m is None or result.from_ledger:
        return False
    if any(c["status"] != "built" for e in m["entries"] for c in e["candidates"]):
        return False
    store.record_step(KIND, key, {"task": result.task_id, "manifest": m, "where": result.where})
    return True


def _intact(store: Store, manifest: dict[str, Any]) -> bool:
    model = manifest["models"][0]
    versions = store.models().get(model["name"], {}).get("versions", [])
    linked = next((set(v["artifacts"]) for v in versions if v["version"] == model["version"]), None)
    if linked is None:
        return False
    for key in artifact_keys(manifest):
        art = store.get(key)
        if art is None or key not in linked or store.verify(art):
            return False
    return True


def artifact_keys(manifest: dict[str, Any]) -> list[str]:
    """Every artifact a task manifest refers to."""
    return sorted({c["artifact"]["key"] for e in manifest["entries"] for c in e["candidates"] if c.get("artifact")})


def _as_replayed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The recorded manifest as a rerun reports it: every build and pass came from the store."""
    m = copy.deepcopy(manifest)
    for e in m["entries"]:
        for c in e["candidates"]:
            c["cached"] = c["status"] == "built"
    for model in m["models"]:
        for p in model["passes"]:
            p["cached"] = True
    return m
