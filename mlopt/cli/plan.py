"""``mlopt plan``: the cheapest mix of pools meeting every p99 SLA (one call of ``plan_command``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlopt.cli.guard import guard, out

Manifests = Annotated[list[Path], typer.Option("--manifest", help="A benchmark manifest (repeat for several).")]
FleetFile = Annotated[Path, typer.Option("--fleet", help="fleet.yaml: units and prices per SKU "
                                                         "(schema mlopt/plan/schemas/fleet.schema.json).")]
TrafficFile = Annotated[Path, typer.Option("--traffic", help="traffic.yaml: rates, p99 SLA and class per model "
                                                             "(schema mlopt/plan/schemas/traffic.schema.json).")]
OutDir = Annotated[Optional[Path], typer.Option("--out", help="Write the Kubernetes files here.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the plan as JSON (schema mlopt/plan/schemas/plan.schema.json).")]
WhatIf = Annotated[Optional[str], typer.Option("--what-if", help="rate=1.5 (rates x1.5), sla=0.8 (SLAs x0.8) or "
                                                                 "remove=SKU; the plan is compared with the one without.")]
Placeholder = Annotated[bool, typer.Option("--placeholder-images", help="Write a placeholder image (an invalid "
                                                                        "registry) for builds without a pushed image.")]


@guard
def plan_cmd(manifest: Manifests, fleet: FleetFile, traffic: TrafficFile, out_dir: OutDir = None,
             as_json: AsJson = False, what_if: WhatIf = None, placeholder: Placeholder = False) -> None:
    """For this traffic and fleet, the cheapest pools (model, build, SKU, replicas) whose simulated p99
    meets every SLA. Exit 2 when no plan can, naming the binding constraint."""
    from mlopt.plan.command import plan_command

    plan_command(manifest, fleet, traffic, out_dir, as_json, what_if, console=out, placeholder=placeholder)
