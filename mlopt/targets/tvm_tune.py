"""MetaSchedule tuning for TVM builds, with records shared by every build for the same target.

GPU targets are tuned only where the device is present (trials run on it); the functions tuning
leaves unscheduled get dlight's default schedules when the library is compiled.

MetaSchedule needs static shapes, so each benchmark batch size gets its own library, tuned and
compiled with the database applied; the dynamic-shape library stays as the fallback for other
batch sizes. Workloads already tuned in the database (matched by structural hash) are not tuned
again, so a second build with the same workloads spends no trials.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator

from mlopt.core.errors import BackendUnavailable
from mlopt.core.files import flock, key_of
from mlopt.targets.backends import BuildRequest
from mlopt.targets.tvm_onnx import import_onnx
from mlopt.core.util import stdout_to_stderr

FAILED_RUN = 1e9  # MetaSchedule stores failed trials with run_secs = 1e10
INTRINSICS = "tvm.s_tir.tensor_intrin"
# Registering the tensor intrinsics of these device families (TVMScript parsed at import) took 130 s
# of CPU per process here, cuda alone most of it; a CPU (llvm) target never tensorizes with them.
DEVICE_INTRINSICS = ("cuda", "rocm", "hexagon", "metal")


def register_intrinsics(target_kind: str) -> None:
    """Import TVM's tensor intrinsics as MetaSchedule does, without the device families' ones for a
    CPU target. A later GPU tuning in the same process still gets them (imported by name)."""
    if target_kind != "llvm":
        importlib.import_module(INTRINSICS)
        for family in ("cuda", "rocm"):
            importlib.import_module(f"{INTRINSICS}.{family}")
        return
    if INTRINSICS in sys.modules:
        return
    skipped = [f"{INTRINSICS}.{f}" for f in DEVICE_INTRINSICS if f"{INTRINSICS}.{f}" not in sys.modules]
    for name in skipped:
        sys.modules[name] = types.ModuleType(name)  # a placeholder, so the package's `from . import cuda` skips it
    try:
        package = importlib.import_module(INTRINSICS)
    finally:
        for name in skipped:
            del sys.modules[name]
    for name in skipped:
        vars(package).pop(name.rsplit(".", 1)[1], None)


def _builder_init(target_kind: str) -> None:
    """Import once per builder worker, outside the build timeout (the import took 15-50 s, and 130 s
    of CPU with every device family's intrinsics)."""
    register_intrinsics(target_kind)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with flock(folder / "lock"):
        yield


def tune_static(proto: Any, req: BuildRequest, target_dict: dict[str, Any], out: Path,
                compile_fn: Callable[..., None],
                static_graph: Callable[[int], Any] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """Tune and compile one static library per benchmark batch size; return ({batch: file}, report).
    ``static_graph(b)``, where given, is the model with every shape fixed for batch ``b`` (folded and
    rewritten as the untuned static build has it), tuned and compiled instead of ``proto`` with shapes."""
    from tvm.s_tir import meta_schedule as ms

    # CPU targets tune for the serving thread count; GPU targets take their limits from the arch
    target = {**target_dict, "num-cores": req.threads} if target_dict.get("kind") == "llvm" else dict(target_dict)
    db_dir = req.tuning_dir / key_of(target)[:20]
    sizes = sorted(req.batch_sizes)
    per_size = max(1, math.ceil(req.tuning_trials / len(sizes)))
    tuned_files, report = {}, {"database": str(db_dir), "batches": []}
    with _locked(db_dir), stdout_to_stderr():
        db = ms.database.JSONDatabase(work_dir=str(db_dir))
        for b in sizes:
            shapes = {i.name: list(i.concrete({**req.dims, req.batch_axis: b})) for i in req.model.inputs}
            graph = proto if static_graph is None else static_graph(b)
            fixed = shapes if static_graph is None else None
            entry = _tune_one(graph, fixed, target, db, db_dir, per_size, req.tuning_timeout_s)
            name = f"model_b{b}.so"
            compile_fn(graph, fixed, target, out / name, req, database=db)
            tuned_files[str(b)] = name
            report["batches"].append({"batch_size": b, **entry})
    return tuned_files, report


def _tune_one(proto: Any, shapes: dict[str, list[int]] | None, target_dict: dict[str, Any], db: Any, db_dir: Path,
              trials: int, timeout_s: int) -> dict[str, Any]:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(target_dict)
    register_intrinsics(target.kind.name)  # before TuneContext imports them all
    mod = import_onnx(proto, shapes, from_onnx)
    with target:
        mod = relax.get_pipeline("zero")(mod)  # tasks are the fused call_tir functions
    tasks = ms.relax_integration.extract_tasks(mod, target)
    todo = [t for t in tasks if not _is_tuned(db, t.dispatched[0])]
    report = {"tasks": len(tasks), "already_tuned": len(tasks) - len(todo), "tuned_now": 0,
              "trials_ok": 0, "trials_failed": 0, "seconds": 0.0}
    if not todo:
        return report
    t0 = time.perf_counter()
    before = _counts(db)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=todo, work_dir=str(db_dir), seed=0)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(db_dir), max_trials_global=trials,
        max_trials_per_task=max(1, math.ceil(trials / len(todo))), num_trials_per_iter=min(16, trials),
        builder=ms.builder.LocalBuilder(timeout_sec=timeout_s, max_workers=1,
                                         initializer=functools.partial(_builder_init, target.kind.name)),
        runner=ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=0)),
        database=db,
    )
    ok, failed = (a - b for a, b in zip(_counts(db), before))
    report.update(tuned_now=sum(_is_tuned(db, t.dispatched[0]) for t in todo), trials_ok=ok, trials_failed=failed,
                  seconds=round(time.perf_counter() - t0, 2))
    if ok == 0:
        raise BackendUnavailable(
            f"MetaSchedule ran {failed} trials and none built and ran; tuning would silently do nothing",
            hint=f"raise tuning.timeout_s (now {timeout_s}s) or see the logs in {db_dir}/logs",
        )
    return report


