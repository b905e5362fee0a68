"""The pipeline: recipe -> ingest -> passes -> per SKU: backend -> validate -> measure -> store -> manifest.

Each stage is timed and every result is cached in the store by the content hash of what made it,
so a second run of an unchanged recipe replays from the store in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mlopt import __version__
from mlopt.compiler import ingest
from mlopt.compiler.data import Batches, concat_outputs, load_batches, score
from mlopt.compiler.measure import measure
from mlopt.compiler.model import Model
from mlopt.compiler.passes import CHANGES_OUTPUTS, TORCH_PASSES, PassContext, get_pass
from mlopt.errors import BadInput, BudgetExceeded, MloptError, ValidationMismatch
from mlopt.manifest import Manifest, write_manifest
from mlopt.recipes.load import dump_recipe
from mlopt.recipes.schema import Recipe
from mlopt.store import Store, key_of
from mlopt.targets import detect
from mlopt.targets.backends import Backend, BuildRequest, get_backend, package_version
from mlopt.targets.catalog import SKU, load_catalog

Log = Callable[[str], None]


@dataclass
class BuildResult:
    manifest: Manifest
    manifest_path: Path
    exit_code: int


@dataclass
class Run:
    """State shared by the stages of one build."""

    recipe: Recipe
    store: Store
    log: Log
    stages: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.log(f"[stage] {name}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - t0, 3)

    # -------------------------------------------------------- data, loaded on first use
    def data_key(self, which: str) -> str | None:
        src = getattr(self.recipe.data, which)
        if src is None:
            return None
        h = hashlib.sha256(json.dumps(src.model_dump(mode="json"), sort_keys=True).encode())
        for part in (src.source.rpartition(":")[0] or src.source, getattr(src, "metric", "").rpartition(":")[0]):
            if part and Path(part).is_file():
                h.update(Path(part).read_bytes())
        return h.hexdigest()

    @cached_property
    def evaluation(self) -> Batches | None:
        ev = self.recipe.data.evaluation
        return load_batches(ev, self.inputs) if ev else None

    @cached_property
    def calibration(self) -> Batches | None:
        cal = self.recipe.data.calibration
        return load_batches(cal, self.inputs) if cal else None

    inputs: tuple = ()

    def sample_feed(self, batch: int) -> dict[str, np.ndarray]:
        """A feed of ``batch`` rows: real evaluation rows where shapes allow, else seeded random."""
        plan = self.recipe.benchmark
        shapes = {i.name: i.concrete({**plan.dims, self.recipe.model.batch_axis: batch}) for i in self.inputs}
        if self.evaluation is not None:
            first = self.evaluation.feeds[0]
            if all(first[n].shape[1:] == s[1:] for n, s in shapes.items()):
                reps = math.ceil(batch / len(next(iter(first.values()))))
                return {n: np.ascontiguousarray(np.concatenate([first[n]] * reps)[:batch]) for n in shapes}
        return ingest.random_feed(self.inputs, shapes)


def build(recipe: Recipe, store: Store, log: Log = lambda _: None) -> BuildResult:
    """Run a recipe end to end; write the manifest; return it with the exit code."""
    run = Run(recipe, store, log)
    catalog = load_catalog(recipe.catalog)
    skus = [catalog.get(t) for t in recipe.targets]
    _check_names(recipe)
    out_dir = _output_dir(recipe)
    with run.stage("ingest"):
        model, ingest_cached = _ingest(run)
    run.inputs = model.inputs
    _check_dims(recipe, model)
    with run.stage("reference"):
        reference = _reference(run, model)
    with run.stage("passes"):
        final, pass_reports = _passes(run, model, reference)
    version_key = key_of({"input": model.digest, "passes": [p.model_dump(mode="json") for p in recipe.passes],
                          "mlopt": __version__, "onnx": package_version("onnx")})
    version = store.version_for(recipe.model_name, version_key, {"input_digest": model.digest,
                                                                 "final_digest": final.digest})
    entries, errors, codes = [], [], []
    for sku in skus:
        with run.stage(f"build {sku.name}"):
            entry, sku_errors, code = _build_sku(run, final, sku, version, version_key, reference)
        entries.append(entry)
        errors += sku_errors
        codes.append(code)
    manifest = Manifest(
        mlopt_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        recipe={"name": recipe.name, "digest": hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()},
        host=detect.host(),
        toolchain=_toolchain(),
        store=str(store.root),
        models=[{
            "name": recipe.model_name, "version": version, "source": recipe.model.source,
            "input_digest": model.digest, "final_digest": final.digest,
            "inputs": list(model.inputs), "outputs": list(model.outputs),
            "reference_accuracy": reference["accuracy"], "passes": pass_reports,
        }],
        entries=entries,
        status="failed" if any(codes) else "ok",
        errors=errors,
        stage_seconds=run.stages,
    )
    path = out_dir / "manifest.json"
    write_manifest(manifest, path)
    log(f"[done] manifest written to {path}")
    return BuildResult(manifest, path, max(codes, key=lambda c: (c == 3, c), default=0))


def _check_names(recipe: Recipe) -> None:
    seen_quantize = False
    for step in recipe.passes:
        get_pass(step.kind)
        if step.kind in TORCH_PASSES and recipe.model.kind == "onnx":
            raise BadInput(f"pass {step.kind} trains the PyTorch module, and this recipe's model source is ONNX "
                           f"only ({Path(recipe.model.source).name})",
                           hint="give model.source as a PyTorch factory 'model.py:function' or a .pt2 file")
        if step.kind in TORCH_PASSES and seen_quantize:
            raise BadInput(f"pass {step.kind} must come before quantize (it trains the float PyTorch module)")
        seen_quantize |= step.kind == "quantize"
    for name in recipe.backends or []:
        get_backend(name)  # raises UnknownName listing the backends


def _output_dir(recipe: Recipe) -> Path:
    out = Path(recipe.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mlopt-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"output directory {out} is not writable ({e.strerror or e})", hint="pass --out DIR") from None
    return out


def _check_dims(recipe: Recipe, model: Model) -> None:
    axes = {d for i in model.inputs for d in i.dynamic_axes.values()} - {recipe.model.batch_axis}
    missing = sorted(axes - set(recipe.benchmark.dims))
    if missing:
        raise BadInput(
            f"the model has dynamic axes {missing} besides the batch axis {recipe.model.batch_axis!r}",
            hint="give their sizes in benchmark.dims (for example dims: {seq: 128}) or set model.batch_axis",
        )


# ------------------------------------------------------------------ ingest and reference


def _ingest(run: Run) -> tuple[Model, bool]:
    src, name = run.recipe.model, run.recipe.model_name
    if src.kind == "onnx":
        return ingest.read_onnx(Path(src.source), list(src.inputs), name), False

    def produce(work: Path) -> dict[str, Any]:
        module = ingest.torch_loader(src)()
        run.inputs = tuple(src.inputs)
        sample = run.sample_feed(2)
        model = ingest.export_torch(src, module, work / "model.onnx", name, sample)
        return {"digest": model.digest, "outputs": list(model.outputs)}

    folder, meta, hit = run.store.cached_step("ingest", ingest.source_key(src), produce)
    run.log(f"[ingest] {'cached export' if hit else 'exported'} {src.source} -> ONNX opset {src.opset}")
    model = Model(name=name, onnx_path=folder / "model.onnx", inputs=tuple(src.inputs),
                  outputs=tuple(meta["outputs"]), digest=meta["digest"], module_fn=ingest.torch_loader(src))
    return model, hit


def _reference(run: Run, model: Model) -> dict[str, Any]:
    """The original model's outputs on the evaluation data and its metric (cached)."""
    ev = run.recipe.data.evaluation
    if ev is None:
        return {"accuracy": None, "outputs": None}
    key = key_of({"model": model.digest, "data": run.data_key("evaluation"), "ort": package_version("onnxruntime")})

    def produce(work: Path) -> dict[str, Any]:
        runner = ingest.onnx_runner(model.onnx_path, run.recipe.benchmark.threads)
        outs = concat_outputs([runner(f) for f in run.evaluation.feeds])
        np.savez(work / "outputs.npz", **outs)
        value = score(ev, outs, run.evaluation.labels, outs)
        return {"metric": ev.metric, "value": value, "samples": len(next(iter(outs.values())))}

    folder, meta, _ = run.store.cached_step("reference", key, produce)
    run.log(f"[reference] {meta['metric']} = {meta['value']:.4f} on {meta['samples']} samples")
    outputs = lambda: dict(np.load(folder / "outputs.npz"))  # noqa: E731 - loaded only when scored
    return {"accuracy": meta, "outputs": outputs}


