"""Per SKU: each backend builds, the build is validated, stored and measured; the fastest is chosen.

Typed stages: ``Model`` -> ``BuildMeta`` (the stored artifact) -> ``Validation`` -> ``Measurement``
-> ``Candidate`` -> ``Entry`` (the manifest's entry for the SKU).
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Literal

import numpy as np

from mlopt.compiler import validate as check
from mlopt.compiler.measure import MEMORY_METHOD, NOISY_SPREAD, interleaved, measure, peak_memory
from mlopt.compiler.run import Reference, Run, evaluate_outputs, geomean
from mlopt.core.artifact import BuildInfo, BuildOutput, Validation
from mlopt.core.errors import MloptError, ModelImportFailed, ValidationMismatch, disk_full
from mlopt.core.files import key_of
from mlopt.core.model import Model
from mlopt.core.util import scratch_cwd
from mlopt.manifest import Accuracy, ArtifactRef, Candidate, Choice, Cost, Entry, Measurement, Provenance
from mlopt.store import Artifact
from mlopt.targets import detect
from mlopt.targets.backends import Availability, Backend, BuildRequest, get_backend
from mlopt.targets.catalog import SKU


@dataclass(frozen=True)
class Target:
    """One backend's attempt at one SKU: what ``_candidate`` and its helpers share."""

    run: Run
    model: Model
    sku: SKU
    backend: Backend
    version: int
    avail: Availability
    why_not: str  # why this machine cannot run the SKU's code ("" when it can)
    threads: int
    imports: ImportFailures | None = None  # the run's memo of model imports that failed (once per model)


@dataclass(frozen=True)
class ImportFailure:
    """A backend's frontend could not import the model: the error, and the SKUs it skipped."""

    backend: str
    error: ModelImportFailed
    skus: list[str] = field(default_factory=list)


@dataclass
class ImportFailures:
    """Model imports that failed in one build, by (backend, model, shapes): an import does not depend on
    the SKU, so it is tried once and every later SKU of that backend is skipped with a pointer to it;
    the failure is one warning for the model (``warnings``), not one per SKU."""

    found: dict[str, ImportFailure] = field(default_factory=dict)

    @staticmethod
    def key(t: Target) -> str:
        recipe = t.run.recipe
        return key_of({"backend": t.backend.name, "model": t.model.digest, "toolchain": t.backend.toolchain(),
                       "dims": recipe.benchmark.sizes, "batch_axis": recipe.model.batch_axis,
                       "batch_sizes": t.run.batch_sizes})

    def warnings(self) -> list[str]:
        """One line per failed import: what failed, the SKUs it skipped, and what to do."""
        return [f"{f.error.message}; skipped on SKUs {', '.join(f.skus)}" + (f" ({f.error.hint})" if f.error.hint else "")
                for f in self.found.values()]

    def skipped(self, sku_name: str) -> set[str]:
        """The backends whose failed import skipped ``sku_name``."""
        return {f.backend for f in self.found.values() if sku_name in f.skus}


def import_pointer(backend: str) -> str:
    """A candidate's reason when the model import failed: the failure itself is in the manifest's warnings."""
    return f"{backend} cannot import this model (reported once for every SKU in the manifest's warnings)"


