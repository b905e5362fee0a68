"""The tables ``mlopt compile`` and ``mlopt manifest show`` print for a manifest."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mlopt.cli.guard import err, out

COLUMNS = ("SKU", "backend", "status", "built", "validation", "p50 ms by batch", "best thr/s", "accuracy", "$/M inf",
           "artifact")


def build_table(m: Any, skus: set[str] | None = None) -> None:
    """One row per candidate build of each SKU (of ``skus`` only, when given); the chosen one is starred."""
    t = Table(title=f"{m.models[0].name} v{m.models[0].version}")
    for col in COLUMNS:
        t.add_column(col)
    for e in m.entries:
        for c in e.candidates if skus is None or e.sku in skus else []:
            t.add_row(*_row(e, c))
    out.print(t)
    out.print("* the SKU's chosen build", style="dim")
    host = next((e.sku for e in m.entries if e.requested_as == "host"), None) if skus is None else None
    if host:
        out.print(f"target 'host' is {host} on this machine ({m.host.cpu}); builds for SKUs it cannot run are "
                  "cross-compiled and carry no figures", highlight=False)


def _row(e: Any, c: Any) -> tuple[str, ...]:
    meas = c.measurement
    lat = " ".join(f"b{b.batch_size}:{b.p50_ms:.2f}" for b in meas.batches) if meas else "-"
    thr = f"{max(b.throughput_per_s or 0 for b in meas.batches):.1f}" if meas else "-"
    acc = f"{meas.accuracy.value:.4f}" if meas and meas.accuracy else "-"
    chosen = c.backend == e.chosen_backend
    cost = f"{e.cost.usd_per_million:.4f}" if chosen and e.cost else "-"
    built = f"{c.compiled or '-'}{' (cached)' if c.cached else ''}" if c.status == "built" else "-"
    status = c.status + (" *" if chosen else "")
    return (e.sku + (" (host)" if e.requested_as == "host" else ""), c.backend, status, built,
            c.validation.status if c.validation else "-", lat, thr, acc, cost,
            c.artifact.key[:12] if c.artifact else (c.reason[:40] or "-"))


def gates_summary(m: Any) -> None:
    """The gate table and its warnings, when the build was gated against a baseline."""
    if m.gates is None:
        return
    from mlopt.diff import gate_table

    out.print(gate_table(m.gates))
    for w in m.gates.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