def _evaluate(run: Run, runner: Callable, reference: dict[str, Any]) -> float:
    ev = run.recipe.data.evaluation
    outs = concat_outputs([runner(f) for f in run.evaluation.feeds])
    return score(ev, outs, run.evaluation.labels, reference["outputs"]())


def _onnx_latency(run: Run, path: Path) -> float:
    """ms: geometric mean over the plan's batch sizes of the median of a few ONNX Runtime runs."""
    plan = run.recipe.benchmark
    runner = ingest.onnx_runner(path, plan.threads, optimize=True)
    medians = []
    for b in plan.batch_sizes:
        feed = run.sample_feed(b)
        for _ in range(2):
            runner(feed)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            runner(feed)
            times.append((time.perf_counter() - t0) * 1000)
        medians.append(sorted(times)[3])
    return _geomean(medians)


def _pass_context(run: Run, work: Path, reference: dict[str, Any]) -> PassContext:
    """What passes may use: data, an evaluator and a timer for candidates, an exporter for modules."""
    src = run.recipe.model
    has_eval = reference["accuracy"] is not None

    def export(module: Any, out: Path) -> Model:
        return ingest.export_torch(src, module, out, run.recipe.model_name, run.sample_feed(2))

    return PassContext(
        workdir=work,
        calibration=run.calibration if run.recipe.data.calibration else None,
        evaluate=(lambda p: _evaluate(run, ingest.onnx_runner(p, run.recipe.benchmark.threads, optimize=True),
                                      reference))
        if has_eval else None,
        reference=reference["accuracy"]["value"] if has_eval else None,
        max_drop=run.recipe.accuracy.max_drop,
        latency=lambda p: _onnx_latency(run, p),
        log=run.log,
        export=export if src.kind != "onnx" else None,
    )


