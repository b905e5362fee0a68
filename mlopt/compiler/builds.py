"""Per SKU: each backend builds, the build is validated, stored and measured; the fastest is chosen."""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlopt.compiler import ingest
from mlopt.compiler.measure import MEMORY_METHOD, measure, peak_memory
from mlopt.core.model import Model
from mlopt.compiler.run import Run, evaluate, geomean
from mlopt.core.errors import MloptError, ValidationMismatch, disk_full
from mlopt.core.files import key_of
from mlopt.targets import detect
from mlopt.targets.backends import Backend, BuildRequest, get_backend
from mlopt.targets.catalog import SKU
from mlopt.core.util import scratch_cwd


def build_sku(run: Run, model: Model, sku: SKU, version: int, version_key: str,
               reference: dict[str, Any]) -> tuple[dict[str, Any], list[str], int]:
    allowed = run.recipe.backends_for(sku.name, sku.kind)
    names = [b for b in sku.backends if allowed is None or b in allowed]
    runs_here, why_not = detect.host_runs(sku)
    candidates, errors = [], []
    for name in names:
        cand = _candidate(run, model, sku, get_backend(name), version, version_key, reference, runs_here, why_not)
        candidates.append(cand)
        if cand["status"] == "failed":
            errors.append(f"{sku.name}/{name}: {cand['reason']}")
    chosen, chosen_by = _choose(candidates)
    entry = {
        "model": run.recipe.model_name, "version": version, "sku": sku.name, "sku_kind": sku.kind,
        "chosen_backend": chosen["backend"] if chosen else None, "chosen_by": chosen_by,
        "artifact": chosen["artifact"] if chosen else None, "precision": chosen["precision"] if chosen else None,
        "measurement": chosen["measurement"] if chosen else None,
        "cost": _cost(sku, chosen["measurement"]) if chosen and chosen["measurement"] else None,
        "candidates": candidates,
    }
    if chosen is None and not names:
        errors.append(f"{sku.name}: none of the recipe's backends {allowed} serve this SKU "
                      f"(it supports {sku.backends})")
    elif chosen is None and not errors:
        errors.append(f"{sku.name}: no backend can build for it here, and none has an on-device (JIT) path: "
                      + "; ".join(f"{c['backend']}: {c['reason']}" for c in candidates))
    code = 3 if any(c.get("validation") and c["validation"]["status"] == "failed" for c in candidates) else \
        (4 if chosen is None else 0)
    return entry, errors, code


