"""``mlopt measure``: the builds a manifest holds for one SKU, validated and measured on a machine of
that SKU, exactly as ``compile`` would have there, and merged into the manifest.

A compile on a machine without the SKU's hardware records cross-compiled builds and on-device
(JIT engine) plans without figures. On a machine of the SKU (another CPU, a GPU node) this replays
the compile's recipe (recorded in the manifest, schema 1.4) against the same store: each build is
loaded with its digests verified, validated against the reference run of the model it was made from
(``validate_build``: the same tolerances) and timed with the same plan (``measure_build``); engine
plans are built here by the backend's loader (``mlopt.runtime.engines``). Then the SKU's build is
chosen again by compile's rule (``choose``) and the manifest is written. A build that cannot run
here stays unmeasured with its reason: no figure is ever estimated.

    read manifest -> its entry for the SKU -> refuse unless this machine runs the SKU
    -> check every pending artifact -> model and reference -> per build: validate, measure -> choose -> write
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from pathlib import Path

from mlopt.compiler import validate as check
from mlopt.compiler.builds import Target, choose, cost_of, measure_build, sku_outcome, validate_build
from mlopt.compiler.pipeline import reference_key, reference_of, stored_reference
from mlopt.compiler.run import Reference, Run
from mlopt.core.errors import (BackendUnavailable, BadInput, MloptError, StoreError, UnknownName, ValidationMismatch,
                               disk_full)
from mlopt.core.model import Model, file_digest
from mlopt.core.util import Log
from mlopt.manifest import Candidate, Entry, Manifest, ModelInfo, read_manifest, write_manifest
from mlopt.recipes.load import recipe_from_dict
from mlopt.recipes.schema import Recipe
from mlopt.store import Artifact, Store
from mlopt.targets import detect
from mlopt.targets.backends import get_backend
from mlopt.targets.catalog import SKU, Catalog, load_catalog

BY = "mlopt measure"


@dataclass(frozen=True)
class MeasureRequest:
    """What ``mlopt measure`` was asked: every flag is a field."""

    manifest: Path
    sku: str
    store: Path | None = None  # default: the store the manifest names
    catalog: Path | None = None  # default: the recipe's catalog
    out: Path | None = None  # default: the manifest itself, rewritten
    remeasure: bool = False  # measure again builds that already have figures


@dataclass
class MeasureResult:
    manifest: Manifest
    sku: str  # the SKU's catalog name
    path: Path | None  # where the manifest was written (None: nothing to measure, nothing written)
    exit_code: int
    measured: list[str] = field(default_factory=list)  # backends measured here
    unmeasured: dict[str, str] = field(default_factory=dict)  # backend -> why not (failed or cannot run here)


def measure_manifest(req: MeasureRequest, log: Log = lambda _: None) -> MeasureResult:
    """Validate and measure the manifest's pending builds for ``req.sku`` on this machine; merge the
    figures, choose again, and write the manifest (nothing is written when an input is refused)."""
    manifest = read_manifest(req.manifest)
    recipe = _recipe(manifest, req.manifest)
    sku = _sku(load_catalog(req.catalog or recipe.catalog), req.sku, manifest)
    entry = next(e for e in manifest.entries if e.sku == sku.name)
    runs_here, why_not = detect.host_runs(sku)
    if not runs_here:
        raise BackendUnavailable(why_not, hint=f"run `mlopt measure` on a {sku.name} machine")
    pending = [c for c in entry.candidates if c.status == "built" and (c.measurement is None or req.remeasure)]
    if not pending:
        log(f"[measure] {sku.name}: every build already has figures (--remeasure measures them again)")
        return MeasureResult(manifest, sku.name, None, 0)
    path = _writable(req.out or req.manifest)
    store = _store(req.store, manifest)
    artifacts = {c.backend: _artifact(store, c, sku) for c in pending}  # all checked before any work
    info = _model_info(manifest, entry)
    run = Run(recipe, store, log, inputs=tuple(info.inputs))
    model = _model(store, info, info.final_digest, entry, recipe)
    reference = _reference(run, store, info, entry, recipe)
    done = {c.backend: _measure_one(_target(run, model, sku, entry, c.backend), c, artifacts[c.backend], reference,
                                    req.remeasure) for c in pending}
    candidates = [done.get(c.backend, c) for c in entry.candidates]
    new_entry = _rechoose(entry, sku, candidates)
    with store.lock():  # another `mlopt measure` of this manifest (another SKU) may have written it meanwhile
        latest = read_manifest(path) if path.resolve() == req.manifest.resolve() else manifest
        merged = _merge(latest, new_entry, sku)
        write_manifest(merged, path)
    log(f"[done] manifest written to {path}")
    return _result(merged, sku.name, path, done)


# ------------------------------------------------------------------ inputs


def _recipe(manifest: Manifest, path: Path) -> Recipe:
    if manifest.matrix is not None:
        raise BadInput(f"{path} is a build-matrix summary; measure the per-task manifests under its tasks/ folder")
    if manifest.recipe.resolved is None:
        raise BadInput(f"manifest {path} (schema {manifest.schema_version}) does not record its resolved recipe, so "
                       "its benchmark plan cannot be replayed", hint="compile it again with this mlopt (schema 1.4)")
    return recipe_from_dict(manifest.recipe.resolved, where=f"the recipe recorded in {path}")


def _sku(catalog: Catalog, name: str, manifest: Manifest) -> SKU:
    listed = [e.sku for e in manifest.entries]
    try:
        sku: SKU | None = catalog.get(name)
    except UnknownName:
        sku = None
    if sku is None or sku.name not in listed:
        raise UnknownName(f"the manifest has no entry for SKU {name!r}; it has {', '.join(listed) or 'none'}",
                          hint="name one of its SKUs (`mlopt manifest show` lists them)")
    return sku


def _writable(path: Path) -> Path:
    """``path``, once its folder is known to take a new file (checked before minutes of measuring)."""
    probe = path.parent / f".{path.name}.mlopt-probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"cannot write the manifest to {path} ({e.strerror or e})", hint="pass --out FILE") from None
    return path


def _store(root: Path | None, manifest: Manifest) -> Store:
    return Store.existing(root or manifest.store)


def _artifact(store: Store, c: Candidate, sku: SKU) -> Artifact:
    """The candidate's artifact, its digests verified: a missing or damaged one is an error (exit 2)."""
    key = c.artifact.key if c.artifact else None
    art = store.checked(key) if key else None
    if art is None:
        raise StoreError(f"the {sku.name}/{c.backend} build ({(key or '?')[:12]}) is not in store {store.root}",
                         hint="copy the compile's store here and pass it with --store (or set $MLOPT_STORE)")
    return art


