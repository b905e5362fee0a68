"""``mlopt manifest show|schema`` and ``mlopt recipe schema``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mlopt.cli.guard import guard, out
from mlopt.cli.options import AsJson
from mlopt.cli.summary import build_table, gates_summary

manifest_app = typer.Typer(help="Read manifests and print their JSON Schema.", no_args_is_help=True)
recipe_app = typer.Typer(help="Recipe tools.", no_args_is_help=True)


@manifest_app.command("show")
@guard
def manifest_show(path: Path, as_json: AsJson = False) -> None:
    """Validate a manifest against its schema and show it as a table."""
    from mlopt.manifest import read_manifest

    m = read_manifest(path)
    if as_json:
        typer.echo(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    out.print(f"manifest schema {m.schema_version}, mlopt {m.mlopt_version}, {m.created}, status {m.status}")
    if m.matrix is not None:
        from mlopt.matrix.progress import summary_table

        out.print(summary_table(m.matrix))
        out.print("per-task details: the manifests under tasks/ beside this one", style="dim")
    elif m.models:
        build_table(m)
    gates_summary(m)


@manifest_app.command("schema")
def manifest_schema_cmd() -> None:
    """The manifest's JSON Schema."""
    from mlopt.manifest import SCHEMA_FILE

    typer.echo(SCHEMA_FILE.read_text(), nl=False)


@recipe_app.command("schema")
def recipe_schema_cmd() -> None:
    """The recipe's JSON Schema."""
    from mlopt.recipes.schema import Recipe

    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))