def _candidate(run: Run, model: Model, sku: SKU, backend: Backend, version: int, version_key: str,
               reference: dict[str, Any], runs_here: bool, why_not: str) -> dict[str, Any]:
    avail = backend.availability(sku, runs_here)
    cand: dict[str, Any] = {"backend": backend.name, "status": "unavailable", "reason": avail.reason}
    if avail.build == "no":
        run.log(f"[{sku.name}] {backend.name}: unavailable ({avail.reason})")
        return cand
    plan = run.recipe.benchmark
    threads = sku.threads or plan.threads
    key = key_of({"version": version_key, "model": model.digest, "backend": backend.name,
                  "toolchain": backend.toolchain_for(sku), "trials": run.recipe.tuning.trials, "threads": threads,
                  "requires": backend.requires(sku),
                  # what the code is built for, not the SKU's name: SKUs of one architecture share builds
                  "sku": sku.model_dump(include={"kind", "vendor", "arch", "machine", "tvm_target", "dtypes",
                                                 "onnxruntime_providers", "openvino_device"})})
    cand["compiled"] = avail.build
    try:
        art, cached, validation, seconds = _artifact(run, model, sku, backend, key, threads, avail, why_not,
                                                     version)
    except ValidationMismatch as e:
        run.log(f"[{sku.name}] {backend.name}: FAILED validation: {e}")
        return {**cand, "status": "failed", "reason": str(e),
                "validation": {"status": "failed", "max_abs_diff": e.max_abs_diff, "atol": backend.atol,
                               "rtol": backend.rtol, "reason": str(e)}}
    except MloptError as e:
        run.log(f"[{sku.name}] {backend.name}: failed: {e}")
        return {**cand, "status": "failed", "reason": str(e)}
    except Exception as e:  # a compiler's own error (TVM, ORT): recorded per candidate, others go on
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise disk_full(e) from e  # a full disk would fail every candidate after this one: stop here
        run.log(f"[{sku.name}] {backend.name}: failed: {type(e).__name__}: {e}")
        return {**cand, "status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    run.store.link(run.recipe.model_name, version, art.key)
    cand.update(status="built", reason="" if avail.run else _not_run(avail.reason, why_not), precision=art.meta["precision"],
                artifact=_artifact_ref(art), validation=validation, build_seconds=seconds, cached=cached,
                details=art.meta.get("details", {}), measurement=None)
    if avail.run:
        with run.stage(f"measure {sku.name}/{backend.name}"):
            cand["measurement"] = _measure(run, backend, art, threads, reference)
    run.log(f"[{sku.name}] {backend.name}: {'cached' if cached else 'built'} {art.short}")
    return cand


def _not_run(how: str, why: str) -> str:
    """Why a build was not run here, then what it is: 'cpu-x86-64-v4 code needs avx512f ...; built, not measured'."""
    return "; ".join(dict.fromkeys(x for x in (why, how) if x))


def _artifact(run: Run, model: Model, sku: SKU, backend: Backend, key: str, threads: int, avail: Any,
              why_not: str, version: int) -> tuple[Any, bool, dict[str, Any], float]:
    """The stored artifact for ``key``, building and validating it first on a miss."""
    art = run.store.reusable(key)  # a damaged one is rebuilt here, never replaced by another backend
    if art is not None:
        validation = art.meta["validation"]
        if validation["status"] == "not-run" and avail.run:  # stored by a machine that could not run it
            validation = _validate(run, model, backend, art.path, art.meta, threads)
        return art, True, validation, art.meta["build_seconds"]
    plan = run.recipe.benchmark
    req = BuildRequest(model=model, sku=sku, threads=threads, tuning_trials=run.recipe.tuning.trials,
                       tuning_timeout_s=run.recipe.tuning.timeout_s,
                       tuning_dir=run.store.root / "tuning", batch_axis=run.recipe.model.batch_axis, dims=plan.dims,
                       batch_sizes=tuple(plan.batch_sizes), device_present=avail.run)
    with run.store.staging() as tmp:
        files = tmp / "artifact"
        files.mkdir()
        t0 = time.perf_counter()
        with scratch_cwd():  # compilers' scratch files never land in the user's working directory
            meta = {**backend.build(req, files.resolve()), "requires": backend.requires(sku)}
        seconds = round(time.perf_counter() - t0, 3)
        validation = _validate(run, model, backend, files, meta, threads) if avail.run else \
            {"status": "not-run", "reason": avail.reason or why_not}
        art = run.store.put(key, files, {
            **meta, "model": run.recipe.model_name, "model_digest": model.digest, "sku": sku.name,
            "backend": backend.name, "toolchain": backend.toolchain_for(sku), "validation": validation,
            "build_seconds": seconds, "signature": [i.model_dump() for i in model.inputs],
            "outputs": list(model.outputs),
        }, version=(run.recipe.model_name, version))
    return art, False, validation, seconds


def _validate(run: Run, model: Model, backend: Backend, files: Path, meta: dict[str, Any], threads: int) -> dict[str, Any]:
    feed = run.sample_feed(2)
    ref = ingest.run_onnx(model.onnx_path, feed)
    got = backend.load(files, meta, threads)(feed)
    atol, why = _tolerance(backend, model, meta, ref)
    diff = ingest.check_close(ref, got, atol, backend.rtol, f"{backend.name} build")
    return {"status": "passed", "max_abs_diff": diff, "atol": atol, "rtol": backend.rtol,
            **({"reason": why} if why else {})}


# Reduced-precision builds legitimately differ from the reference by rounding: an int8 kernel rounds
# where the reference's QDQ graph computes in float, an fp16 engine rounds every product. Their check
# guards against broken code (wrong layout, missing op), scaled to the outputs; accuracy is judged by
# the evaluation data and the budget, not here.
REDUCED_PRECISION_ATOL = {"int8": 0.05, "float16": 0.01, "bfloat16": 0.02}  # x max |reference output|


def _tolerance(backend: Backend, model: Model, meta: dict[str, Any], ref: dict[str, Any]) -> tuple[float, str]:
    kinds = [k for k in REDUCED_PRECISION_ATOL if k in meta.get("precision", "")]
    if model.is_quantized and "int8" not in kinds:
        kinds.append("int8")
    if not kinds:
        return backend.atol, ""
    frac = max(REDUCED_PRECISION_ATOL[k] for k in kinds)
    scale = max(float(np.max(np.abs(v))) for v in ref.values())
    atol = max(backend.atol, frac * scale)
    return atol, f"{'/'.join(kinds)} build: atol {frac:g} x max|reference| ({scale:.3g})"


def _measure(run: Run, backend: Backend, art: Any, threads: int, reference: dict[str, Any]) -> dict[str, Any]:
    plan = run.recipe.benchmark.model_copy(update={"threads": threads})
    host = detect.host()
    key = key_of({"artifact": art.key, "host": host, "plan": plan.model_dump(), "eval": run.data_key("evaluation"),
                  "memory": MEMORY_METHOD})

    def produce(work: Path) -> dict[str, Any]:
        feeds = {b: run.sample_feed(b) for b in plan.batch_sizes}
        load = lambda: backend.load(art.path, art.meta, threads)  # noqa: E731
        figures = measure(load, feeds, plan)
        modules = list(backend.spec.run_modules)
        figures["peak_memory_bytes"], figures["memory_method"] = peak_memory(
            backend.name, modules, art.path, art.meta, threads, feeds[max(feeds)])
        figures["accuracy"] = _build_accuracy(run, backend.load(art.path, art.meta, threads), reference)
        figures["provenance"] = {"host": host, "libraries": backend.toolchain(), "threads": threads,
                                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        figures.pop("threads"), figures.pop("warmup")
        return figures

    _, meta, hit = run.store.cached_step("measure", key, produce)
    run.log(f"[measure] {art.meta['sku']}/{backend.name}: " + ", ".join(
        f"b{b['batch_size']} p50 {b['p50_ms']:.2f} ms" for b in meta["batches"]) + (" (cached)" if hit else ""))
    return meta


def _build_accuracy(run: Run, runner: Callable, reference: dict[str, Any]) -> dict[str, Any] | None:
    if reference["accuracy"] is None:
        return None
    ref = reference["accuracy"]["value"]
    value = evaluate(run, runner, reference)
    return {"metric": reference["accuracy"]["metric"], "value": value, "reference": ref, "drop": ref - value,
            "within_budget": ref - value <= run.recipe.accuracy.max_drop + 1e-12}


def _choose(cands: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The fastest measured build (geometric mean of p50 over the batch sizes); else the first built."""
    measured = [c for c in cands if c["status"] == "built" and c.get("measurement")]
    if measured:
        best = min(measured, key=lambda c: geomean([b["p50_ms"] for b in c["measurement"]["batches"]]))
        return best, "fastest measured (geometric mean of p50 latency over the benchmark batch sizes)"
    built = [c for c in cands if c["status"] == "built"]
    if built:
        return built[0], "first in the SKU's backend order (not measurable on this machine)"
    return None, "no backend produced a build"


def _cost(sku: SKU, m: dict[str, Any]) -> dict[str, Any] | None:
    if sku.price is None:
        return None
    best = max(m["batches"], key=lambda b: b["throughput_per_s"] or 0)
    if not best["throughput_per_s"]:
        return None
    per_million = sku.price.usd_per_hour / (best["throughput_per_s"] * 3600) * 1e6
    return {"usd_per_million": round(per_million, 6), "usd_per_hour": sku.price.usd_per_hour,
            "throughput_per_s": best["throughput_per_s"], "batch_size": best["batch_size"],
            "price_source": sku.price.source, "price_date": sku.price.date}


def _artifact_ref(art: Any) -> dict[str, Any]:
    files = art.meta["files"]
    return {"key": art.key, "content_digest": art.meta["content_digest"], "path": str(art.path),
            "size_bytes": sum(f["bytes"] for f in files.values()), "files": sorted(files)}
