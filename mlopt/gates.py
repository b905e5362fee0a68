"""CI gates: compare a build's manifest with a baseline manifest, SKU by SKU.

Entries are matched on (model name, SKU); SKUs only in one of the two are reported (warnings, not
failures). For every matched SKU the chosen builds are compared, gate by gate:

* ``latency``: p50 per batch size, judged against the measured noise (below);
* ``throughput`` (off unless a limit is set): the same rule, on throughput = batch / p50;
* ``accuracy``: the drop of the evaluation metric below the baseline's (absolute), default budget
  the recipe's ``accuracy.max_drop``; evaluation is deterministic, so there is no noise band;
* ``size``: growth of the chosen artifact's bytes.

A figure absent on either side (cross-compiled and on-device builds have none) is ``not-measured``,
never a failure. Latency is compared only between comparable hosts: the same CPU model, logical
CPU count and architecture, and the same thread count; otherwise it is ``inconclusive: different
hosts``. Each check is ``pass``, ``fail``, ``inconclusive`` or ``not-measured``.

The noise rule, per batch size (``spread`` is the run's (p75 - p25) / p50)::

    change = p50_new / p50_old - 1
    noise  = k * sqrt(spread_old^2 + spread_new^2)    # each run's IQR relative to its own median
    pass          change <= limit                        # every speed-up passes
    fail          change >  limit  and  change > noise  and  min_new / min_old - 1 > limit / 2
    inconclusive  otherwise (a warning; a failure with ``strict``)

Why this rule: the medians of two runs on machines of one type differ by far more than their
sampling error (frequency scaling, co-tenants, memory placement), which within-run statistics such
as IQR / sqrt(runs) do not see. The within-run IQR is the measured sign of that disturbance, so the
band scales with it directly: on a quiet machine (spread 0.02) the band is about 3% and the limit
decides; on a disturbed one (spread 0.2) it is about 28%, and only regressions larger than that
fail. The spreads combine as relative figures (in quadrature, as independent errors) because
interference is multiplicative: a disturbed machine slows runs by a fraction of their time, so a
10x slower build is not made "noisier" by its own larger absolute IQR. Interference only ever adds
time, so the fastest run is the figure least moved by it: a real slowdown of the code moves the
minimum too, while a p50 that grew with a steady minimum is load on the machine, which the rule
calls inconclusive instead of failing the build at random.

Builds with the same artifact key (same model, passes, toolchain, target, backend) but a different
content digest are flagged as non-reproducible (a warning).
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mlopt.core.errors import BadInput
from mlopt.manifest import (BatchFigures, Entry, GateCheck, GateLimits, GateReport, Manifest, Measurement, SkuGates,
                            validate_manifest)

URL_SCHEMES = ("http://", "https://", "file://")


# ------------------------------------------------------------------ reading a baseline


def is_url(ref: str) -> bool:
    return ref.startswith(URL_SCHEMES)


def load_manifest_ref(ref: str, what: str = "baseline") -> Manifest:
    """A manifest from a file path or an http(s):// / file:// URL; BadInput (exit 2) when it cannot be
    read, is not JSON, or does not match the manifest schema."""
    text = _read_url(ref, what) if is_url(ref) else _read_path(ref, what)
    hint = f"give --{what} a manifest.json written by `mlopt compile`" if what == "baseline" else None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{what} {ref} is not JSON: {e}", hint=hint) from None
    if not isinstance(data, dict):
        raise BadInput(f"{what} {ref} is not a manifest (a JSON object)", hint=hint)
    try:
        validate_manifest(data)
        return Manifest.model_validate(data)
    except BadInput as e:
        raise BadInput(f"{what} {ref}: {e.message}", hint=hint) from None
    except ValidationError as e:
        raise BadInput(f"{what} {ref} is not a valid manifest: {e.errors()[0]['msg']}", hint=hint) from None


def _read_url(url: str, what: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - http(s)/file only, checked above
            return resp.read().decode("utf-8")
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise BadInput(f"{what} {url} cannot be read: {e}",
                       hint="check the URL, or download the manifest and pass its path") from None


def _read_path(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text()
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist",
                       hint="pass the previous build's manifest.json (a path or an http(s):// URL)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{what} {path} cannot be read: {e}") from None


def limits_for(recipe: Any) -> GateLimits:
    """The recipe's gate limits, the accuracy budget defaulting to ``accuracy.max_drop``."""
    g = recipe.gates
    return GateLimits(latency_regression=g.latency_regression, throughput_drop=g.throughput_drop,
                      accuracy_drop=g.accuracy_drop if g.accuracy_drop is not None else recipe.accuracy.max_drop,
                      size_growth=g.size_growth, noise_k=g.noise_k, strict=g.strict)


# ------------------------------------------------------------------ the latency rule


@dataclass(frozen=True)
class Judgement:
    verdict: str
    change: float
    noise: float
    reason: str = ""


