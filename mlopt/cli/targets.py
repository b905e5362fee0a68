"""``mlopt targets [show SKU]`` (the SKU catalog) and ``mlopt doctor`` (this machine against it)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from mlopt.cli.guard import guard, out
from mlopt.cli.options import AsJson, CatalogOver

targets_app = typer.Typer(help="The SKU catalog: `mlopt targets` lists it, `mlopt targets show h100` shows one SKU.")


@targets_app.callback(invoke_without_command=True)
@guard
def targets_cmd(ctx: typer.Context, catalog: CatalogOver = None, as_json: AsJson = False) -> None:
    """The SKU catalog as a table."""
    if ctx.invoked_subcommand is not None:
        return
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.show import catalog_table, here_rows

    cat = load_catalog(catalog)
    here = here_rows(cat)
    if as_json:
        typer.echo(json.dumps({**cat.model_dump(mode="json"), "here": here}, indent=2))
        return
    out.print(catalog_table(cat, here))
    host = next((n for n, r in here.items() if r["host"]), None)
    out.print(f"target 'host' is {host} on this machine" if host else
              "no catalog CPU SKU runs on this machine: add one with --catalog FILE")


@targets_app.command("show")
@guard
def targets_show(name: str = typer.Argument(..., help="SKU name or alias, e.g. h100."),
                 catalog: CatalogOver = None, as_json: AsJson = False) -> None:
    """Everything the catalog says about one SKU, and what this machine can build for it."""
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.detect import get_target
    from mlopt.targets.show import availability_rows, sku_rows

    sku = get_target(load_catalog(catalog), name)
    rows = availability_rows(sku)
    if as_json:
        typer.echo(json.dumps({**sku.model_dump(mode="json"), "here": rows}, indent=2))
        return
    t = Table(title=f"{sku.name}: {sku.description}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in sku_rows(sku):
        t.add_row(k, v)
    out.print(t)
    b = Table(title="backends on this machine")
    for col in ("backend", "build", "runs here", "why"):
        b.add_column(col)
    for r in rows:
        b.add_row(r["backend"], r["build"], "yes" if r["run"] else "no", r["reason"])
    out.print(b)


@guard
def doctor_cmd(
    catalog: CatalogOver = None,
    sku: Optional[str] = typer.Option(None, "--sku", help="Check this machine against one SKU: exit 4 when its "
                                                          "device is absent or a requirement fails."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document to stdout."),
) -> None:
    """What this machine has (GPUs, drivers, runtimes, toolchains), matched to catalog SKUs with every
    requirement checked. Exit 4 when a GPU here misses a requirement of its SKU (the fix is printed)."""
    from mlopt.targets import doctor
    from mlopt.targets.catalog import load_catalog

    report = doctor.diagnose(load_catalog(catalog), doctor.environment(), sku)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        doctor.render(report, out)
    doctor.raise_for(report)

