"""The pipeline: recipe -> ingest -> passes -> per SKU: backend -> validate -> measure -> store -> manifest.

Each stage is timed and every result is cached in the store by the content hash of what made it,
so a second run of an unchanged recipe replays from the store in about a second.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlopt import __version__, gates
from mlopt.compiler import ingest, judges
from mlopt.compiler import validate as check
from mlopt.compiler.builds import ImportFailures, build_sku
from mlopt.compiler.data import concat_outputs, score
from mlopt.compiler.feeds import onnx_runner, ort_not_implemented
from mlopt.core.model import Model
from mlopt.passes import PassContext, get_pass
from mlopt.passes.quantize import JUDGED_ON
from mlopt.compiler.publish import publish
from mlopt.core.util import Log
from mlopt.compiler.run import Reference, Run, evaluate, toolchain
from mlopt.core.errors import BackendUnavailable, BadInput, BudgetExceeded, GateFailed, MloptError, severest
from mlopt.manifest import Entry, Manifest, ModelInfo, PassReport, RecipeRef, ReferenceAccuracy, write_manifest
from mlopt.recipes.load import dump_recipe
from mlopt.recipes.schema import Recipe
from mlopt.core.files import key_of
from mlopt.store import Store
from mlopt.targets import detect
from mlopt.targets.backends import get_backend, package_version
from mlopt.targets.catalog import load_catalog


@dataclass
class BuildResult:
    manifest: Manifest
    manifest_path: Path
    exit_code: int
    error: MloptError | None = None  # publishing failed after the build: the caller reports the build, then raises it


def compile(recipe: Recipe, store: Store, log: Log = lambda _: None) -> BuildResult:  # noqa: A001
    """What ``mlopt compile`` runs: build the recipe and, when ``image.push`` asks and the build passed,
    build and push each SKU's image; the manifest is written once, at the end, with the images' digests."""
    return build(recipe, store, log, push=recipe.image.push)


def build(recipe: Recipe, store: Store, log: Log = lambda _: None, push: bool = False) -> BuildResult:
    """Run a recipe end to end (and publish its images when ``push``); write the manifest; return it with
    the exit code."""
    run = Run(recipe, store, log, inputs=tuple(recipe.model.inputs))
    catalog = load_catalog(recipe.catalog)
    skus = detect.resolve_targets(catalog, recipe.targets)
    _check_names(recipe)
    out_dir = _output_dir(recipe)
    # read before the build, so a baseline that cannot be used fails in a second, not after it
    baseline = gates.load_manifest_ref(recipe.gates.baseline) if recipe.gates.baseline else None
    with run.stage("ingest"):
        model, _ = _ingest(run)
    run = run.with_inputs(model.inputs)
    _check_dims(recipe, model)
    _check_batch_memory(recipe, model)
    with run.stage("reference"):
        reference = reference_of(run, model)
    with run.stage("passes"):
        final, pass_reports = _passes(run, model, reference)
    version_key = key_of({"input": model.digest, "passes": [p.model_dump(mode="json") for p in recipe.passes],
                          "mlopt": __version__, "onnx": package_version("onnx")})
    version = store.version_for(recipe.model_name, version_key, {"input_digest": model.digest,
                                                                 "final_digest": final.digest})
    _log_host(skus, log)
    with store.holding(recipe.model_name, version):  # gc keeps this version meanwhile; complete once done
        entries, errors, warnings, codes = _build_skus(run, final, skus, version, version_key, reference)
    manifest = Manifest(
        mlopt_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        recipe=RecipeRef(name=recipe.name, digest=hashlib.sha256(dump_recipe(recipe).encode()).hexdigest(),
                         resolved=recipe.model_dump(mode="json")),
        host=detect.host(),
        toolchain=toolchain(),
        store=str(store.root),
        models=[ModelInfo(name=recipe.model_name, version=version, source=recipe.model.source,
                          input_digest=model.digest, final_digest=final.digest, inputs=list(model.inputs),
                          outputs=list(model.outputs), reference_accuracy=reference.accuracy, passes=pass_reports)],
        entries=entries,
        status="failed" if any(codes) else "ok",
        errors=errors,
        warnings=warnings,
        stage_seconds=run.stages,
    )
    if baseline is not None:
        manifest = gates.attach(manifest, gates.compare(baseline, manifest, gates.limits_for(recipe),
                                                        recipe.gates.baseline))
    return _conclude(recipe, store, manifest, out_dir / "manifest.json", severest(codes), push, log)


def _conclude(recipe: Recipe, store: Store, manifest: Manifest, path: Path, code: int, push: bool,
              log: Log) -> BuildResult:
    """The exit code (a broken gate is 6); the images, when asked and the build passed; then the
    manifest, written once, with the images' digests in it."""
    if manifest.gates is not None and manifest.gates.verdict == "fail":
        code = code or GateFailed.exit_code
    error = None
    try:
        if push and code == 0:
            publish(manifest, recipe, path.parent / "image", store, log)
    except MloptError as e:  # the build stands: its manifest is written, with the images built so far
        error, code = e, e.exit_code
    finally:
        write_manifest(manifest, path)
        log(f"[done] manifest written to {path}")
    return BuildResult(manifest, path, code, error)