def _is_tuned(db: Any, prim_mod: Any) -> bool:
    return bool(db.has_workload(prim_mod) and db.get_top_k(db.commit_workload(prim_mod), 1))


def _counts(db: Any) -> tuple[int, int]:
    recs = db.get_all_tuning_records()
    ok = sum(1 for r in recs if r.run_secs and all(float(s) < FAILED_RUN for s in r.run_secs))
    return ok, len(recs) - ok


PAY_ROUNDS = 7  # interleaved timings of each (tuned, untuned) pair


def keep_paying(out: Path, tuned: dict[str, str], untuned: Callable[[str], str], req: BuildRequest,
                report: dict[str, Any]) -> dict[str, str]:
    """The tuned libraries that beat the untuned ones, timed here in interleaved rounds; the others are deleted.

    A few trials per task can pick schedules slower than the untuned build's: MetaSchedule compares its own
    candidates, never the untuned lowering. Each batch's verdict goes into ``report["paid"]``."""
    import statistics

    import numpy as np
    import tvm

    from mlopt.runtime.tvm import vm

    dev = tvm.cpu()
    tvm.get_global_func("runtime.config_threadpool")(1, req.threads)
    kept, rows = {}, []
    for b, lib in tuned.items():
        libs = {"tuned": lib, "untuned": untuned(b)}
        machines = {k: vm(out, f, dev) for k, f in libs.items()}
        args = [tvm.runtime.tensor(np.require(v, requirements="C"), dev) for v in _feed(req, int(b))]
        times: dict[str, list[float]] = {k: [] for k in machines}
        for k in machines:
            machines[k]["main"](*args)  # warm-up
        for _ in range(PAY_ROUNDS):
            for k, m in machines.items():
                t0 = time.perf_counter()
                m["main"](*args)
                times[k].append(time.perf_counter() - t0)
        t_ms, u_ms = (statistics.median(times[k]) * 1e3 for k in ("tuned", "untuned"))
        ship = "tuned" if t_ms < u_ms else "untuned"
        rows.append({"batch_size": int(b), "tuned_ms": round(t_ms, 4), "untuned_ms": round(u_ms, 4), "shipped": ship})
        if ship == "tuned":
            kept[b] = lib
        else:
            (out / lib).unlink()
    report["paid"] = rows
    return kept


def _feed(req: BuildRequest, batch: int) -> list[Any]:
    """Inputs of the signature's shapes at ``batch``: normal floats, ones for integers (valid indices, nonzero)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in req.model.inputs:
        shape = i.concrete({**req.dims, req.batch_axis: batch})
        dtype = np.dtype(i.dtype)
        out.append(rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype))
    return out
