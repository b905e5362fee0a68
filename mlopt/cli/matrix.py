"""``mlopt build-matrix``: every recipe for every SKU, one parallel task each (``mlopt.matrix``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Optional

import typer

from mlopt.cli.guard import err, guard, out


@guard
def build_matrix_cmd(
    recipes: list[Path] = typer.Argument(..., help="Recipe files (.yaml)."),
    targets: Optional[str] = typer.Option(None, "--targets", "-t", help="SKUs for every recipe, comma-separated, "
                                                                        "or 'all' (default: each recipe's own)."),
    executor: str = typer.Option("local", "--executor", "-e", help="local (processes here), ray (a Ray cluster) "
                                                                   "or k8s (write Kubernetes Jobs)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Tasks at a time: local processes, or the "
                                                                        "CPUs of a local Ray cluster (default: cores)."),
    retries: Optional[int] = typer.Option(None, "--retries", help="Extra attempts for a task whose worker died (1)."),
    address: Optional[str] = typer.Option(None, "--address", help="ray: an existing cluster (default: start one here)."),
    placement: Optional[str] = typer.Option(None, "--placement", help="GPU-SKU tasks on their device: auto (when "
                                                                      "the cluster has it), device, or anywhere."),
    ship: Optional[bool] = typer.Option(None, "--ship/--shared-store", help="ray: nodes build into their own store "
                                        "and send the artifacts back (default with --address), or share --store."),
    node_store: Optional[str] = typer.Option(None, "--node-store", help="ray with --ship: the store on the nodes."),
    store: Optional[Path] = typer.Option(None, "--store", help="Artifact store folder (over the recipes', then "
                                                               "$MLOPT_STORE)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder of the combined manifest (out/matrix)."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="A SKU catalog file, over the recipes'."),
    image: Optional[str] = typer.Option(None, "--image", help="k8s: the image that runs mlopt."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="k8s: namespace of the Jobs (default)."),
    no_ledger: bool = typer.Option(False, "--no-ledger", help="Dispatch every task, even those recorded as done "
                                                              "(their builds still come from the store)."),
    as_json: bool = typer.Option(False, "--json", help="Print the combined manifest as JSON on stdout."),
) -> int:
    """Build every recipe for every SKU, one parallel task each; a failed task does not stop the others,
    a rerun skips what the store holds, and one combined manifest is written."""
    from mlopt.matrix.tasks import make_config

    skus = None if not targets else "all" if targets.strip() == "all" else \
        [t.strip() for t in targets.split(",") if t.strip()]
    config = make_config(
        recipes=[str(r) for r in recipes], targets=skus, executor=executor, workers=workers, retries=retries,
        address=address, placement=placement, ship=ship, node_store=node_store,
        store=str(store) if store else None, out=str(out_dir) if out_dir else None,
        catalog=str(catalog) if catalog else None, image=image, namespace=namespace, use_ledger=not no_ledger)
    return _run(config, as_json)


def _run(config: Any, as_json: bool) -> int:
    from mlopt.core.util import stdout_to_stderr
    from mlopt.matrix import run_matrix
    from mlopt.matrix.progress import MatrixView, summary_table

    console = err if as_json else out
    with stdout_to_stderr() if as_json else contextlib.nullcontext():
        result = run_matrix(config, lambda tasks: MatrixView(tasks, err, f"build matrix ({config.executor})"))
    if result.manifest is None:  # k8s: the Jobs were written
        _jobs(result.jobs, as_json)
        return 0
    if as_json:
        typer.echo(json.dumps(result.manifest.model_dump(mode="json"), indent=2))
    console.print(summary_table(result.manifest.matrix))
    console.print(f"manifest: {result.manifest_path}")
    for e in result.manifest.errors:
        err.print(f"[red]failed:[/] {e}", highlight=False)
    return result.exit_code


def _jobs(jobs: list[Path], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"jobs": [str(p) for p in jobs]}, indent=2))
        return
    for p in jobs:
        out.print(str(p), highlight=False)
    out.print(f"{len(jobs)} Jobs written; submit them with kubectl apply -f {jobs[0].parent}")