def _build_skus(run: Run, final: Model, skus: list[tuple[Any, str | None]], version: int, version_key: str,
                reference: Reference) -> tuple[list[Entry], list[str], list[str], list[int]]:
    """Every SKU's entry (its candidates built, validated and measured), the errors, warnings and exit codes;
    a model a backend cannot import is one warning naming the SKUs it skipped."""
    entries, errors, warnings, codes = [], [], [], []
    imports = ImportFailures()
    for sku, requested_as in skus:
        with run.stage(f"build {sku.name}"):
            entry, sku_errors, sku_warnings, code = build_sku(run, final, sku, version, version_key, reference,
                                                              imports)
        if requested_as:
            entry = entry.model_copy(update={"requested_as": requested_as})
        entries.append(entry)
        errors += sku_errors
        warnings += sku_warnings
        codes.append(code)
    entries, unvalidated = _withhold_unvalidated(entries, codes)
    return entries, errors + unvalidated, imports.warnings() + warnings, codes + [3] * bool(unvalidated)


def _withhold_unvalidated(entries: list[Entry], codes: list[int]) -> tuple[list[Entry], list[str]]:
    """Where every build this machine ran failed validation on some SKU (the graph's numerics, not one
    backend), no SKU ships that graph unvalidated: a cross-compiled or on-device build is not chosen."""
    broken = [e.sku for e, code in zip(entries, codes) if code == 3 and any(c.validation for c in e.candidates)]
    if not broken:
        return entries, []
    out, errors = [], []
    for e in entries:
        chosen = next((c for c in e.candidates if c.backend == e.chosen_backend), None)
        if chosen is None or (chosen.validation is not None and chosen.validation.status == "passed"):
            out.append(e)
            continue
        why = (f"not chosen: every build of this graph that ran here ({', '.join(broken)}) failed validation, "
               f"so its {e.chosen_backend} build for {e.sku} would ship unvalidated")
        errors.append(f"{e.sku}: {why}")
        out.append(e.model_copy(update={"chosen_backend": None, "chosen_by": why, "artifact": None, "precision": None,
                                        "measurement": None, "cost": None, "choice": None}))
    return out, errors


def _log_host(skus: list[tuple[Any, str | None]], log: Log) -> None:
    host = detect.host()
    for sku, requested_as in skus:
        if requested_as == detect.HOST_TARGET:
            override = f" (MLOPT_CPU_FLAGS={host['cpu_flags_override']})" if "cpu_flags_override" in host else ""
            log(f"[host] target 'host' is {sku.name} on this machine{override}: {host['cpu']}")


def _check_names(recipe: Recipe) -> None:
    # pass kinds and their order are checked when the recipe loads (mlopt.recipes.schema.Recipe)
    for name in recipe.all_backends():
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