def build_sku(run: Run, model: Model, sku: SKU, version: int, version_key: str, reference: Reference,
              imports: ImportFailures | None = None) -> tuple[Entry, list[str], list[str], int]:
    """The SKU's entry (each allowed backend's candidate built, validated, measured; one chosen), its
    errors, its warnings and its exit code (``sku_outcome``). A model import that failed (``imports``,
    shared by the run's SKUs) is not tried again, and is the run's warning, not this SKU's."""
    allowed = run.recipe.backends_for(sku.name, sku.kind)
    names = [b for b in sku.backends if allowed is None or b in allowed]
    runs_here, why_not = detect.host_runs(sku)
    candidates: list[Candidate] = []
    targets: dict[str, Target] = {}
    for name in names:
        backend = get_backend(name)
        t = targets[name] = Target(run, model, sku, backend, version, backend.availability(sku, runs_here),
                                   why_not, sku.threads or run.recipe.benchmark.threads, imports)
        candidates.append(_candidate(t, version_key, reference))
    chosen, chosen_by, choice = choose(
        candidates, lambda a, b: interleave_builds(run, [targets[a.backend], targets[b.backend]], [a, b]))
    entry = _entry(run, sku, version, chosen, chosen_by, candidates).model_copy(update={"choice": choice})
    reported = imports.skipped(sku.name) if imports is not None else set()
    errors, warnings, code = sku_outcome(sku.name, candidates, chosen, reported)
    if chosen is None and not names:
        errors.append(f"{sku.name}: none of the recipe's backends {allowed} serve this SKU "
                      f"(it supports {sku.backends})")
    elif chosen is None and not errors:
        errors.append(f"{sku.name}: no backend can build for it here, and none has an on-device (JIT) path: "
                      + "; ".join(f"{c.backend}: {c.reason}" for c in candidates))
    return entry, errors, warnings, code


def sku_outcome(sku_name: str, candidates: list[Candidate], chosen: Candidate | None,
                reported: Collection[str] = ()) -> tuple[list[str], list[str], int]:
    """One rule for every SKU: with a chosen build (validated here, or built for a SKU this machine cannot
    run) the SKU is fine and its failed candidates are warnings, with their full reasons (except the
    ``reported`` backends', whose failed model import is one warning for the whole run); without one they
    are errors, and the exit code is 3 where a build failed validation (numerics), else 4 (toolchain)."""
    failed = [f"{sku_name}/{c.backend}: {c.reason}" for c in candidates if c.status == "failed"]
    if chosen is not None:
        return [], [f"{sku_name}/{c.backend}: {c.reason}" for c in candidates
                    if c.status == "failed" and c.backend not in reported], 0
    numerics = any(c.validation is not None and c.validation.status == "failed" for c in candidates)
    return failed, [], 3 if numerics else 4


def _entry(run: Run, sku: SKU, version: int, chosen: Candidate | None, chosen_by: str,
           candidates: list[Candidate]) -> Entry:
    m = chosen.measurement if chosen else None
    return Entry(model=run.recipe.model_name, version=version, sku=sku.name, sku_kind=sku.kind,
                 chosen_backend=chosen.backend if chosen else None, chosen_by=chosen_by,
                 artifact=chosen.artifact if chosen else None, precision=chosen.precision if chosen else None,
                 measurement=m, cost=cost_of(sku, m) if m else None, candidates=candidates)


def _candidate(t: Target, version_key: str, reference: Reference) -> Candidate:
    name, sku = t.backend.name, t.sku
    if t.avail.build == "no":
        t.run.log(f"[{sku.name}] {name}: unavailable ({t.avail.reason})")
        return Candidate(backend=name, status="unavailable", reason=t.avail.reason)
    key = key_of({"version": version_key, "model": t.model.digest, "backend": name,
                  "toolchain": t.backend.toolchain_for(sku), "trials": t.run.recipe.tuning.trials,
                  "threads": t.threads, "requires": t.backend.requires(sku),
                  # what the code is built for, not the SKU's name: SKUs of one architecture share builds
                  "sku": sku.model_dump(include={"kind", "vendor", "arch", "machine", "tvm_target", "dtypes",
                                                 "onnxruntime_providers", "openvino_device"})})
    known = t.imports.found.get(ImportFailures.key(t)) if t.imports is not None else None
    if known is not None:  # the same graph and shapes failed to import for an earlier SKU
        known.skus.append(sku.name)
        t.run.log(f"[{sku.name}] {name}: skipped, {import_pointer(name)}")
        return Candidate(backend=name, status="failed", compiled=t.avail.build, reason=import_pointer(name))
    failure_key = _failure_key(t, key)
    failure = t.run.store.lookup_step(VALIDATION_FAILED, failure_key)
    if failure is not None:  # this very build failed validation before: its numerics have not changed since
        t.run.log(f"[{sku.name}] {name}: FAILED validation (cached): {failure['reason']}")
        return Candidate(backend=name, status="failed", compiled=t.avail.build, reason=failure["reason"],
                         validation=Validation.model_validate(failure["validation"]), cached=True)
    try:
        art, cached, validation, seconds = _artifact(t, key)
    except ModelImportFailed as e:
        return _import_failed(t, e)
    except ValidationMismatch as e:  # deterministic: remembered, so a cached rebuild does not build it again
        t.run.store.record_step(VALIDATION_FAILED, failure_key, {"reason": str(e),
                                                         "validation": check.failed(e).model_dump(mode="json")})
        return _failed(t, e)
    except Exception as e:
        return _failed(t, e)
    t.run.store.link(t.run.recipe.model_name, t.version, art.key)
    measurement = None
    if t.avail.run:
        with t.run.stage(f"measure {sku.name}/{name}"):
            measurement = measure_build(t, art, reference)
    t.run.log(f"[{sku.name}] {name}: {'cached' if cached else 'built'} {art.short}")
    return Candidate(backend=name, status="built", compiled=t.avail.build,
                     reason="" if t.avail.run else _not_run(t.avail.reason, t.why_not),
                     precision=art.build.precision, artifact=_artifact_ref(art), validation=validation,
                     build_seconds=seconds, cached=cached, details=art.build.details, measurement=measurement)


