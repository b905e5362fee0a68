"""One manifest for a whole matrix: every task's entries and models, the failed tasks' errors, and the
matrix table (recipe x SKU -> status, chosen backend, p50, cached, where it ran)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlopt import __version__
from mlopt.manifest import Manifest, MatrixCell, MatrixRecipe, MatrixReport, write_manifest
from mlopt.matrix.progress import cell_status, chosen
from mlopt.core.errors import severest
from mlopt.matrix.tasks import MatrixConfig, Task, TaskResult
from mlopt.core.files import key_of


def combine(tasks: list[Task], results: list[TaskResult], config: MatrixConfig, store: Path,
            wall_seconds: float, refused: list[str] = ()) -> Manifest:
    """The combined manifest of a matrix run (results in the order of ``tasks``); ``refused`` lists
    the recipes that could not be used (they fail the run, the others were built)."""
    from mlopt.compiler.run import toolchain
    from mlopt.targets import detect

    manifests = [r.manifest for r in results if r.manifest]
    recipes = _recipes(tasks)
    return Manifest(
        mlopt_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        recipe={"name": "+".join(r.name for r in recipes), "digest": key_of([r.digest for r in recipes])},
        host=detect.host(),
        toolchain=toolchain(),
        store=str(store),
        models=_models(manifests),
        entries=[e for m in manifests for e in m["entries"]],
        status="failed" if refused or severest([r.exit_code for r in results]) else "ok",
        errors=[*refused, *(f"{t.id}: {r.error}" for t, r in zip(tasks, results) if r.exit_code != 0)],
        stage_seconds={**{f"task {t.id}": r.seconds for t, r in zip(tasks, results)}, "matrix": wall_seconds},
        matrix=MatrixReport(executor=config.executor, workers=config.workers,
                            skus=list(dict.fromkeys(t.sku.name for t in tasks)), recipes=recipes,
                            cells=[_cell(t, r) for t, r in zip(tasks, results)], wall_seconds=wall_seconds),
    )


def _recipes(tasks: list[Task]) -> list[MatrixRecipe]:
    first: dict[str, Task] = {}
    for t in tasks:
        first.setdefault(t.recipe_name, t)
    return [MatrixRecipe(name=t.recipe_name, path=t.recipe_path,
                         digest=key_of({k: v for k, v in t.recipe.items() if k != "targets"}))
            for t in first.values()]


def _models(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (model, version) once: the tasks of one recipe report the same model."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for m in manifests:
        for model in m["models"]:
            seen.setdefault((model["name"], model["version"]), model)
    return list(seen.values())


def _cell(task: Task, result: TaskResult) -> MatrixCell:
    backend, p50 = chosen(result)
    entries = (result.manifest or {}).get("entries") or [{}]
    artifact = entries[0].get("artifact")
    return MatrixCell(recipe=task.recipe_name, sku=task.sku.name, status=cell_status(result),
                      exit_code=result.exit_code, chosen_backend=backend,
                      artifact_key=artifact["key"] if artifact else None, p50_ms=p50, seconds=result.seconds,
                      attempts=result.attempts, where=result.where, error=result.error)


def write_task_files(task: Task, result: TaskResult, out: Path) -> None:
    """The task's own manifest and log under ``out/tasks/<recipe>--<sku>/``."""
    folder = out / "tasks" / task.slug
    folder.mkdir(parents=True, exist_ok=True)
    if result.manifest is not None:
        write_manifest(Manifest.model_validate(result.manifest), folder / "manifest.json")
    if result.log or not result.from_ledger:
        lines = result.log + ([f"[error] exit {result.exit_code}: {result.error}"] if result.exit_code else [])
        (folder / "log.txt").write_text("\n".join(lines) + "\n")