def _check_batch_memory(recipe: Recipe, model: Model) -> None:
    """Refuse a benchmark batch whose inputs alone outgrow this machine's memory, before any work starts."""
    plan = recipe.benchmark
    batch = max(plan.batch_sizes)
    one = {**plan.largest, recipe.model.batch_axis: 1}
    per_sample = sum(int(np.prod(i.concrete(one))) * np.dtype(i.dtype if i.dtype != "bfloat16" else "float32").itemsize
                     for i in model.inputs)
    memory = machine_memory()
    if memory and per_sample * batch > memory:
        raise BadInput(
            f"benchmark batch size {batch} needs about {_gib(per_sample * batch)} of inputs ({per_sample} bytes a "
            f"sample x {batch}), more than this machine's memory ({_gib(memory)})",
            hint=f"use benchmark.batch_sizes (or --batch-sizes) of at most {max(1, memory // max(per_sample, 1))}",
        )


def machine_memory() -> int | None:
    """Bytes of memory: MemAvailable from /proc/meminfo, else physical pages from os.sysconf; None if unknown."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


# ------------------------------------------------------------------ ingest and reference


def _ingest(run: Run) -> tuple[Model, bool]:
    src, name = run.recipe.model, run.recipe.model_name
    if src.kind == "onnx":
        return ingest.read_onnx(Path(src.source), list(src.inputs), name), False

    def produce(work: Path) -> dict[str, Any]:
        module = ingest.torch_loader(src)()
        sample = run.sample_feed(2)  # run.inputs are the declared ones (a PyTorch source declares them)
        model = ingest.export_torch(src, module, work / "model.onnx", name, sample)
        return {"digest": model.digest, "outputs": list(model.outputs)}

    folder, meta, hit = run.store.cached_step("ingest", ingest.source_key(src), produce)
    run.log(f"[ingest] {'cached export' if hit else 'exported'} {src.source} -> ONNX opset {src.opset}")
    model = Model(name=name, onnx_path=folder / "model.onnx", inputs=tuple(src.inputs),
                  outputs=tuple(meta["outputs"]), digest=meta["digest"], module_fn=ingest.torch_loader(src))
    return model, hit


def reference_key(run: Run, model_digest: str) -> str:
    """The store key of the reference step of the model ``model_digest`` on the run's evaluation data."""
    return key_of({"model": model_digest, "data": run.data_key("evaluation"), "ort": package_version("onnxruntime")})


def stored_reference(folder: Path, meta: dict[str, Any]) -> Reference:
    """The reference a step folder of the store holds (its outputs loaded only when scored)."""
    outputs = lambda: dict(np.load(folder / "outputs.npz"))  # noqa: E731 - loaded only when scored
    return Reference(accuracy=ReferenceAccuracy.model_validate(meta), outputs=outputs)


def reference_of(run: Run, model: Model) -> Reference:
    """The original model's outputs on the evaluation data and its metric (cached)."""
    ev = run.recipe.data.evaluation
    if ev is None:
        return Reference()
    key = reference_key(run, model.digest)

    def produce(work: Path) -> dict[str, Any]:
        runner = onnx_runner(model.onnx_path, run.recipe.benchmark.threads)
        outs = concat_outputs([runner(f) for f in run.evaluation.feeds])
        np.savez(work / "outputs.npz", **outs)
        value = score(ev, outs, run.evaluation.labels, outs)
        return {"metric": ev.metric, "value": value, "samples": len(next(iter(outs.values())))}

    folder, meta, _ = run.store.cached_step("reference", key, produce)
    run.log(f"[reference] {meta['metric']} = {meta['value']:.4f} on {meta['samples']} samples")
    return stored_reference(folder, meta)


def _pass_context(run: Run, work: Path, reference: Reference, original: Callable[[], Any] | None) -> PassContext:
    """What passes may use: data, a judge per CPU backend for candidates, an exporter for modules, and the
    module as ingested (``original``: a teacher for a distillation after pruning)."""
    src = run.recipe.model
    has_eval = reference.accuracy is not None

    def export(module: Any, out: Path, atol: float | None = None, torchscript: bool = False) -> Model:
        return ingest.export_torch(src, module, out, run.recipe.model_name, run.sample_feed(2), atol, torchscript)

    return PassContext(
        workdir=work,
        calibration=run.calibration if run.recipe.data.calibration else None,
        judges=judges.judges(run, reference, judges.judge_backends(run)) if has_eval else {},
        evaluation=run.evaluation if has_eval else None,
        evaluate=(lambda p: evaluate(run, onnx_runner(p, run.recipe.benchmark.threads, optimize=True), reference))
        if has_eval else None,
        reference=reference.accuracy.value if reference.accuracy is not None else None,
        max_drop=run.recipe.accuracy.max_drop,
        log=run.log,
        export=export if src.kind != "onnx" else None,
        original=original,
    )