# ------------------------------------------------------------------ passes


def _passes(run: Run, model: Model, reference: dict[str, Any]) -> tuple[Model, list[dict[str, Any]]]:
    reports = []
    for step in run.recipe.passes:
        name = step.name or step.kind
        with run.stage(f"pass {name}"):
            model, report = _run_pass(run, model, step, name, reference)
        reports.append(report)
        run.log(f"[pass] {name}: {report['status']} ({report['seconds']:.2f}s)")
    return model, reports


def _run_pass(run: Run, model: Model, step: Any, name: str, reference: dict[str, Any]) -> tuple[Model, dict[str, Any]]:
    budget = run.recipe.accuracy
    key = key_of({"model": model.digest, "step": step.model_dump(mode="json"), "budget": budget.model_dump(),
                  "calibration": run.data_key("calibration"), "evaluation": run.data_key("evaluation"),
                  "versions": _toolchain()})

    if step.kind in TORCH_PASSES and model.module_fn is None:
        raise BadInput(f"pass {name} ({step.kind}) trains the PyTorch module: put it before quantize, "
                       "and give a PyTorch source (model.py:factory or .pt2)")
    produced: dict[str, Any] = {}

    def produce(work: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        new, details = get_pass(step.kind)(model, step, _pass_context(run, work, reference))
        produced["module_fn"] = new.module_fn
        report = {"name": name, "kind": step.kind, "status": "applied", "size_before": model.size_bytes,
                  "size_after": new.size_bytes, "details": details}
        report.update(_gate(run, model, new, step, reference))
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return {"report": report, "digest": new.digest, "file": new.onnx_path.name}

    folder, meta, hit = run.store.cached_step("pass", key, produce)
    report = {**meta["report"], "cached": hit}
    if report["status"] != "applied":
        return model, report
    module_fn = produced.get("module_fn") if not hit else _recompute(run, model, step, reference)
    return model.derive(folder / meta["file"], module_fn=module_fn), report


def _recompute(run: Run, model: Model, step: Any, reference: dict[str, Any]) -> Callable[[], Any] | None:
    """A cached pass's module, rebuilt on demand (only a later training pass that missed the cache asks)."""
    if step.kind == "graph-optimize":
        return model.module_fn
    if step.kind not in TORCH_PASSES:
        return None

    def rebuild() -> Any:
        with run.store.staging() as tmp:
            new, _ = get_pass(step.kind)(model, step, _pass_context(run, tmp, reference))
            return new.module_fn()

    return rebuild


def _gate(run: Run, old: Model, new: Model, step: Any, reference: dict[str, Any]) -> dict[str, Any]:
    """Judge a pass: the accuracy budget for passes that change outputs, numerics for the others."""
    if not CHANGES_OUTPUTS[step.kind]:
        feed = run.sample_feed(2)
        ingest.check_close(ingest.run_onnx(old.onnx_path, feed), ingest.run_onnx(new.onnx_path, feed),
                           1e-4, 1e-3, f"pass {step.kind}")
        return {}
    if reference["accuracy"] is None:
        raise BadInput(f"pass {step.kind} changes outputs, so the recipe needs data.evaluation to judge it")
    ref = reference["accuracy"]["value"]
    # judged as deployed: ONNX Runtime with all its optimizations (int8 fusions change numerics a little)
    after = _evaluate(run, ingest.onnx_runner(new.onnx_path, run.recipe.benchmark.threads, optimize=True), reference)
    drop = ref - after
    out = {"accuracy_before": ref, "accuracy_after": after}
    if drop <= run.recipe.accuracy.max_drop:
        return out
    policy = step.on_violation or run.recipe.accuracy.on_violation
    msg = (f"pass {step.kind} drops {reference['accuracy']['metric']} from {ref:.4f} to {after:.4f} "
           f"(drop {drop:.4f} > budget {run.recipe.accuracy.max_drop})")
    if policy == "fail":
        raise BudgetExceeded(msg, hint="raise accuracy.max_drop, change the pass settings, or set on_violation: skip")
    run.log(f"[pass] {msg}; skipped")
    return {**out, "status": "skipped", "details": {"reason": msg}}


# ------------------------------------------------------------------ per SKU


def _build_sku(run: Run, model: Model, sku: SKU, version: int, version_key: str,
               reference: dict[str, Any]) -> tuple[dict[str, Any], list[str], int]:
    names = [b for b in sku.backends if run.recipe.backends is None or b in run.recipe.backends]
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
        errors.append(f"{sku.name}: none of the recipe's backends {run.recipe.backends} serve this SKU "
                      f"(it supports {sku.backends})")
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
                  "toolchain": backend.toolchain(), "trials": run.recipe.tuning.trials, "threads": threads,
                  "sku": sku.model_dump(include={"name", "arch", "machine", "tvm_target", "dtypes"})})
    cand["compiled"] = avail.build
    try:
        art, cached, validation, seconds = _artifact(run, model, sku, backend, key, threads, avail.run, why_not,
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
        run.log(f"[{sku.name}] {backend.name}: failed: {type(e).__name__}: {e}")
        return {**cand, "status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    run.store.link(run.recipe.model_name, version, art.key)
    cand.update(status="built", reason="" if avail.run else why_not, precision=art.meta["precision"],
                artifact=_artifact_ref(art), validation=validation, build_seconds=seconds, cached=cached,
                details=art.meta.get("details", {}), measurement=None)
    if avail.run:
        with run.stage(f"measure {sku.name}/{backend.name}"):
            cand["measurement"] = _measure(run, backend, art, threads, reference)
    run.log(f"[{sku.name}] {backend.name}: {'cached' if cached else 'built'} {art.short}")
    return cand


def _artifact(run: Run, model: Model, sku: SKU, backend: Backend, key: str, threads: int, runnable: bool,
              why_not: str, version: int) -> tuple[Any, bool, dict[str, Any], float]:
    """The stored artifact for ``key``, building and validating it first on a miss."""
    art = run.store.checked(key)
    if art is not None:
        return art, True, art.meta["validation"], art.meta["build_seconds"]
    plan = run.recipe.benchmark
    req = BuildRequest(model=model, sku=sku, threads=threads, tuning_trials=run.recipe.tuning.trials,
                       tuning_timeout_s=run.recipe.tuning.timeout_s,
                       tuning_dir=run.store.root / "tuning", batch_axis=run.recipe.model.batch_axis, dims=plan.dims,
                       batch_sizes=tuple(plan.batch_sizes))
    with run.store.staging() as tmp:
        files = tmp / "artifact"
        files.mkdir()
        t0 = time.perf_counter()
        meta = backend.build(req, files)
        seconds = round(time.perf_counter() - t0, 3)
        validation = _validate(run, model, backend, files, meta, threads) if runnable else \
            {"status": "not-run", "reason": why_not}
        art = run.store.put(key, files, {
            **meta, "model": run.recipe.model_name, "model_digest": model.digest, "sku": sku.name,
            "backend": backend.name, "toolchain": backend.toolchain(), "validation": validation,
            "build_seconds": seconds, "signature": [i.model_dump() for i in model.inputs],
            "outputs": list(model.outputs),
        }, version=(run.recipe.model_name, version))
    return art, False, validation, seconds


def _validate(run: Run, model: Model, backend: Backend, files: Path, meta: dict[str, Any], threads: int) -> dict[str, Any]:
    feed = run.sample_feed(2)
    ref = ingest.run_onnx(model.onnx_path, feed)
    got = backend.load(files, meta, threads)(feed)
    diff = ingest.check_close(ref, got, backend.atol, backend.rtol, f"{backend.name} build")
    return {"status": "passed", "max_abs_diff": diff, "atol": backend.atol, "rtol": backend.rtol}


def _measure(run: Run, backend: Backend, art: Any, threads: int, reference: dict[str, Any]) -> dict[str, Any]:
    plan = run.recipe.benchmark.model_copy(update={"threads": threads})
    host = detect.host()
    key = key_of({"artifact": art.key, "host": host, "plan": plan.model_dump(), "eval": run.data_key("evaluation")})

    def produce(work: Path) -> dict[str, Any]:
        feeds = {b: run.sample_feed(b) for b in plan.batch_sizes}
        load = lambda: backend.load(art.path, art.meta, threads)  # noqa: E731
        figures = measure(load, feeds, plan)
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
    value = _evaluate(run, runner, reference)
    return {"metric": reference["accuracy"]["metric"], "value": value, "reference": ref, "drop": ref - value,
            "within_budget": ref - value <= run.recipe.accuracy.max_drop + 1e-12}


def _choose(cands: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The fastest measured build (geometric mean of p50 over the batch sizes); else the first built."""
    measured = [c for c in cands if c["status"] == "built" and c.get("measurement")]
    if measured:
        best = min(measured, key=lambda c: _geomean([b["p50_ms"] for b in c["measurement"]["batches"]]))
        return best, "fastest measured (geometric mean of p50 latency over the benchmark batch sizes)"
    built = [c for c in cands if c["status"] == "built"]
    if built:
        return built[0], "first in the SKU's backend order (not measurable on this machine)"
    return None, "no backend produced a build"


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs))


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


def _toolchain() -> dict[str, str]:
    return {p: package_version(p) for p in ("mlopt", "onnx", "onnxruntime", "onnxscript", "torch", "apache-tvm", "numpy")}
