"""A matrix run, top to bottom: plan the tasks, answer the ones done before from the ledger, run the
rest on the executor, record what completed, and write one combined manifest."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlopt.manifest import Manifest, write_manifest
from mlopt.matrix import ledger
from mlopt.matrix.combine import combine, write_task_files
from mlopt.matrix.progress import Progress
from mlopt.core.errors import severest
from mlopt.matrix.tasks import MatrixConfig, Task, TaskResult, plan_all, store_root
from mlopt.store import Store

ViewFactory = Callable[[list[Task]], Progress]


@dataclass
class MatrixResult:
    """The combined manifest and exit code of a run (k8s: the Job files written instead)."""

    exit_code: int
    manifest: Manifest | None = None
    manifest_path: Path | None = None
    results: list[TaskResult] = field(default_factory=list)
    jobs: list[Path] = field(default_factory=list)


def run_matrix(config: MatrixConfig, view: ViewFactory = lambda _: Progress()) -> MatrixResult:
    """Build every recipe for every SKU with ``config.executor``; a failed task does not stop the others."""
    tasks, refused = plan_all(config)
    out = Path(config.out)
    if config.executor == "k8s":
        from mlopt.matrix.k8s import write_jobs

        return MatrixResult(0, jobs=write_jobs(tasks, config, out))
    store = Store(store_root(config))
    t0 = time.perf_counter()
    with _executor(config, store.root, out) as executor, view(tasks) as progress:
        results = _run(tasks, executor, store, config, progress)
    wall = round(time.perf_counter() - t0, 3)
    for t, r in zip(tasks, results):
        write_task_files(t, r, out)
    manifest = combine(tasks, results, config, store.root, wall,
                       refused=[f"recipe {path}: {e}" for path, e in refused])
    path = out / "manifest.json"
    write_manifest(manifest, path)
    codes = [r.exit_code for r in results] + [e.exit_code for _, e in refused]
    return MatrixResult(severest(codes), manifest, path, results)


def _run(tasks: list[Task], executor: Any, store: Store, config: MatrixConfig, progress: Progress) -> list[TaskResult]:
    """Ledger hits first, then the executor for the rest; completed results are recorded."""
    keys = {t.id: ledger.task_key(t, executor.where(t)) for t in tasks} if config.use_ledger else {}
    done: dict[str, TaskResult] = {}
    for t in tasks:
        hit = ledger.lookup(store, t, keys[t.id]) if keys else None
        if hit is not None:
            done[t.id] = hit
            progress.finished(t.id, hit)
    todo = [t for t in tasks if t.id not in done]
    for t, r in zip(todo, executor.run(todo, progress)):
        done[t.id] = r
        if keys:
            ledger.record(store, keys[t.id], r)
    return [done[t.id] for t in tasks]


@contextlib.contextmanager
def _executor(config: MatrixConfig, store: Path, out: Path) -> Iterator[Any]:
    if config.executor == "ray":
        from mlopt.matrix.ray_executor import RayExecutor

        executor: Any = RayExecutor(config, store)
    else:
        from mlopt.matrix.local import LocalExecutor

        executor = LocalExecutor(config, store, out / "tasks" / "workers")
    try:
        yield executor
    finally:
        executor.close()