# ------------------------------------------------------------------ passes


def _passes(run: Run, model: Model, reference: Reference) -> tuple[Model, list[PassReport]]:
    reports, original = [], model.module_fn
    accuracy_in = reference.accuracy.value if reference.accuracy is not None else None
    for step in run.recipe.passes:
        name = step.name or step.kind
        with run.stage(f"pass {name}"):
            model, report = _run_pass(run, model, step, name, reference, original, accuracy_in)
        reports.append(PassReport.model_validate(report))
        if report["status"] == "applied" and report.get("accuracy_after") is not None:
            accuracy_in = report["accuracy_after"]
        run.log(f"[pass] {name}: {report['status']} ({report['seconds']:.2f}s)")
    for line in step_table(reports):
        run.log(line)
    return model, reports


def step_table(reports: list[PassReport]) -> list[str]:
    """Every pass that changes outputs, in order: its accuracy and quick latency on the backend it was judged
    on, beside its input's, so a chain (prune -> distill -> quantize) shows what each step bought."""
    rows = [r for r in reports if r.latency_ms_after is not None]
    if not rows:
        return []
    out = ["[passes] step             status    accuracy   ms before -> after   speedup   judged on"]
    for r in rows:
        assert r.latency_ms_before is not None and r.latency_ms_after is not None
        out.append(f"[passes] {r.name[:16]:<16} {r.status:<9} {r.accuracy_after:>8.4f}   {r.latency_ms_before:>9.3f} -> "
                   f"{r.latency_ms_after:<8.3f} {r.latency_ms_before / max(r.latency_ms_after, 1e-9):>6.2f}x   {r.judged_on}")
    return out