def _model_info(manifest: Manifest, entry: Entry) -> ModelInfo:
    return next(m for m in manifest.models if m.name == entry.model and m.version == entry.version)


# ------------------------------------------------------------------ the model and its reference


def _model(store: Store, info: ModelInfo, digest: str, entry: Entry, recipe: Recipe) -> Model:
    """The ONNX model of ``digest`` (the final one the builds were made from, or the ingested one): in
    the store's pass and ingest steps, the recipe's ONNX source, or a build that ships it."""
    for path in [*_stored_models(store, digest), *_other_models(store, entry, recipe)]:
        if path.is_file() and file_digest(path) == digest:
            return Model(name=info.name, onnx_path=path, inputs=tuple(info.inputs), outputs=tuple(info.outputs),
                         digest=digest)
    raise StoreError(f"the model {info.name} v{info.version} the builds were made from (sha256 {digest[:12]}) is "
                     f"not in store {store.root}", hint="copy the compile's whole store here (cache/ and objects/)")


def _stored_models(store: Store, digest: str) -> list[Path]:
    """The model files of the intact ingest and pass steps whose recorded digest is ``digest``."""
    found = []
    for kind, file_of in (("pass", lambda m: m.get("file")), ("ingest", lambda m: "model.onnx")):
        folder = store.root / "cache" / kind
        for step in sorted(folder.iterdir()) if folder.is_dir() else []:
            try:
                meta = json.loads((step / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("digest") == digest and file_of(meta) \
                    and not store.verify_step(step):
                found.append(step / file_of(meta))
    return found


def _other_models(store: Store, entry: Entry, recipe: Recipe) -> list[Path]:
    """The recipe's ONNX source, and the ONNX files the entry's builds ship (in this store, wherever the
    compile's store was)."""
    source = [Path(recipe.model.source)] if recipe.model.source.endswith(".onnx") else []
    return source + [store.root / "objects" / c.artifact.key / "model.onnx" for c in entry.candidates if c.artifact]


def _reference(run: Run, store: Store, info: ModelInfo, entry: Entry, recipe: Recipe) -> Reference:
    """What compile stored of the original model on the evaluation data; recomputed from the ingested
    model when the store does not hold it (another ONNX Runtime version keys it apart)."""
    if recipe.data.evaluation is None:
        return Reference()
    key = reference_key(run, info.input_digest)
    meta = store.lookup_step("reference", key)
    if meta is not None:
        return stored_reference(store.root / "cache" / "reference" / key, meta)
    run.log("[reference] not in the store: computing it from the ingested model")
    return reference_of(run, _model(store, info, info.input_digest, entry, recipe))


# ------------------------------------------------------------------ one build


def _target(run: Run, model: Model, sku: SKU, entry: Entry, backend_name: str) -> Target:
    backend = get_backend(backend_name)
    return Target(run, model, sku, backend, entry.version, backend.availability(sku, True), "",
                  sku.threads or run.recipe.benchmark.threads)


def _measure_one(t: Target, c: Candidate, art: Artifact, reference: Reference, fresh: bool) -> Candidate:
    """Candidate ``c`` validated and measured here, or why it could not be (it keeps its build)."""
    name, sku = t.backend.name, t.sku
    if not t.avail.run:
        t.run.log(f"[{sku.name}] {name}: cannot run here ({t.avail.reason})")
        return c.model_copy(update={"reason": f"not measured on {detect.host()['cpu']}: {t.avail.reason}"})
    try:
        with t.run.stage(f"validate {sku.name}/{name}"):
            validation = validate_build(t, art.path, art.meta)
        with t.run.stage(f"measure {sku.name}/{name}"):
            measurement = measure_build(t, art, reference, by=BY, fresh=fresh)
    except ValidationMismatch as e:
        t.run.log(f"[{sku.name}] {name}: FAILED validation: {e}")
        return c.model_copy(update={"status": "failed", "reason": str(e), "validation": check.failed(e),
                                    "measurement": None})
    except BackendUnavailable as e:  # its runtime or engine library is missing here: it stays as it was
        t.run.log(f"[{sku.name}] {name}: cannot run here ({e.message})")
        return c.model_copy(update={"reason": f"not measured here: {e.message}"})
    except MloptError as e:
        return c.model_copy(update={"status": "failed", "reason": e.message, "measurement": None})
    except Exception as e:  # the runtime's own error: recorded on the candidate, the others go on
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise disk_full(e) from e
        first = str(e).splitlines()[0][:300] if str(e) else ""
        return c.model_copy(update={"status": "failed", "reason": f"{type(e).__name__}: {first}", "measurement": None})
    return c.model_copy(update={"reason": "", "validation": validation, "measurement": measurement})


# ------------------------------------------------------------------ the merge


def _rechoose(entry: Entry, sku: SKU, candidates: list[Candidate]) -> Entry:
    """The entry with its candidates replaced and its build chosen again by compile's rule."""
    chosen, chosen_by, choice = choose(candidates)
    m = chosen.measurement if chosen else None
    same = chosen is not None and entry.artifact is not None and chosen.artifact is not None \
        and chosen.artifact.key == entry.artifact.key
    return entry.model_copy(update={
        "chosen_backend": chosen.backend if chosen else None, "chosen_by": chosen_by, "choice": choice,
        "artifact": chosen.artifact if chosen else None, "precision": chosen.precision if chosen else None,
        "measurement": m, "cost": cost_of(sku, m) if m else None, "candidates": candidates,
        "image": entry.image if same else None,  # an image of another build no longer serves this choice
    })


def _merge(manifest: Manifest, entry: Entry, sku: SKU) -> Manifest:
    """The manifest with ``entry`` in its place; this SKU's errors replaced by what is wrong now."""
    entries = [entry if e.sku == sku.name and e.model == entry.model else e for e in manifest.entries]
    mine = (f"{sku.name}/", f"{sku.name}: ")
    chosen = next((c for c in entry.candidates if c.backend == entry.chosen_backend), None)
    errors, warnings, _ = sku_outcome(sku.name, entry.candidates, chosen)
    if chosen is None:
        errors.append(f"{sku.name}: no backend produced a build that runs")
    errors = [e for e in manifest.errors if not e.startswith(mine)] + errors
    warnings = [w for w in manifest.warnings if not w.startswith(mine)] + warnings
    return manifest.model_copy(update={"entries": entries, "errors": errors, "warnings": warnings,
                                       "status": "failed" if errors else "ok"})


def _result(manifest: Manifest, sku: str, path: Path, done: dict[str, Candidate]) -> MeasureResult:
    """compile's rule (``sku_outcome``): 0 when a build was validated and measured here (the others'
    failures are warnings); else 3 when a build failed validation, 4 when none could be measured."""
    measured = [b for b, c in done.items() if c.measurement is not None]
    unmeasured = {b: c.reason for b, c in done.items() if c.measurement is None}
    failed_validation = any(c.validation is not None and c.validation.status == "failed" for c in done.values())
    code = 0 if measured else (3 if failed_validation else 4)
    return MeasureResult(manifest, sku, path, code, measured, unmeasured)