def judge_latency(old: BatchFigures, new: BatchFigures, limit: float, k: float) -> Judgement:
    """Pass, fail or inconclusive for one batch size's p50 (the rule in the module docstring)."""
    change = new.p50_ms / old.p50_ms - 1
    noise = k * math.hypot(old.spread, new.spread)
    if change <= limit:
        return Judgement("pass", change, noise)
    if change <= noise:
        return Judgement("inconclusive", change, noise,
                         f"+{change:.1%} is over the limit but inside the noise band ({noise:.1%})")
    min_change = new.min_ms / old.min_ms - 1
    if min_change <= limit / 2:
        return Judgement("inconclusive", change, noise,
                         f"p50 +{change:.1%} but the fastest run only {min_change:+.1%}: load on the machine?")
    return Judgement("fail", change, noise)


def host_difference(old: Measurement, new: Measurement) -> str:
    """Empty when the two measurements come from comparable hosts; else what differs."""
    def describe(m: Measurement) -> tuple[Any, ...]:
        h = m.provenance.host
        return h.machine, h.cpu, h.cores, m.provenance.threads

    a, b = describe(old), describe(new)
    if a == b:
        return ""
    fmt = lambda d: f"{d[1]} ({d[0]}, {d[2]} CPUs, {d[3]} threads)"  # noqa: E731
    return f"different hosts: {fmt(a)} vs {fmt(b)}"


# ------------------------------------------------------------------ checks per gate


def _absent(gate: str, figure: str, old: Entry, new: Entry) -> GateCheck | None:
    """A not-measured check when either side has no figures, else None."""
    missing = [side for side, e in (("the baseline", old), ("this build", new)) if e.measurement is None]
    if not missing:
        return None
    entry = new if new.measurement is None else old
    how = next((c.compiled for c in entry.candidates if c.backend == entry.chosen_backend), None)
    why = {"cross": " (cross-compiled for hardware not present)", "on-device": " (built on the device)"}.get(how, "")
    who = f"{missing[0]} has no" if len(missing) == 1 else "neither side has"
    return GateCheck(gate=gate, figure=figure, verdict="not-measured", old=None, new=None, change=None, limit=None,
                     reason=f"{who} figures for this SKU{why}")


def latency_checks(old: Entry, new: Entry, limits: GateLimits, gate: str = "latency") -> list[GateCheck]:
    """One check per batch size for the latency (or throughput) gate."""
    limit = limits.latency_regression if gate == "latency" else limits.throughput_drop
    if limit is None:
        return []
    absent = _absent(gate, "p50" if gate == "latency" else "throughput", old, new)
    if absent:
        return [absent]
    hosts = host_difference(old.measurement, new.measurement)
    before = {b.batch_size: b for b in old.measurement.batches}
    after = {b.batch_size: b for b in new.measurement.batches}
    return [_batch_check(gate, bs, before.get(bs), after.get(bs), limit, limits, hosts)
            for bs in sorted(set(before) | set(after))]


def _batch_check(gate: str, bs: int, old: BatchFigures | None, new: BatchFigures | None, limit: float,
                 limits: GateLimits, hosts: str) -> GateCheck:
    figure = f"p50 b{bs}" if gate == "latency" else f"throughput b{bs}"
    value = (lambda b: b.p50_ms) if gate == "latency" else (lambda b: b.throughput_per_s)
    base = dict(gate=gate, figure=figure, old=value(old) if old else None, new=value(new) if new else None,
                limit=limit)
    if old is None or new is None or min(old.p50_ms, old.min_ms, new.p50_ms) <= 0:
        why = f"batch {bs} not measured in {'the baseline' if old is None else 'this build'}" \
            if old is None or new is None else "a zero latency was recorded (below the timer's resolution)"
        return GateCheck(**base, verdict="not-measured", change=None, reason=why)
    # throughput = batch / p50, so a drop d of throughput is a growth d / (1 - d) of p50
    j = judge_latency(old, new, limit if gate == "latency" else limit / (1 - limit), limits.noise_k)
    change = j.change if gate == "latency" else 1 - old.p50_ms / new.p50_ms
    if hosts:
        return GateCheck(**base, verdict="inconclusive", change=change, noise=round(j.noise, 4), reason=hosts)
    verdict, reason = j.verdict, j.reason
    if verdict == "inconclusive" and limits.strict:
        verdict, reason = "fail", f"{reason} (strict: inconclusive fails)"
    return GateCheck(**base, verdict=verdict, change=change, noise=round(j.noise, 4), reason=reason)


def accuracy_check(old: Entry, new: Entry, limits: GateLimits) -> list[GateCheck]:
    """The drop of the evaluation metric below the baseline's."""
    limit = limits.accuracy_drop
    if limit is None:
        return []
    absent = _absent("accuracy", "accuracy", old, new)
    if absent:
        return [absent.model_copy(update={"limit": limit})]
    a, b = old.measurement.accuracy, new.measurement.accuracy
    if a is None or b is None:
        side = "the baseline" if a is None else "this build"
        return [GateCheck(gate="accuracy", figure="accuracy", verdict="not-measured", old=a and a.value,
                          new=b and b.value, change=None, limit=limit, reason=f"no evaluation data in {side}")]
    base = dict(gate="accuracy", figure=b.metric, old=a.value, new=b.value, change=a.value - b.value, limit=limit)
    if a.metric != b.metric:
        return [GateCheck(**base, verdict="inconclusive", reason=f"different metrics: {a.metric} vs {b.metric}")]
    return [GateCheck(**base, verdict="pass" if a.value - b.value <= limit + 1e-12 else "fail")]