VALIDATION_FAILED = "validation-failed"  # store steps: builds whose outputs broke the tolerance, by build key


def _failure_key(t: Target, build_key: str) -> str:
    """A validation verdict's key: the build's, the backend's tolerance, and what the sample it was validated
    on is drawn from (the evaluation data's key and the plan's sizes; loading the data itself would cost a
    cached rebuild seconds)."""
    tolerance = {"base": check.TOLERANCES.get(t.backend.name, check.DEFAULT).model_dump(mode="json"),
                 "reduced_atol": check.REDUCED_PRECISION_ATOL, "reduced_rel_l2": check.REDUCED_PRECISION_REL_L2,
                 "outlier": check.OUTLIER}
    recipe = t.run.recipe
    return key_of({"build": build_key, "tolerance": tolerance, "evaluation": t.run.data_key("evaluation"),
                   "sizes": recipe.benchmark.sizes, "batch_axis": recipe.model.batch_axis})


def _import_failed(t: Target, e: ModelImportFailed) -> Candidate:
    """The model's import failed: logged in full once, remembered for the other SKUs (``ImportFailures``)."""
    name = t.backend.name
    if t.imports is None:
        return _failed(t, e)
    t.imports.found[ImportFailures.key(t)] = ImportFailure(name, e, [t.sku.name])
    t.run.log(f"[{t.sku.name}] {name}: failed: {e}; the other {name} SKUs skip it")
    return Candidate(backend=name, status="failed", compiled=t.avail.build, reason=import_pointer(name))


def _failed(t: Target, e: Exception) -> Candidate:
    """A candidate whose build or validation failed; a full disk stops the whole build instead."""
    where, compiled = f"[{t.sku.name}] {t.backend.name}", t.avail.build
    if isinstance(e, ValidationMismatch):
        t.run.log(f"{where}: FAILED validation: {e}")
        return Candidate(backend=t.backend.name, status="failed", compiled=compiled, reason=str(e),
                         validation=check.failed(e))
    if isinstance(e, MloptError):
        t.run.log(f"{where}: failed: {e}")
        return Candidate(backend=t.backend.name, status="failed", compiled=compiled, reason=str(e))
    # a compiler's own error (TVM, ORT): recorded per candidate, others go on
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        raise disk_full(e) from e  # a full disk would fail every candidate after this one: stop here
    t.run.log(f"{where}: failed: {type(e).__name__}: {e}")
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return Candidate(backend=t.backend.name, status="failed", compiled=compiled,
                     reason=f"{type(e).__name__}: {first}")


def _not_run(how: str, why: str) -> str:
    """Why a build was not run here, then what it is: 'cpu-x86-64-v4 code needs avx512f ...; built, not measured'."""
    return "; ".join(dict.fromkeys(x for x in (why, how) if x))


