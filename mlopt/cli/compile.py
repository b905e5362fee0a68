"""``mlopt compile``: the flags made into a recipe (``mlopt.cli.options.COMPILE_FLAGS``), and one call
of ``mlopt.compiler.pipeline.compile``, which builds, publishes when asked, and writes the manifest."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mlopt.cli.guard import err, guard, out
from mlopt.cli.options import COMPILE_FLAGS, overrides, with_flags
from mlopt.cli.summary import build_table, gates_summary
from mlopt.core.errors import RecipeError

Source = Annotated[str, typer.Argument(help="A recipe (.yaml), an ONNX file, a .pt2 file, or module.py:factory.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe as YAML and stop.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")]


@guard
@with_flags(COMPILE_FLAGS)
def compile_cmd(source: Source, *, flags: dict[str, Any], dry_run: DryRun = False, as_json: AsJson = False) -> int:
    """Build, validate, measure and store a model for each target SKU; write a manifest."""
    recipe = make_recipe(source, overrides(COMPILE_FLAGS, flags))
    if dry_run:
        from mlopt.recipes import dump_recipe

        typer.echo(dump_recipe(recipe), nl=False)
        return 0
    result = _compile(recipe, as_json)
    if as_json:
        typer.echo(json.dumps(result.manifest.model_dump(mode="json"), indent=2))
    else:
        build_table(result.manifest)
        gates_summary(result.manifest)
        out.print(f"manifest: {result.manifest_path}")
    for w in result.manifest.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    for e in result.manifest.errors:
        err.print(f"[red]failed:[/] {e}", highlight=False)
    if result.error is not None:  # the build was reported above; publishing its images failed
        raise result.error
    return result.exit_code


def _compile(recipe: Any, as_json: bool) -> Any:
    """The library's compile, its log on the console (stderr with --json, so stdout carries only the manifest)."""
    from mlopt.compiler.pipeline import compile
    from mlopt.core.util import stdout_to_stderr
    from mlopt.store import Store

    store = Store(recipe.store)
    console = err if as_json else out
    with console.status(f"compiling {recipe.name} ...", spinner="dots") as status:
        def log(message: str) -> None:
            console.print(message, highlight=False, markup=False)
            if message.startswith("[stage] "):
                status.update(f"compiling {recipe.name}: {message[8:]} ...")

        with stdout_to_stderr() if as_json else contextlib.nullcontext():
            return compile(recipe, store, log)


def make_recipe(source: str, fields: dict[str, Any]) -> Any:
    """The recipe a source names (a recipe file, a model file or a factory), with the flags' fields over it."""
    from mlopt.core.files import deep_merge
    from mlopt.recipes import load_recipe, recipe_from_dict

    if source.endswith((".yaml", ".yml")):
        return load_recipe(source, fields)
    path = Path(source)
    if not source.endswith((".onnx", ".pt2")) and ":" not in source:
        raise RecipeError(f"{source!r} is not a recipe (.yaml), a model (.onnx, .pt2) or a 'module:function' factory")
    base = {"name": _name_from(path), "model": {"source": str(path.resolve()) if path.suffix else source}}
    recipe = recipe_from_dict(deep_merge(base, fields), where="flags")
    return recipe.resolve_paths(Path.cwd())


def _name_from(path: Path) -> str:
    stem = path.stem if path.suffix else path.name.rpartition(":")[2]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "model"