def size_check(old: Entry, new: Entry, limits: GateLimits) -> list[GateCheck]:
    """Growth of the chosen artifact's size."""
    if limits.size_growth is None:
        return []
    a, b = old.artifact, new.artifact
    if a is None or b is None or a.size_bytes == 0:
        side = "the baseline" if a is None else "this build"
        return [GateCheck(gate="size", figure="size", verdict="not-measured", old=a and a.size_bytes,
                          new=b and b.size_bytes, change=None, limit=limits.size_growth,
                          reason=f"{side} has no artifact for this SKU")]
    growth = b.size_bytes / a.size_bytes - 1
    return [GateCheck(gate="size", figure="size", verdict="pass" if growth <= limits.size_growth else "fail",
                      old=a.size_bytes, new=b.size_bytes, change=growth, limit=limits.size_growth)]


def reproducibility_warnings(old: Entry, new: Entry) -> list[str]:
    """Builds whose inputs and toolchain (the artifact key) are unchanged but whose bytes differ."""
    before = {c.backend: c.artifact for c in old.candidates if c.artifact}
    found = []
    for c in new.candidates:
        a = before.get(c.backend)
        if a and c.artifact and a.key == c.artifact.key and a.content_digest != c.artifact.content_digest:
            found.append(f"{new.sku}/{c.backend}: non-reproducible build: artifact {a.key[:12]} (same model, passes "
                         f"and toolchain) has content {a.content_digest[:12]} in the baseline and "
                         f"{c.artifact.content_digest[:12]} now")
    return found


# ------------------------------------------------------------------ the report


def compare(old: Manifest, new: Manifest, limits: GateLimits, baseline: str) -> GateReport:
    """Every gate for every (model, SKU) of the two manifests, with the overall verdict."""
    before = {(e.model, e.sku): e for e in old.entries}
    after = {(e.model, e.sku): e for e in new.entries}
    skus = [_sku_gates(before.get(k), after.get(k), limits) for k in [*after, *(k for k in before if k not in after)]]
    failures = [f"{s.sku}: {_describe(c)}" for s in skus for c in s.checks if c.verdict == "fail"]
    warnings = [f"{s.sku}: {c.figure}: inconclusive: {c.reason}" for s in skus for c in s.checks
                if c.verdict == "inconclusive"] + [w for s in skus for w in s.warnings]
    verdict = "fail" if failures else "warn" if warnings else "pass"
    return GateReport(baseline=baseline, baseline_created=old.created, baseline_recipe_digest=old.recipe.digest,
                      limits=limits, verdict=verdict, failures=failures, warnings=warnings, skus=skus)


def _sku_gates(old: Entry | None, new: Entry | None, limits: GateLimits) -> SkuGates:
    some = new or old
    base = dict(model=some.model, sku=some.sku, backend_old=old and old.chosen_backend,
                backend_new=new and new.chosen_backend)
    if old is None or new is None:
        where = "not in the baseline (added)" if old is None else "in the baseline only (removed)"
        return SkuGates(**base, presence="added" if old is None else "removed", checks=[],
                        warnings=[f"{some.sku}: {where}"])
    checks = [*latency_checks(old, new, limits), *latency_checks(old, new, limits, "throughput"),
              *accuracy_check(old, new, limits), *size_check(old, new, limits)]
    return SkuGates(**base, presence="both", checks=checks, warnings=reproducibility_warnings(old, new))


def _describe(c: GateCheck) -> str:
    """A failed check in one line: the figures, the change and the limit."""
    if c.gate == "accuracy":
        return f"accuracy {c.figure} {c.old:.4f} -> {c.new:.4f} (drop {c.change:.4f} > budget {c.limit:g})"
    unit = {"latency": " ms", "throughput": "/s", "size": " bytes"}[c.gate]
    what = "drop" if c.gate == "throughput" else "growth"
    noise = f", noise band {c.noise:.1%}" if c.noise is not None else ""
    extra = f"; {c.reason}" if c.reason else ""
    return (f"{c.gate} {c.figure} {c.old:g}{unit} -> {c.new:g}{unit} ({what} {c.change:+.1%} > {c.limit * 100:g}%"
            f"{noise}){extra}")


def attach(manifest: Manifest, report: GateReport) -> Manifest:
    """The manifest with the gate report; a failed gate makes it ``failed`` with the broken gates listed."""
    if report.verdict != "fail":
        return manifest.model_copy(update={"gates": report})
    errors = [*manifest.errors, *(f"gate {f}" for f in report.failures)]
    return manifest.model_copy(update={"gates": report, "status": "failed", "errors": errors})
