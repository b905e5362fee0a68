"""The live view of a matrix run: recipe rows by SKU columns, each cell queued, running, cached, built
or failed, redrawn on stderr while the tasks run."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from mlopt.matrix.tasks import Task, TaskResult

STYLES = {"queued": "dim", "running": "yellow", "cached": "cyan", "built": "green", "failed": "bold red"}


def cell_status(result: TaskResult) -> str:
    """failed (exit code not 0), cached (served from the store) or built."""
    if result.exit_code != 0:
        return "failed"
    return "cached" if result.cached else "built"


def chosen(result: TaskResult) -> tuple[str | None, dict[str, float]]:
    """The chosen backend of a task's SKU and its p50 latency (ms) by batch size."""
    entries = (result.manifest or {}).get("entries") or [{}]
    entry = entries[0]
    meas = entry.get("measurement") or {}
    return entry.get("chosen_backend"), {str(b["batch_size"]): b["p50_ms"] for b in meas.get("batches", [])}


class Progress:
    """Receives the events of a run; this base ignores them (tests, --json without a terminal)."""

    def started(self, task_id: str, where: dict[str, Any]) -> None:
        """A worker began ``task_id``."""

    def finished(self, task_id: str, result: TaskResult) -> None:
        """``task_id`` ended (built, cached or failed)."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class MatrixView(Progress):
    """A rich Live table of the matrix on ``console``."""

    def __init__(self, tasks: list[Task], console: Console, title: str):
        self.rows = list(dict.fromkeys(t.recipe_name for t in tasks))
        self.cols = list(dict.fromkeys(t.sku.name for t in tasks))
        self.title = title
        self.cells: dict[str, tuple[str, str, float]] = {t.id: ("queued", "", 0.0) for t in tasks}
        self.lock = threading.Lock()
        self.live = Live(console=console, get_renderable=self.table, refresh_per_second=4, transient=True)

    def started(self, task_id: str, where: dict[str, Any]) -> None:
        with self.lock:
            self.cells[task_id] = ("running", str(where.get("node_id", ""))[:8], time.time())

    def finished(self, task_id: str, result: TaskResult) -> None:
        status = cell_status(result)
        backend, p50 = chosen(result)
        detail = f"exit {result.exit_code}" if status == "failed" else \
            " ".join([backend or "-", *(f"b{b}:{ms:.2f}ms" for b, ms in list(p50.items())[:1])])
        with self.lock:
            self.cells[task_id] = (status, detail, 0.0)

    def table(self) -> Table:
        """The matrix as it stands."""
        t = Table(title=self.title)
        t.add_column("recipe")
        for sku in self.cols:
            t.add_column(sku)
        with self.lock:
            cells = dict(self.cells)
        for recipe in self.rows:
            t.add_row(recipe, *(self._cell(cells.get(f"{recipe}/{sku}")) for sku in self.cols))
        return t

    @staticmethod
    def _cell(cell: tuple[str, str, float] | None) -> str:
        if cell is None:
            return "[dim]-[/]"
        status, detail, since = cell
        if status == "running":
            detail = f"{time.time() - since:.0f}s {detail}".strip()
        return f"[{STYLES[status]}]{status}[/]" + (f" {detail}" if detail else "")

    def __enter__(self) -> MatrixView:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()


def summary_table(report: Any) -> Table:
    """The finished matrix of a combined manifest (its ``matrix`` report) as a table."""
    t = Table(title=f"build matrix ({report.executor}, {report.workers} workers, {report.wall_seconds:.1f}s)")
    recipes = list(dict.fromkeys(c.recipe for c in report.cells))
    t.add_column("recipe")
    for sku in report.skus:
        t.add_column(sku)
    cells = {(c.recipe, c.sku): c for c in report.cells}
    for recipe in recipes:
        t.add_row(recipe, *(_summary_cell(cells.get((recipe, sku))) for sku in report.skus))
    return t


def _summary_cell(c: Any) -> str:
    if c is None:
        return "[dim]-[/]"
    if c.status == "failed":
        return f"[{STYLES['failed']}]failed[/] exit {c.exit_code}"
    p50 = next(iter(c.p50_ms.items()), None)
    text = f"[{STYLES[c.status]}]{c.status}[/] {c.chosen_backend or '-'}"
    text += f" b{p50[0]}:{p50[1]:.2f}ms" if p50 else ""
    return text + (f" ({c.attempts} attempts)" if c.attempts > 1 else "")