def _artifact(t: Target, key: str) -> tuple[Artifact, bool, Validation, float]:
    """The stored artifact for ``key``, building and validating it first on a miss."""
    art = t.run.store.reusable(key)  # a damaged one is rebuilt here, never replaced by another backend
    if art is not None:
        validation = art.build.validation
        if validation.status == "not-run" and t.avail.run:  # stored by a machine that could not run it
            validation = validate_build(t, art.path, art.meta)
        return art, True, validation, art.build.build_seconds
    with t.run.store.staging() as tmp:
        files = tmp / "artifact"
        files.mkdir()
        t0 = time.perf_counter()
        with scratch_cwd():  # compilers' scratch files never land in the user's working directory
            out = BuildOutput.model_validate(t.backend.build(_request(t), files.resolve()))
        seconds = round(time.perf_counter() - t0, 3)
        loaded = {**out.model_dump(exclude_unset=True), "requires": t.backend.requires(t.sku)}
        validation = validate_build(t, files, loaded) if t.avail.run else check.not_run(t.avail.reason or t.why_not)
        art = t.run.store.put(key, files, _info(t, out, validation, seconds),
                              version=(t.run.recipe.model_name, t.version))
    return art, False, validation, seconds


def _request(t: Target) -> BuildRequest:
    recipe = t.run.recipe
    return BuildRequest(model=t.model, sku=t.sku, threads=t.threads, tuning_trials=recipe.tuning.trials,
                        tuning_timeout_s=recipe.tuning.timeout_s, tuning_dir=t.run.store.root / "tuning",
                        batch_axis=recipe.model.batch_axis, dims=recipe.benchmark.sizes,
                        ranges=recipe.benchmark.ranges,
                        batch_sizes=tuple(t.run.batch_sizes), device_present=t.avail.run)


def _info(t: Target, out: BuildOutput, validation: Validation, seconds: float) -> BuildInfo:
    """What artifact.json records besides the file digests: the backend's output and what made it."""
    return BuildInfo(**out.model_dump(exclude_unset=True), requires=t.backend.requires(t.sku),
                     model=t.run.recipe.model_name, model_digest=t.model.digest, sku=t.sku.name,
                     backend=t.backend.name, toolchain=t.backend.toolchain_for(t.sku), validation=validation,
                     build_seconds=seconds, signature=[i.model_dump() for i in t.model.inputs],
                     outputs=list(t.model.outputs))


def validate_build(t: Target, files: Path, meta: dict[str, Any]) -> Validation:
    """The build in ``files`` against the reference run of the model, on the recipe's sample feed."""
    feed = t.run.sample_feed(2)
    return check.validate(t.backend.load(files, meta, t.threads), t.model, feed, t.backend.name,
                          meta.get("precision", ""))


MeasuredBy = Literal["mlopt compile", "mlopt measure"]


def measure_build(t: Target, art: Artifact, reference: Reference, by: MeasuredBy = "mlopt compile",
                  fresh: bool = False) -> Measurement:
    """Time ``art`` on this machine with the recipe's benchmark plan (cached by artifact, host and plan;
    ``fresh`` measures again and replaces the cached figures). ``by`` names the command in the provenance."""
    run, backend, threads = t.run, t.backend, t.threads
    plan = run.recipe.benchmark.model_copy(update={"threads": threads, "batch_sizes": run.batch_sizes})
    host = detect.host()
    key = key_of({"artifact": art.key, "host": host, "plan": plan.model_dump(), "eval": run.data_key("evaluation"),
                  "memory": MEMORY_METHOD})

    def produce(work: Path | None = None) -> dict[str, Any]:
        feeds = {b: run.sample_feed(b) for b in plan.batch_sizes}
        figures = measure(lambda: backend.load(art.path, art.meta, threads), feeds, plan)
        modules = list(backend.spec.run_modules)
        peak, method = peak_memory(backend.name, modules, art.path, art.meta, threads, feeds[max(feeds)])
        accuracy = _build_accuracy(run, backend.load(art.path, art.meta, threads), reference)
        provenance = Provenance(host=host, libraries=backend.toolchain(), threads=threads,
                                measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), measured_by=by)
        return Measurement(provenance=provenance, batches=figures["batches"], peak_memory_bytes=peak,
                           memory_method=method, noisy=figures["noisy"], accuracy=accuracy
                           ).model_dump(mode="json", exclude_unset=True)

    if fresh:
        meta, hit = produce(), False
        run.store.record_step("measure", key, meta)
    else:
        _, meta, hit = run.store.cached_step("measure", key, produce)
    m = Measurement.model_validate(meta)
    run.log(f"[measure] {art.build.sku}/{backend.name}: " + ", ".join(
        f"b{b.batch_size} p50 {b.p50_ms:.2f} ms" for b in m.batches) + (" (cached)" if hit else ""))
    return m


