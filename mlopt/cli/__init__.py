"""The ``mlopt`` command: a thin typer + rich adapter over library functions.

    guard      the consoles and the one decorator that turns errors into a message and an exit code
    options    shared options and the flag table (each compile/diff flag: its recipe field and parser)
    compile    ``mlopt compile``: the flags made into a recipe, one call of ``pipeline.compile``
    diff       ``mlopt diff``;  matrix: ``mlopt build-matrix``;  targets: ``mlopt targets``, ``doctor``
    artifacts  ``mlopt artifacts``;  manifest: ``mlopt manifest``, ``recipe``;  summary: their tables
    image      ``mlopt image`` and ``mlopt export``;  plan: ``mlopt plan`` (``mlopt.plan.command``)
    measure    ``mlopt measure``: a manifest's builds measured on a machine of their SKU (``compiler.remeasure``)

Heavy libraries (torch, TVM, ONNX Runtime) are imported inside commands, so ``mlopt --help`` stays fast.
"""

from __future__ import annotations

import typer

from mlopt.cli import artifacts, diff, image, manifest, matrix, measure, plan, targets
from mlopt.cli import compile as compile_
from mlopt.cli.guard import STATE
from mlopt.core.errors import EXIT_CODES

EPILOG = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."
app = typer.Typer(help="Compile PyTorch and ONNX models into measured, versioned builds for every SKU.",
                  epilog=EPILOG, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(artifacts.artifacts_app, name="artifacts")
app.add_typer(manifest.manifest_app, name="manifest")
app.add_typer(manifest.recipe_app, name="recipe")
app.add_typer(image.image_app, name="image")
app.add_typer(image.export_app, name="export")
app.command("compile")(compile_.compile_cmd)
app.command("diff")(diff.diff_cmd)
app.command("build-matrix")(matrix.build_matrix_cmd)
app.add_typer(targets.targets_app, name="targets")
app.command("doctor")(targets.doctor_cmd)
app.command("measure")(measure.measure_cmd)
app.command("plan")(plan.plan_cmd)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    STATE["debug"] = debug


def main() -> None:
    app()
