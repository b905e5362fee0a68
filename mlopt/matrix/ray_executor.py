"""The Ray executor: each task is a Ray task on an existing cluster (``--address``) or on a local one
started for the run.

Placement: a task for a GPU SKU asks for the SKU's accelerator (``accelerator_type:H100``, the
catalog's ``ray_accelerator``) so that it lands on a node with that GPU, where it can measure, tune
and build engines; ``placement`` says whether it does so when the cluster has such a node (auto),
always (device), or never (anywhere: a cross-compile on any node). CPU work runs anywhere.

Artifacts: on a local cluster the nodes share the driver's store. On a cluster whose nodes may not
see it (``--address``, or ``ship``), a task builds into a store on its node and returns its
artifacts as a tar, which the driver files in its own store (``mlopt.matrix.ship``). The recipe's
files must be at the same paths on the nodes (a shared file system, or an image holding them), and
the nodes need mlopt installed.

A task whose worker process dies is retried by Ray (``max_retries``); the attempts are counted from
the start events each attempt sends to a small actor, which also drives the progress view.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlopt.core.errors import BackendUnavailable, BadInput, MloptError
from mlopt.matrix.progress import Progress
from mlopt.matrix.tasks import MatrixConfig, Task, TaskResult, execute, measure_here, set_thread_env, worker_died

POLL_S = 0.25
# Ray wants a positive amount; this small share lets any number of build tasks sit on one GPU node.
ACCELERATOR_SHARE = 0.001


class RayExecutor:
    """Runs tasks as Ray tasks on the cluster it connects to (or starts) when made."""

    name = "ray"

    def __init__(self, config: MatrixConfig, store: Path):
        self.config, self.store = config, store
        self.ray = _import_ray()
        self.owned = _connect(self.ray, config)
        self.cluster = self.ray.cluster_resources()

    def where(self, task: Task) -> str:
        """Where ``task`` runs, as part of its ledger key: the cluster and the resources it asks for."""
        return json.dumps({"ray": self.config.address or "local", **placement(task, self.config, self.cluster)},
                          sort_keys=True)

    def run(self, tasks: list[Task], progress: Progress) -> list[TaskResult]:
        """Run ``tasks``; return their results in order."""
        return _run(self.ray, tasks, self.store, self.config, progress, self.cluster) if tasks else []

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("the ray executor needs Ray", hint="pip install 'mlopt[ray]'") from None
    return ray


def _connect(ray: Any, config: MatrixConfig) -> bool:
    """Join the cluster at ``config.address``, or start a local one; False when already connected."""
    if ray.is_initialized():
        return False
    common = {"log_to_driver": False, "logging_level": logging.WARNING}
    if config.address:
        ray.init(address=config.address, **common)
    else:
        # Ray renices its workers (15), so their timings would measure everyone else's load; and
        # "local" starts a new cluster even when `ray start` left one on this machine
        with _env_default("RAY_worker_niceness", "0"):
            ray.init(address="local", num_cpus=config.workers, include_dashboard=False, **common)
    return True


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """``name=value`` in the environment (for the processes started meanwhile) unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def placement(task: Task, config: MatrixConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray options that put ``task`` where it must run (empty: anywhere)."""
    if task.sku.kind != "gpu" or config.placement == "anywhere":
        return {}
    accel = task.sku.ray_accelerator
    resource = f"accelerator_type:{accel}" if accel else None
    if resource is None or resource not in cluster:
        if config.placement == "device":
            what = f"no node of the Ray cluster offers {resource}" if resource else \
                f"SKU {task.sku.name} names no ray_accelerator in the catalog"
            raise BadInput(f"task {task.id} must run on its device, and {what}",
                           hint="add such a node, set ray_accelerator in your catalog, or use --placement auto")
        return {}
    opts: dict[str, Any] = {"resources": {resource: ACCELERATOR_SHARE}}
    if cluster.get("GPU"):
        opts["num_gpus"] = 1  # the task uses the GPU: Ray gives it one and sets CUDA_VISIBLE_DEVICES
    return opts


def _run(ray: Any, tasks: list[Task], store: Path, config: MatrixConfig, progress: Progress,
         cluster: dict[str, float]) -> list[TaskResult]:
    ship = config.ship if config.ship is not None else config.address is not None
    task_store = config.node_store if ship else str(store)
    options = {t.id: placement(t, config, cluster) for t in tasks}
    sink = ray.remote(num_cpus=0)(EventSink).remote()
    remote = ray.remote(_remote_task)
    refs = {remote.options(name=f"mlopt {t.id}", max_retries=config.retries, num_cpus=1, **options[t.id])
            .remote(t, task_store, ship, sink, bool(options[t.id])): t for t in tasks}
    starts: Counter[str] = Counter()
    results: dict[str, TaskResult] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        _drain(ray, sink, starts, results, progress)
        for ref in ready:
            t = refs[ref]
            results[t.id] = _collect(ray, ref, t, store, starts)
            progress.finished(t.id, results[t.id])
    _drain(ray, sink, starts, results, progress)
    for t in tasks:
        results[t.id].attempts = max(1, starts[t.id])
        results[t.id].where["requested"] = options[t.id]
    return [results[t.id] for t in tasks]


def _collect(ray: Any, ref: Any, task: Task, store: Path, starts: Counter[str]) -> TaskResult:
    """A finished task's result, its artifacts filed in ``store`` when they were shipped."""
    from mlopt.matrix.ship import adopt
    from mlopt.store import Store

    try:
        result: TaskResult = ray.get(ref)
    except ray.exceptions.WorkerCrashedError:
        return worker_died(task, starts[task.id], "ray: worker crashed")
    except ray.exceptions.RayError as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        failed = worker_died(task, starts[task.id], f"ray: {type(e).__name__}")
        failed.error = f"ray: {type(e).__name__}: {line[:300]}"
        return failed
    if result.bundle is not None:
        try:
            result.manifest = adopt(Store(store), result.bundle, result.manifest or {})
        except MloptError as e:
            result.exit_code, result.error = e.exit_code, str(e)
        result.bundle = None
    return result


def _drain(ray: Any, sink: Any, starts: Counter[str], results: dict[str, TaskResult], progress: Progress) -> None:
    for task_id, where in ray.get(sink.drain.remote()):
        starts[task_id] += 1
        if task_id not in results:  # a late event of a task already finished changes nothing
            progress.started(task_id, where)


class EventSink:
    """A Ray actor that collects the tasks' start events for the driver."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def started(self, task_id: str, where: dict[str, Any]) -> None:
        self.events.append((task_id, where))

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.events = self.events, []
        return out


def _remote_task(task: Task, store: str | None, ship: bool, sink: Any, on_device: bool = False) -> TaskResult:
    """The body of a Ray task: report the start, build, on its device measure what the build left
    without figures (``mlopt measure``'s function, ``measure_here``), and pack the artifacts when
    shipping."""
    import ray

    ctx = ray.get_runtime_context()
    resources = ctx.get_assigned_resources()
    where = {"executor": "ray", "node_id": ctx.get_node_id(), "resources": resources, "pid": os.getpid()}
    ray.get(sink.started.remote(task.id, where))  # recorded before any work: a crash after it counts
    set_thread_env(max(1, int(resources.get("CPU", 1))))
    result = execute(task, store, where)
    if on_device:
        measure_here(task, result, store)
    if ship and result.manifest is not None:
        _pack_into(result, store)
    return result


def _pack_into(result: TaskResult, store: str | None) -> None:
    from mlopt.matrix.ship import pack
    from mlopt.store import Store

    try:
        result.bundle = pack(Store(store), result.manifest or {})
    except (OSError, KeyError, StopIteration) as e:
        result.exit_code, result.error = 1, f"packing the artifacts to send back failed: {type(e).__name__}: {e}"
