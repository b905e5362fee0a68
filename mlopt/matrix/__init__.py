"""Batch builds: every recipe for every SKU, one task each, on a local process pool, a Ray cluster, or
as Kubernetes Jobs (``mlopt build-matrix``)."""

from mlopt.matrix.runner import MatrixResult, run_matrix
from mlopt.matrix.tasks import MatrixConfig, Task, TaskResult, plan

__all__ = ["MatrixConfig", "MatrixResult", "Task", "TaskResult", "plan", "run_matrix"]