def _run_pass(run: Run, model: Model, step: Any, name: str, reference: Reference,
              original: Callable[[], Any] | None, accuracy_in: float | None) -> tuple[Model, dict[str, Any]]:
    budget = run.recipe.accuracy
    key = key_of({"model": model.digest, "step": step.model_dump(mode="json"), "budget": budget.model_dump(),
                  "calibration": run.data_key("calibration"), "evaluation": run.data_key("evaluation"),
                  "versions": toolchain(), "judges": judges.judge_versions(judges.judge_backends(run))})
    produced: dict[str, Any] = {}

    def produce(work: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        new, details = get_pass(step.kind)(model, step, _pass_context(run, work, reference, original))
        produced["module_fn"] = new.module_fn
        report = {"name": name, "kind": step.kind, "status": "applied", "size_before": model.size_bytes,
                  "size_after": new.size_bytes, "details": details}
        verdict = _gate(run, model, new, step, reference, details.get(JUDGED_ON, judges.REFERENCE_JUDGE), accuracy_in)
        reason = verdict.pop("skip_reason", None)
        report.update(verdict)
        if reason:  # keep what the pass found (a search's candidates) beside why it was skipped
            report["details"] = {**details, "skipped_because": reason}
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return {"report": report, "digest": new.digest, "file": new.onnx_path.name}

    folder, meta, hit = run.store.cached_step("pass", key, produce)
    report = {**meta["report"], "cached": hit}
    if report["status"] != "applied":
        return model, report
    module_fn = produced.get("module_fn") if not hit else _recompute(run, model, step, reference, original)
    # cached_step re-hashed the step's files against their record: the stored digest is the file's
    return model.derive(folder / meta["file"], module_fn=module_fn, digest=meta["digest"] if hit else None), report


def _recompute(run: Run, model: Model, step: Any, reference: Reference,
               original: Callable[[], Any] | None) -> Callable[[], Any] | None:
    """A cached pass's module, rebuilt on demand (only a later training pass that missed the cache asks)."""
    spec = get_pass(step.kind)
    if spec.keeps_module and not spec.trains_module:  # the module still describes the result
        return model.module_fn
    if not spec.keeps_module:
        return None

    def rebuild() -> Any:
        with run.store.staging() as tmp:
            new, _ = spec(model, step, _pass_context(run, tmp, reference, original))
            return new.module_fn()

    return rebuild


def _gate(run: Run, old: Model, new: Model, step: Any, reference: Reference, backend: str,
          accuracy_in: float | None) -> dict[str, Any]:
    """Judge a pass: the accuracy budget for passes that change outputs (on ``backend``, the one a search
    chose the output on), numerics for the others. ``accuracy_in`` is the metric of the pass's input (the
    last applied pass's accuracy, or the reference's)."""
    if not get_pass(step.kind).changes_outputs:
        check.check_pass(step.kind, old.onnx_path, new.onnx_path, run.sample_feed(2))
        return {}
    if reference.accuracy is None:
        raise BadInput(f"pass {step.kind} changes outputs, so the recipe needs data.evaluation to judge it")
    ref = reference.accuracy.value
    after, new_runner = _judged(run, new, step, reference, backend)
    drop = ref - after
    old_runner = judges.judged_runner(backend, old.onnx_path, run.recipe.benchmark.threads)
    fast_before, fast_after = judges.paired_latency(run, old_runner, new_runner)
    out = {"accuracy_before": ref, "accuracy_after": after, "judged_on": backend,
           "latency_ms_before": round(fast_before, 4), "latency_ms_after": round(fast_after, 4)}
    if drop <= run.recipe.accuracy.max_drop:
        raised = accuracy_in is not None and after > accuracy_in
        return {**out, **_speed_gate(run, step, fast_before, fast_after, backend, raised)}
    policy = step.on_violation or run.recipe.accuracy.on_violation
    msg = (f"pass {step.kind} drops {reference.accuracy.metric} from {ref:.4f} to {after:.4f} "
           f"(drop {drop:.4f} > budget {run.recipe.accuracy.max_drop})")
    if policy == "fail":
        raise BudgetExceeded(msg, hint="raise accuracy.max_drop, change the pass settings, or set on_violation: skip")
    run.log(f"[pass] {msg}; skipped")
    return {**out, "status": "skipped", "skip_reason": msg}


def _speed_gate(run: Run, step: Any, before: float, after: float, backend: str, raised: bool) -> dict[str, Any]:
    """With ``accuracy.min_speedup``, a pass inside the budget that does not make the model that much faster
    is skipped (whatever on_violation says: a pass that does not pay is not an error), unless it ``raised``
    the accuracy of its input: distillation that wins back what an earlier step cost is kept at equal speed."""
    need = run.recipe.accuracy.min_speedup
    if need is None or before >= need * after or raised:
        return {}
    msg = (f"pass {step.kind} keeps accuracy but does not pay: {before:.3f} -> {after:.3f} ms on {backend} "
           f"({before / after:.2f}x, accuracy.min_speedup {need})")
    run.log(f"[pass] {msg}; skipped")
    return {"status": "skipped", "skip_reason": msg}


def _judged(run: Run, new: Model, step: Any, reference: Reference, backend: str) -> tuple[float, Any]:
    """The pass's model judged as deployed: its metric on ``backend``, and its runner (ONNX Runtime unless a
    search chose another) with all its optimizations (int8 fusions change numerics a little); a model ONNX
    Runtime has no kernels for (a bf16 Gemm on the CPU provider) cannot be judged here."""
    try:
        runner = judges.judged_runner(backend, new.onnx_path, run.recipe.benchmark.threads)
        return evaluate(run, runner, reference), runner
    except ort_not_implemented() as e:
        raise BackendUnavailable(
            f"pass {step.kind} made a model ONNX Runtime's CPU provider cannot run here "
            f"({str(e).splitlines()[0][:160]}), so its accuracy cannot be judged on this machine",
            hint="fp16/bf16 models are for SKUs whose runtime has those kernels (GPU SKUs)") from None
