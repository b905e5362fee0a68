"""``mlopt diff OLD NEW``: what changed between two manifests, per SKU, with the gate verdicts.

``diff_manifests`` returns a ``ManifestDiff`` whose JSON (``mlopt diff --json``) is a stable,
documented structure (``format: mlopt-diff/1``); ``diff_table`` renders it for a terminal,
``to_markdown`` as GitHub-flavoured Markdown for a pull-request comment or a CI job summary, and
``gate_table`` renders a manifest's gate report (the compile summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from rich.table import Table

from mlopt.core.spec import Record
from mlopt.gates import compare
from mlopt.manifest import Entry, GateCheck, GateLimits, GateReport, Manifest

DIFF_FORMAT = "mlopt-diff/1"
VERDICT_MARK = {"pass": "pass", "fail": "FAIL", "inconclusive": "inconclusive", "not-measured": "not measured"}
MD_MARK = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️", "not-measured": "–", "warn": "⚠️"}


class Pair(Record):
    """A figure in the baseline (old) and in the new manifest (new); null where absent."""

    old: float | str | None = None
    new: float | str | None = None


class ManifestInfo(Record):
    source: str = Field(description="Path or URL the manifest was read from.")
    created: str
    mlopt_version: str
    recipe_digest: str
    models: dict[str, int] = Field(description="Model name -> version in the store.")


class SkuDiff(Record):
    model: str
    sku: str
    presence: Literal["both", "added", "removed"]
    backend: Pair
    precision: Pair
    artifact_key: Pair
    content_digest: Pair
    digest_changed: bool = Field(description="The chosen artifact's content digest differs.")
    size_bytes: Pair
    best_throughput_per_s: Pair
    accuracy: Pair
    usd_per_million: Pair
    checks: list[GateCheck] = Field(description="The gate checks (latency per batch size, accuracy, size ...).")
    warnings: list[str]


class ManifestDiff(Record):
    format: Literal["mlopt-diff/1"] = DIFF_FORMAT
    old: ManifestInfo
    new: ManifestInfo
    toolchain: dict[str, Pair] = Field(description="Toolchain packages whose versions differ.")
    limits: GateLimits
    verdict: Literal["pass", "warn", "fail"]
    failures: list[str]
    warnings: list[str]
    skus: list[SkuDiff]


def default_limits(new: Manifest) -> GateLimits:
    """The limits the new build was gated with, else the recipe defaults."""
    if new.gates is not None:
        return new.gates.limits
    from mlopt.recipes.schema import AccuracyBudget, Gates

    g = Gates()
    return GateLimits(latency_regression=g.latency_regression, throughput_drop=g.throughput_drop,
                      accuracy_drop=AccuracyBudget().max_drop, size_growth=g.size_growth, noise_k=g.noise_k,
                      strict=g.strict)


def diff_manifests(old: Manifest, new: Manifest, limits: GateLimits, old_ref: str, new_ref: str) -> ManifestDiff:
    """Compare two manifests SKU by SKU, gates included."""
    report = compare(old, new, limits, old_ref)
    before = {(e.model, e.sku): e for e in old.entries}
    after = {(e.model, e.sku): e for e in new.entries}
    skus = [_sku_diff(before.get((g.model, g.sku)), after.get((g.model, g.sku)), g.presence, g.checks, g.warnings)
            for g in report.skus]
    tools = {k: Pair(old=old.toolchain.get(k), new=new.toolchain.get(k))
             for k in sorted(set(old.toolchain) | set(new.toolchain)) if old.toolchain.get(k) != new.toolchain.get(k)}
    return ManifestDiff(old=_info(old, old_ref), new=_info(new, new_ref), toolchain=tools, limits=limits,
                        verdict=report.verdict, failures=report.failures, warnings=report.warnings, skus=skus)


def _info(m: Manifest, source: str) -> ManifestInfo:
    return ManifestInfo(source=source, created=m.created, mlopt_version=m.mlopt_version,
                        recipe_digest=m.recipe.digest, models={i.name: i.version for i in m.models})


def _sku_diff(old: Entry | None, new: Entry | None, presence: str, checks: list[GateCheck],
              warnings: list[str]) -> SkuDiff:
    some = new or old

    def pair(get) -> Pair:  # type: ignore[no-untyped-def]
        return Pair(old=get(old) if old else None, new=get(new) if new else None)

    art = lambda attr: lambda e: getattr(e.artifact, attr) if e.artifact else None  # noqa: E731
    digests = pair(art("content_digest"))
    return SkuDiff(
        model=some.model, sku=some.sku, presence=presence, backend=pair(lambda e: e.chosen_backend),
        precision=pair(lambda e: e.precision), artifact_key=pair(art("key")), content_digest=digests,
        digest_changed=presence == "both" and digests.old != digests.new, size_bytes=pair(art("size_bytes")),
        best_throughput_per_s=pair(_best_throughput), accuracy=pair(_accuracy),
        usd_per_million=pair(lambda e: e.cost.usd_per_million if e.cost else None), checks=checks,
        warnings=warnings)


def _best_throughput(e: Entry) -> float | None:
    if e.measurement is None:
        return None
    return max((b.throughput_per_s or 0 for b in e.measurement.batches), default=None) or None


def _accuracy(e: Entry) -> float | None:
    return e.measurement.accuracy.value if e.measurement and e.measurement.accuracy else None


# ------------------------------------------------------------------ rendering


def _num(x: float | str | None, fmt: str = "{:.4g}") -> str:
    return "-" if x is None else fmt.format(x) if isinstance(x, (int, float)) else str(x)


def _arrow(p: Pair, fmt: str = "{:.4g}") -> str:
    """'old → new', or the one value when unchanged."""
    if p.old == p.new:
        return _num(p.new, fmt)
    return f"{_num(p.old, fmt)} → {_num(p.new, fmt)}"


def _latency_cells(s: SkuDiff, mark: dict[str, str]) -> str:
    cells = []
    for c in s.checks:
        if c.gate != "latency":
            continue
        if c.old is None or c.new is None:
            cells.append(f"{c.figure}: {VERDICT_MARK[c.verdict]}")
            continue
        change = f" ({c.change:+.1%})" if c.change is not None else ""
        cells.append(f"{c.figure.removeprefix('p50 ')}: {c.old:.4g} → {c.new:.4g} ms{change} {mark[c.verdict]}")
    return "; ".join(cells) or "-"


def _gates_cell(s: SkuDiff, mark: dict[str, str]) -> str:
    if s.presence != "both":
        return s.presence
    bad = [c for c in s.checks if c.verdict in ("fail", "inconclusive")]
    if not bad:
        return mark["pass"] if any(c.verdict == "pass" for c in s.checks) else mark["not-measured"]
    return ", ".join(f"{c.figure} {mark[c.verdict]}" for c in bad)


COLUMNS = ("SKU", "backend", "precision", "p50 by batch (old → new)", "best thr/s", "accuracy", "size (bytes)",
           "digest", "$/M inf", "gates")


def _row(s: SkuDiff, mark: dict[str, str]) -> list[str]:
    digest = "changed" if s.digest_changed else ("same" if s.presence == "both" else "-")
    return [s.sku, _arrow(s.backend), _arrow(s.precision), _latency_cells(s, mark),
            _arrow(s.best_throughput_per_s, "{:.1f}"), _arrow(s.accuracy, "{:.4f}"), _arrow(s.size_bytes, "{:.0f}"),
            digest, _arrow(s.usd_per_million, "{:.4f}"), _gates_cell(s, mark)]


def diff_table(d: ManifestDiff) -> Table:
    """The diff as a rich table, one row per SKU."""
    t = Table(title=f"{d.old.source} → {d.new.source}: gates {d.verdict}")
    for col in COLUMNS:
        t.add_column(col)
    for s in d.skus:
        t.add_row(*_row(s, VERDICT_MARK))
    return t


def to_markdown(d: ManifestDiff) -> str:
    """The diff as GitHub-flavoured Markdown: a verdict line, a table per SKU, failures and warnings."""
    esc = lambda x: x.replace("|", "\\|")  # noqa: E731
    lines = [f"### mlopt: gates {MD_MARK.get(d.verdict, '')} {d.verdict}", "",
             f"Baseline `{d.old.source}` ({d.old.created}) → `{d.new.source}` ({d.new.created})", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(esc(c) for c in _row(s, MD_MARK)) + " |" for s in d.skus]
    if d.toolchain:
        lines += ["", "Toolchain: " + ", ".join(f"{k} {_arrow(p)}" for k, p in d.toolchain.items())]
    for title, items in (("Failed gates", d.failures), ("Warnings", d.warnings)):
        if items:
            lines += ["", f"**{title}**", ""] + [f"- {esc(i)}" for i in items]
    return "\n".join(lines) + "\n"


def gate_table(report: GateReport) -> Table:
    """A manifest's gate report: every check of every SKU."""
    t = Table(title=f"gates against {report.baseline} ({report.baseline_created}): {report.verdict}")
    for col in ("SKU", "gate", "figure", "old", "new", "change", "limit", "noise", "verdict", "why"):
        t.add_column(col)
    for s in report.skus:
        if s.presence != "both":
            t.add_row(s.sku, "-", "-", "-", "-", "-", "-", "-", s.presence, "")
        for c in s.checks:
            value, change, limit = GATE_FORMATS[c.gate]
            t.add_row(s.sku, c.gate, c.figure, _num(c.old, value), _num(c.new, value), _num(c.change, change),
                      _num(c.limit, limit), _num(c.noise, "{:.1%}"), VERDICT_MARK[c.verdict], c.reason)
    return t


# gate -> formats of its figures, its change and its limit
GATE_FORMATS = {"latency": ("{:.4g} ms", "{:+.1%}", "{:.0%}"), "throughput": ("{:.1f}/s", "{:+.1%}", "{:.0%}"),
                "accuracy": ("{:.4f}", "{:+.4f}", "{:g}"), "size": ("{:,.0f} B", "{:+.1%}", "{:.0%}")}