def _build_accuracy(run: Run, runner: Callable, reference: Reference) -> Accuracy | None:
    if reference.accuracy is None:
        return None
    ref = reference.accuracy.value
    value, per_output = evaluate_outputs(run, runner, reference)
    return Accuracy(metric=reference.accuracy.metric, value=value, reference=ref, drop=ref - value,
                    within_budget=ref - value <= run.recipe.accuracy.max_drop + 1e-12,
                    **({"per_output": per_output} if per_output else {}))


FASTEST = "fastest measured (geometric mean of p50 latency over the benchmark batch sizes)"
TIE_RATIO = 1.03  # interleaved: closer than this is a tie
TIE_CONFIDENCE = 0.75  # interleaved: a faster build that wins fewer rounds than this is a tie
Rounds = dict[int, list[dict[str, float]]]  # per batch size, per round: backend -> block median ms
Interleave = Callable[[Candidate, Candidate], Rounds]


def choose(cands: list[Candidate], interleave: Interleave | None = None
           ) -> tuple[Candidate | None, str, Choice | None]:
    """The fastest measured build (geometric mean of p50 over the batch sizes); else the first built.

    Where the two fastest are noisy or within each other's noise band and ``interleave`` is given, they
    are timed again in alternating blocks, and that decides; a tie goes to the first in ``cands`` (the
    SKU's backend order). Returns the build, how it was chosen (a sentence) and the record of it."""
    measured = [c for c in cands if c.status == "built" and c.measurement]
    if measured:
        return _fastest(cands, sorted(measured, key=latency_of), interleave)
    built = [c for c in cands if c.status == "built"]
    if built:
        return built[0], "first in the SKU's backend order (not measurable on this machine)", None
    return None, "no backend produced a build", None


def latency_of(c: Candidate) -> float:
    """ms: geometric mean over the batch sizes of a measured build's p50."""
    return geomean([b.p50_ms for b in c.measurement.batches])  # type: ignore[union-attr]


def _spread(c: Candidate) -> float:
    return max((b.spread for b in c.measurement.batches), default=0.0)  # type: ignore[union-attr]


def _fastest(cands: list[Candidate], ranked: list[Candidate], interleave: Interleave | None
             ) -> tuple[Candidate, str, Choice]:
    a = ranked[0]
    if len(ranked) == 1:
        return a, FASTEST, Choice(method="fastest", runner_up=None, ratio=None, confidence=None, tie=False,
                                  reason="the only measured build")
    b = ranked[1]
    ratio = latency_of(b) / latency_of(a)
    doubt = _doubt(a, b, ratio)
    rounds, why = None, f"{doubt}; not re-measured here"
    if doubt and interleave is not None:
        try:
            rounds = interleave(a, b)
        except MloptError as e:  # a build that cannot be loaded again: the first figures decide, and say so
            why = f"{doubt}; the interleaved re-measure failed ({e})"
    if rounds is not None:
        return _decide(cands, a, b, rounds, doubt)
    if not doubt:
        why = f"{ratio:.3f}x ahead of {b.backend}, beyond both builds' noise (spread at most {max(_spread(a), _spread(b)):.3f})"
    return a, FASTEST, Choice(method="fastest", runner_up=b.backend, ratio=round(ratio, 4), confidence=None,
                              tie=False, reason=why)


