"""The matrix's unit of work: one (recipe, SKU) task, planned from recipes and run with the pipeline.

A task is the recipe resolved with ``targets: [sku]``; running it is ``mlopt.compiler.pipeline.build``
on that recipe, so every cache of the pipeline (ingest, passes, artifacts, measurements) is shared
by the tasks of one recipe through the store. A task never raises: its failure is a result with
the exit code and message the CLI would have printed for it alone.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from mlopt.core import hostlock
from mlopt.core.errors import BadInput, MloptError
from mlopt.core.spec import Strict
from mlopt.targets.catalog import SKU



class MatrixConfig(Strict):
    """What ``mlopt build-matrix`` was asked to do (every CLI flag is a field)."""

    recipes: list[str] = Field(min_length=1, description="Recipe files (.yaml).")
    targets: list[str] | Literal["all"] | None = Field(
        None, description="SKUs for every recipe; 'all': the whole catalog; None: each recipe's own targets.")
    executor: Literal["local", "ray", "k8s"] = "local"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0,
                         description="local: worker processes; ray: CPUs of a local cluster started for the run.")
    retries: int = Field(1, ge=0, description="Extra attempts for a task whose worker process died.")
    store: str | None = Field(None, description="Artifact store (over the recipes' common store, then $MLOPT_STORE).")
    out: str = Field("out/matrix", description="Folder of the combined manifest and the per-task manifests and logs.")
    catalog: str | None = Field(None, description="A SKU catalog file, over the recipes' own.")
    address: str | None = Field(None, description="ray: address of an existing cluster (default: start a local one).")
    placement: Literal["auto", "device", "anywhere"] = Field(
        "auto", description="ray: GPU-SKU tasks ask for the SKU's accelerator when the cluster has it (auto), "
                            "always (device: they wait for such a node), or never (anywhere: cross-compile).")
    ship: bool | None = Field(
        None, description="ray: tasks build into a store on their node and send the artifacts back (default: when "
                          "connected to an existing cluster with --address; a local cluster shares the store).")
    node_store: str | None = Field(None, description="ray with ship: the store folder on the nodes "
                                                     "(default: the node's $MLOPT_STORE or ~/.cache/mlopt/store).")
    image: str | None = Field(None, description="k8s: the image that runs mlopt (with the recipes' files in it).")
    namespace: str = Field("default", description="k8s: namespace of the Jobs.")
    use_ledger: bool = Field(True, description="Answer tasks done before (same inputs, artifacts intact) "
                                               "without dispatching them.")


def make_config(**fields: Any) -> MatrixConfig:
    """A ``MatrixConfig`` from flags; a bad value is a ``BadInput`` naming the flag's field."""
    try:
        return MatrixConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BadInput(f"build-matrix {where}: {err['msg']}", hint="see `mlopt build-matrix --help`") from None


@dataclass(frozen=True)
class Task:
    """One (recipe, SKU) cell of the matrix."""

    recipe_name: str
    recipe_path: str
    recipe: dict[str, Any]  # the resolved recipe, targets=[sku], as JSON data
    sku: SKU

    @property
    def id(self) -> str:
        return f"{self.recipe_name}/{self.sku.name}"

    @property
    def slug(self) -> str:
        """A folder name for the task's files."""
        return f"{self.recipe_name}--{self.sku.name}"


@dataclass
class TaskResult:
    """What a task produced: the manifest of its build, or the error that stopped it."""

    task_id: str
    exit_code: int
    manifest: dict[str, Any] | None = None
    error: str | None = None
    started: float = 0.0
    finished: float = 0.0
    where: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1
    from_ledger: bool = False
    log: list[str] = field(default_factory=list)
    bundle: bytes | None = None  # the artifacts, when shipped back from a node with its own store

    @property
    def seconds(self) -> float:
        return round(self.finished - self.started, 3)

    @property
    def cached(self) -> bool:
        """Served from the store: answered before dispatch, or every build of it was a store hit."""
        if self.from_ledger:
            return True
        built = [c for e in (self.manifest or {}).get("entries", []) for c in e["candidates"] if c["status"] == "built"]
        return bool(built) and all(c["cached"] for c in built)


# ------------------------------------------------------------------ planning


def plan(config: MatrixConfig) -> list[Task]:
    """Every (recipe, SKU) task; any recipe that cannot be used is an error (see ``plan_all``)."""
    tasks, refused = plan_all(config)
    if refused:
        raise refused[0][1]
    return tasks


