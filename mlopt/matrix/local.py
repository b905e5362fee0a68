"""The local executor: a pool of worker processes on this machine.

Workers are spawned (not forked: the driver may hold threads and libraries that do not survive a
fork), pin their math libraries to ``cores / workers`` threads so two workers on two cores do not
fight, and send their output to a log file so the progress view stays readable. A worker that dies
(a compiler's segfault, the out-of-memory killer) breaks the pool: the pool is started again and
every task that was running in it counts one attempt.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from mlopt.matrix.progress import Progress
from mlopt.matrix.tasks import MatrixConfig, Task, TaskResult, execute, set_thread_env, worker_died

_EVENTS: Any = None  # this worker's queue of "task started" events (set by _init_worker)


class LocalExecutor:
    """Runs tasks on a pool of ``config.workers`` processes on this machine."""

    name = "local"

    def __init__(self, config: MatrixConfig, store: Path, log_dir: Path):
        self.config, self.store, self.log_dir = config, store, log_dir

    def where(self, task: Task) -> str:
        """Where ``task`` runs, as part of its ledger key (the machine itself is in the key already)."""
        return "local"

    def run(self, tasks: list[Task], progress: Progress) -> list[TaskResult]:
        """Run ``tasks``; return their results in order."""
        return run_local(tasks, self.store, self.config, progress, self.log_dir) if tasks else []

    def close(self) -> None:
        """Nothing outlives a run: each run makes its own pool."""


def run_local(tasks: list[Task], store: Path, config: MatrixConfig, progress: Progress,
              log_dir: Path) -> list[TaskResult]:
    """Run ``tasks`` on ``config.workers`` processes; a task whose worker dies is retried."""
    ctx = mp.get_context("spawn")
    events = ctx.SimpleQueue()
    results: dict[str, TaskResult] = {}
    attempts = {t.id: 0 for t in tasks}
    died: set[str] = set()
    todo = list(tasks)
    while todo:
        started = _pool_round(todo, str(store), config, ctx, events, progress, results, log_dir)
        for t in [t for t in todo if t.id not in results]:
            # a broken pool fails every future: charge the tasks that were running in it (all, if none was seen)
            if t.id in started or not started:
                attempts[t.id] += 1
            if attempts[t.id] > config.retries:
                results[t.id] = worker_died(t, attempts[t.id], "the process pool broke")
                died.add(t.id)
                progress.finished(t.id, results[t.id])
        todo = [t for t in todo if t.id not in results]
    for t in tasks:
        if t.id not in died:
            results[t.id].attempts = attempts[t.id] + 1
    return [results[t.id] for t in tasks]


def _pool_round(todo: list[Task], store: str, config: MatrixConfig, ctx: Any, events: Any, progress: Progress,
                results: dict[str, TaskResult], log_dir: Path) -> set[str]:
    """Run ``todo`` in one pool until all finish or the pool breaks; return the ids seen starting."""
    started: set[str] = set()
    workers = min(config.workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, events, str(log_dir))) as pool:
        futures = {pool.submit(_work, t, store): t for t in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(events, started, progress)
            for f in done:
                t = futures[f]
                try:
                    results[t.id] = f.result()
                except BrokenProcessPool:
                    continue  # retried by the caller
                progress.finished(t.id, results[t.id])
    _drain(events, started, progress)
    return started


def _drain(events: Any, started: set[str], progress: Progress) -> None:
    while not events.empty():
        task_id, where = events.get()
        started.add(task_id)
        progress.started(task_id, where)


def _init_worker(threads: int, events: Any, log_dir: str) -> None:
    """Per worker: thread pools sized to its share of the cores, output to a log file, the event queue."""
    global _EVENTS
    _EVENTS = events
    set_thread_env(threads)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(log_dir) / f"worker-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _work(task: Task, store: str) -> TaskResult:
    where = {"executor": "local", "pid": os.getpid()}
    _EVENTS.put((task.id, where))  # SimpleQueue.put writes now: a worker killed next still reports the start
    return execute(task, store, where)