def _doubt(a: Candidate, b: Candidate, ratio: float) -> str:
    """Why the first figures cannot tell the two fastest apart ("" when they can)."""
    noisy = [c.backend for c in (a, b) if c.measurement.noisy]  # type: ignore[union-attr]
    band = max(_spread(a), _spread(b))
    if noisy:
        return f"{' and '.join(noisy)} timings noisy (spread up to {band:.3f} > {NOISY_SPREAD})"
    if ratio - 1 <= band:
        return f"{a.backend} and {b.backend} within each other's noise band ({ratio:.3f}x apart, spread up to {band:.3f})"
    return ""


def _decide(cands: list[Candidate], a: Candidate, b: Candidate, rounds: Rounds, doubt: str
            ) -> tuple[Candidate, str, Choice]:
    """The interleaved rounds' verdict: per batch size the median of b/a over the rounds, their geometric
    mean, and the share of rounds the faster one won; a tie goes to the first in the SKU's backend order."""
    pairs = [r for per_batch in rounds.values() for r in per_batch]
    ratio = geomean([float(np.median([r[b.backend] / r[a.backend] for r in rs])) for rs in rounds.values()])
    fast, slow = (a, b) if ratio >= 1 else (b, a)
    wins = sum(r[fast.backend] < r[slow.backend] for r in pairs) / len(pairs)
    tie = max(ratio, 1 / ratio) < TIE_RATIO or wins < TIE_CONFIDENCE
    chosen = min(fast, slow, key=cands.index) if tie else fast
    other = slow if chosen is fast else fast
    r = ratio if chosen is a else 1 / ratio
    how = (f"a tie with {other.backend} when re-measured interleaved (A/B blocks): first in the SKU's backend order"
           if tie else f"fastest when re-measured interleaved with {other.backend} (A/B blocks), {r:.3f}x")
    return chosen, how, Choice(method="interleaved", runner_up=other.backend, ratio=round(r, 4),
                               confidence=round(wins, 4), tie=tie, reason=doubt, rounds=len(pairs))


def interleave_builds(run: Run, targets: list[Target], cands: list[Candidate]) -> Rounds:
    """Time two measured builds of one SKU in alternating blocks on the plan's batch sizes (cached by their
    artifacts, the host and the plan, so a replayed compile chooses as the first one did)."""
    plan = run.recipe.benchmark.model_copy(update={"batch_sizes": run.batch_sizes})
    key = key_of({"interleaved": [c.artifact.key for c in cands], "host": detect.host(),  # type: ignore[union-attr]
                  "plan": plan.model_dump(), "threads": [t.threads for t in targets]})

    def produce(work: Path | None = None) -> dict[str, Any]:
        runners = {}
        for t, c in zip(targets, cands):
            art = run.store.get(c.artifact.key)  # type: ignore[union-attr]
            runners[t.backend.name] = t.backend.load(art.path, art.meta, t.threads)  # type: ignore[union-attr]
        feeds = {b: run.sample_feed(b) for b in plan.batch_sizes}
        return {"rounds": {str(b): r for b, r in interleaved(runners, feeds, plan).items()}}

    _, meta, hit = run.store.cached_step("interleave", key, produce)
    rounds = {int(b): r for b, r in meta["rounds"].items()}
    run.log(f"[choose] {targets[0].sku.name}: {' vs '.join(c.backend for c in cands)} re-measured interleaved, "
            f"{sum(map(len, rounds.values()))} rounds" + (" (cached)" if hit else ""))
    return rounds


def cost_of(sku: SKU, m: Measurement) -> Cost | None:
    if sku.price is None:
        return None
    best = max(m.batches, key=lambda b: b.throughput_per_s or 0)
    if not best.throughput_per_s:
        return None
    per_million = sku.price.usd_per_hour / (best.throughput_per_s * 3600) * 1e6
    return Cost(usd_per_million=round(per_million, 6), usd_per_hour=sku.price.usd_per_hour,
                throughput_per_s=best.throughput_per_s, batch_size=best.batch_size,
                price_source=sku.price.source, price_date=sku.price.date)


def _artifact_ref(art: Artifact) -> ArtifactRef:
    meta = art.build
    return ArtifactRef(key=art.key, content_digest=meta.content_digest, path=str(art.path),
                       size_bytes=meta.size_bytes, files=sorted(meta.files))
