"""``mlopt plan``: the CLI's one call (``plan_command``) and the plan as a table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlopt.plan.assemble import make_plan
from mlopt.plan.inputs import load_fleet, load_traffic
from mlopt.plan.k8s import write_k8s
from mlopt.plan.result import Plan


def plan_command(manifests: list[Path], fleet: Path, traffic: Path, out: Path | None = None, as_json: bool = False,
                 what_if: str | None = None, console: Console | None = None, placeholder: bool = False) -> Plan:
    """Plan from the manifests, ``fleet.yaml`` and ``traffic.yaml``; print the plan (a table, or JSON
    with ``as_json``); with ``out``, write the Kubernetes files there. Errors are ``MloptError``s
    (an infeasible input is ``BadInput``, exit 2, naming what binds)."""
    console = console or Console()
    plan = make_plan([Path(m) for m in manifests], load_fleet(fleet), load_traffic(traffic), what_if=what_if)
    written = write_k8s(plan, Path(out), placeholder=placeholder) if out else []
    if as_json:  # plain JSON, no colours or wrapping, so it pipes into jq
        console.file.write(plan.model_dump_json(indent=2) + "\n")
        return plan
    console.print(table(plan))
    for line in summary(plan, written, out):
        console.print(line, highlight=False)
    return plan


def table(plan: Plan) -> Table:
    """One row per pool: replicas, batching, weight, cost, predicted and simulated p99."""
    t = Table(title=f"plan: ${plan.usd_per_hour:.2f}/h, ${plan.usd_per_million:.3f} per million inferences")
    for col in ("model", "build", "SKU", "market", "replicas", "batch", "delay us", "weight", "$/h",
                "p99 predicted ms", "p99 simulated ms", "SLA ms"):
        t.add_column(col, justify="right" if col[0] in "rbdw$pS" and col not in ("build", "SKU") else "left")
    sla = {m.model: m.p99_sla_ms for m in plan.models}
    for p in plan.pools:
        t.add_row(p.model, f"{p.backend} {p.precision or ''}".strip(), p.sku, p.market, str(p.replicas),
                  str(p.max_batch), str(p.queue_delay_us), f"{p.weight:.2f}", f"{p.usd_per_hour:.2f}",
                  "overloaded" if p.predicted_p99_ms is None else f"{p.predicted_p99_ms:.1f}",
                  f"{p.simulated_p99_ms:.1f}", f"{sla[p.model]:g}")
    return t


def summary(plan: Plan, written: list[Path], out: Path | None = None) -> list[str]:
    """The lines under the table: what binds, what was excluded, what-if, files written."""
    lines = [f"SKUs: {', '.join(plan.skus)}; derate rounds: {plan.derate_rounds}; solver {plan.solve_seconds:.2f} s"]
    if plan.what_if and plan.baseline_usd_per_hour is not None:
        lines.append(f"what-if {plan.what_if}: ${plan.usd_per_hour:.2f}/h against ${plan.baseline_usd_per_hour:.2f}/h")
    for b in plan.binding:
        what = "without it the plan saves" if b.constraint == "n-plus-one" else "one more unit saves"
        saved = "" if b.usd_per_hour_saved_by_one_more is None else \
            f" ({what} ${b.usd_per_hour_saved_by_one_more:.2f}/h)"
        lines.append(f"binding {b.constraint} {b.subject}: {b.detail}{saved}")
    lines += [f"excluded: {e}" for e in plan.excluded]
    if written:
        lines.append(f"wrote {len(written)} Kubernetes files under {out}")
    return lines