def plan_all(config: MatrixConfig) -> tuple[list[Task], list[tuple[str, BadInput]]]:
    """Every (recipe, SKU) task, recipes interleaved so that parallel workers start on different models
    rather than wait for one model's ingest (the tasks of one recipe share it through the store); and
    the recipes refused as bad input, each with its error, so one bad recipe does not stop the others.
    When every recipe is refused, the first one's error is raised."""
    if not config.recipes:
        raise BadInput("build-matrix needs at least one recipe")
    if config.targets is not None and config.targets != "all" and not config.targets:
        raise BadInput("--targets names no SKU; give SKU names (comma-separated) or 'all'")
    per_recipe, refused = [], []
    for path in config.recipes:
        try:
            per_recipe.append(_recipe_tasks(path, config))
        except BadInput as e:
            refused.append((path, e))
    if not per_recipe:
        raise refused[0][1]
    names = [tasks[0].recipe_name for tasks in per_recipe if tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInput(f"two recipes are named {', '.join(dup)}; a matrix needs distinct recipe names")
    depth = max(len(t) for t in per_recipe)
    return [tasks[i] for i in range(depth) for tasks in per_recipe if i < len(tasks)], refused


def _recipe_tasks(path: str, config: MatrixConfig) -> list[Task]:
    from mlopt.recipes import load_recipe
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.detect import resolve_targets

    overrides = {"catalog": str(Path(config.catalog).resolve())} if config.catalog else {}
    recipe = load_recipe(path, overrides)
    catalog = load_catalog(recipe.catalog)
    names = recipe.targets if config.targets is None else \
        [s.name for s in catalog.skus] if config.targets == "all" else config.targets
    skus = [sku for sku, _ in resolve_targets(catalog, names)]  # aliases collapse; 'host' is this machine's SKU
    tasks = []
    for sku in skus:
        one = recipe.model_copy(update={"targets": [sku.name], "output": ".", "store": None})
        tasks.append(Task(recipe.name, str(Path(path).resolve()), one.model_dump(mode="json", by_alias=True), sku))
    return tasks


def store_root(config: MatrixConfig) -> Path:
    """--store, else the store every recipe names (when they agree), else $MLOPT_STORE or the default."""
    from mlopt.recipes import load_recipe
    from mlopt.store import default_store_path

    if config.store:
        return Path(config.store).expanduser().resolve()
    named = set()
    for p in config.recipes:
        try:
            named.add(load_recipe(p).store)
        except BadInput:  # refused by the plan, listed in the manifest's errors
            continue
    if len(named) == 1 and None not in named:
        return Path(named.pop()).expanduser()
    return default_store_path()


# ------------------------------------------------------------------ running one task


def execute(task: Task, store_root: str | None, where: dict[str, Any]) -> TaskResult:
    """Run one task with the pipeline in this process; never raises (errors become the result)."""
    from mlopt.store import Store

    result = TaskResult(task.id, 0, started=time.time(), where={**host_where(), **where})
    try:
        store = Store(store_root)
        # shared with the other tasks here; a timed loop takes it alone (see mlopt.core.hostlock)
        with hostlock.building(), store.staging() as out:
            _build(task, store, out, result)
    except MloptError as e:
        result.exit_code, result.error = e.exit_code, str(e)
    except Exception as e:  # a bug or a library's crash-free failure: this task fails, the others go on
        result.exit_code, result.error = 1, f"unexpected {type(e).__name__}: {e}"
    result.finished = time.time()
    return result


def _build(task: Task, store: Any, out: Path, result: TaskResult) -> None:
    from mlopt.compiler.pipeline import build
    from mlopt.recipes import recipe_from_dict

    recipe = recipe_from_dict({**task.recipe, "output": str(out)}, where=task.recipe_path)
    built = build(recipe, store, result.log.append)
    result.exit_code = built.exit_code
    result.manifest = built.manifest.model_dump(mode="json")
    errors = result.manifest["errors"]
    result.error = "; ".join(errors) if errors else None


def measure_here(task: Task, result: TaskResult, store_root: str | None) -> None:
    """On the task's device, after its compile: the builds of its SKU the compile left without
    figures are validated and measured here by ``mlopt measure``'s own function
    (``measure_manifest``), and the figures merged into the task's manifest. What happened is in
    ``result.where["measure"]``: the backends measured, or the exit code and reason it could not
    (the compile's manifest is kept as it was, and so is the task's exit code)."""
    from mlopt.compiler.remeasure import MeasureRequest, measure_manifest
    from mlopt.manifest import Manifest, write_manifest
    from mlopt.store import Store

    if result.manifest is None or not _pending(result.manifest, task.sku.name):
        return
    with tempfile.TemporaryDirectory(prefix="mlopt-measure-") as tmp:
        path = Path(tmp) / "manifest.json"
        write_manifest(Manifest.model_validate(result.manifest), path)
        req = MeasureRequest(manifest=path, sku=task.sku.name, store=Store(store_root).root)
        try:
            measured = measure_manifest(req, result.log.append)
        except MloptError as e:
            result.where["measure"] = {"by": "mlopt measure", "exit_code": e.exit_code, "error": str(e)}
            return
    result.manifest = measured.manifest.model_dump(mode="json")
    result.where["measure"] = {"by": "mlopt measure", "exit_code": measured.exit_code, "measured": measured.measured,
                               "unmeasured": measured.unmeasured}


def _pending(manifest: dict[str, Any], sku: str) -> bool:
    """Whether the manifest's entry for ``sku`` has a built candidate without figures."""
    return any(c["status"] == "built" and c.get("measurement") is None
               for e in manifest.get("entries", []) if e["sku"] == sku for c in e["candidates"])


def host_where() -> dict[str, Any]:
    """The process and machine a task ran in."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def worker_died(task: Task, attempts: int, how: str) -> TaskResult:
    """The result of a task whose worker process died on every attempt."""
    now = time.time()
    return TaskResult(task.id, 1, error=f"its worker process died ({how}) on each of {attempts} attempt(s)",
                      started=now, finished=now, attempts=attempts)


def set_thread_env(threads: int) -> None:
    """Size this worker's torch/OpenMP/MKL/OpenBLAS thread pools before they load (training, export).

    TVM's pool is left alone: ``mlopt.targets.tvm`` sizes it to the cores so that measurements run
    with the recipe's thread count, and a pool of one pins the process to one core, which then
    slows every later ONNX Runtime session of the worker 4x (measured: MiniLM 38 ms instead of 10).
    Timed loops do not compete with other tasks (``mlopt.core.hostlock``), so they may use every core."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
