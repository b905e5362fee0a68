"""``mlopt measure``: on a machine of the SKU, validate and measure the manifest's cross-compiled and
on-device builds for it and merge the figures (one call of ``mlopt.compiler.remeasure.measure_manifest``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlopt.cli.guard import err, guard, out
from mlopt.cli.options import Catalog
from mlopt.cli.summary import build_table

StoreFolder = Annotated[Optional[Path], typer.Option("--store", envvar="MLOPT_STORE", help="Artifact store holding "
                                                    "the builds (default: the store the manifest names).")]
ManifestFile = Annotated[Path, typer.Argument(help="The manifest.json `mlopt compile` wrote.")]
SkuName = Annotated[str, typer.Option("--sku", help="The SKU this machine is (its builds are measured here).")]
OutFile = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the manifest here (default: in place).")]
Remeasure = Annotated[bool, typer.Option("--remeasure", help="Also measure again builds that already have figures.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")]


@guard
def measure_cmd(manifest: ManifestFile, sku: SkuName, store: StoreFolder = None, catalog: Catalog = None,
                out_file: OutFile = None, remeasure: Remeasure = False, as_json: AsJson = False) -> int:
    """Validate and measure a manifest's builds for SKU on this machine (a machine of that SKU), exactly as
    `compile` would there; merge the figures with their provenance and choose the SKU's build again.
    Exit 4 when this machine cannot run the SKU."""
    from mlopt.compiler.remeasure import MeasureRequest, measure_manifest
    from mlopt.core.util import stdout_to_stderr

    req = MeasureRequest(manifest=manifest, sku=sku, store=store, catalog=catalog, out=out_file, remeasure=remeasure)
    console = err if as_json else out
    log = lambda message: console.print(message, highlight=False, markup=False)  # noqa: E731
    with stdout_to_stderr() if as_json else contextlib.nullcontext():
        result = measure_manifest(req, log)
    if as_json:
        typer.echo(json.dumps(result.manifest.model_dump(mode="json"), indent=2))
    else:
        build_table(result.manifest, {result.sku})
        out.print(f"manifest: {result.path}" if result.path else "nothing to measure; the manifest is unchanged")
    for backend, why in result.unmeasured.items():
        err.print(f"[yellow]not measured:[/] {backend}: {why}", highlight=False)
    return result.exit_code

