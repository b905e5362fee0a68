"""The ``mlopt`` command: a thin typer + rich adapter over library functions.

Only this module turns ``MloptError`` into messages and exit codes. Heavy libraries (torch, TVM,
ONNX Runtime) are imported inside commands, so ``mlopt --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlopt.core.errors import EXIT_CODES, MloptError, RecipeError

EPILOG = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."
app = typer.Typer(help="Compile PyTorch and ONNX models into measured, versioned builds for every SKU.",
                  epilog=EPILOG, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
artifacts_app = typer.Typer(help="Inspect and maintain the artifact store.", no_args_is_help=True)
manifest_app = typer.Typer(help="Read manifests and print their JSON Schema.", no_args_is_help=True)
recipe_app = typer.Typer(help="Recipe tools.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(manifest_app, name="manifest")
app.add_typer(recipe_app, name="recipe")
from mlopt.cli_image import export_app, image_app  # noqa: E402  (its commands use this module's guarded)

app.add_typer(image_app, name="image")
app.add_typer(export_app, name="export")

# Wide enough for the summary table when output goes to a file or a CI log.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    STATE["debug"] = debug


def guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn errors into one message and the documented exit code."""
    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:  # Ctrl-C: store writes are atomic (temp folder, then rename), so none is half-done
        _debug_traceback()
        err.print("interrupted", highlight=False)
        raise typer.Exit(130)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            _fail(f"unexpected {type(e).__name__}: {e}", "run again with --debug for the traceback", 1)
        from mlopt.core.errors import disk_full

        full = disk_full(e)  # a full disk is the user's to fix, wherever the write was
        _fail(full.message, full.hint, full.exit_code)
    except MloptError as e:
        _fail(e.message, e.hint, e.exit_code)
    except Exception as e:  # an unexpected failure (a bug): one line, the traceback with --debug
        _fail(f"unexpected {type(e).__name__}: {e}", "run again with --debug for the traceback", 1)


def _debug_traceback() -> None:
    if STATE["debug"]:
        traceback.print_exc()


def _fail(message: str, hint: str | None, code: int) -> None:
    _debug_traceback()
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err.print(f"[yellow]hint:[/] {hint}", highlight=False)
    raise typer.Exit(code)


# ------------------------------------------------------------------ compile


def parse_input(spec: str) -> dict[str, Any]:
    """'name:1x3x224x224[:dtype]' (a non-number dimension names a dynamic axis) -> InputSpec fields."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise RecipeError(f"--input {spec!r} must look like name:1x3x224x224 or name:batchx128:int64")
    dims = [int(d) if d.isdigit() else d for d in parts[1].split("x")]
    return {"name": parts[0], "shape": dims, **({"dtype": parts[2]} if len(parts) == 3 else {})}


def compile_overrides(**f: Any) -> dict[str, Any]:
    """Map compile's flags onto recipe fields (only the flags that were given)."""
    o: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if f["inputs"]:
        model["inputs"] = [parse_input(s) for s in f["inputs"]]
    if f["model_name"]:
        model["name"] = f["model_name"]
    if model:
        o["model"] = model
    if f["targets"]:
        o["targets"] = [t.strip() for spec in f["targets"] for t in spec.split(",") if t.strip()]
    if f["backends"]:
        o["backends"] = [b.strip() for spec in f["backends"] for b in spec.split(",") if b.strip()]
    if f["passes"]:
        o["passes"] = [{"kind": p} for p in f["passes"]]
    # paths given as flags are relative to the working directory (recipe paths: to the recipe's folder)
    for key, field in (("out", "output"), ("store", "store"), ("catalog", "catalog")):
        if f[key]:
            o[field] = str(Path(f[key]).expanduser().resolve())
    bench = {k: v for k, v in (("runs", f["runs"]), ("warmup", f["warmup"]), ("threads", f["threads"])) if v is not None}
    if f["batch_sizes"]:
        bench["batch_sizes"] = _ints(f["batch_sizes"], "--batch-sizes")
    if bench:
        o["benchmark"] = bench
    if f["trials"] is not None:
        o["tuning"] = {"trials": f["trials"]}
    acc = {k: v for k, v in (("max_drop", f["max_drop"]), ("on_violation", f["on_violation"])) if v is not None}
    if acc:
        o["accuracy"] = acc
    data = {}
    from mlopt.recipes.schema import resolve_source

    if f["eval_data"]:
        data["evaluation"] = {"source": resolve_source(f["eval_data"], Path.cwd()),
                              **({"metric": f["metric"]} if f["metric"] else {})}
    if f["calib_data"]:
        data["calibration"] = {"source": resolve_source(f["calib_data"], Path.cwd())}
    if data:
        o["data"] = data
    from mlopt.core.refs import absolute_oci

    image = {k: v for k, v in (("push", f["push"] or None), ("registry", f["registry"]),
                                ("base_image", absolute_oci(f["base_image"]))) if v is not None}
    if image:
        o["image"] = image
    gates = gate_overrides(f)
    if gates:
        o["gates"] = gates
    return o


def gate_overrides(f: dict[str, Any]) -> dict[str, Any]:
    """compile's gate flags -> recipe ``gates`` fields; a baseline file path is made absolute (flags are
    relative to the working directory, recipe paths to the recipe)."""
    from mlopt.gates import is_url

    baseline = f.get("baseline")
    if baseline and not is_url(baseline):
        baseline = str(Path(baseline).expanduser().resolve())
    pairs = (("baseline", baseline), ("latency_regression", f.get("gate_latency")),
             ("throughput_drop", f.get("gate_throughput")), ("accuracy_drop", f.get("gate_accuracy")),
             ("size_growth", f.get("gate_size")), ("noise_k", f.get("gate_noise_k")), ("strict", f.get("strict_gates")))
    return {k: v for k, v in pairs if v is not None}


def _check_gate_flags(given: dict[str, Any]) -> None:
    """The gate flags obey the recipe's rules (``gates:``): a bad value is exit 2, as in compile."""
    from pydantic import ValidationError

    from mlopt.recipes.schema import Gates

    try:
        Gates(**given)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(f"--gate flag {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"{flag} {text!r} must be comma-separated integers, e.g. 1,8,32") from None


def make_recipe(source: str, overrides: dict[str, Any]) -> Any:
    from mlopt.recipes import load_recipe, recipe_from_dict
    from mlopt.core.files import deep_merge

    if source.endswith((".yaml", ".yml")):
        return load_recipe(source, overrides)
    path = Path(source)
    if not source.endswith((".onnx", ".pt2")) and ":" not in source:
        raise RecipeError(f"{source!r} is not a recipe (.yaml), a model (.onnx, .pt2) or a 'module:function' factory")
    base = {"name": _name_from(path), "model": {"source": str(path.resolve()) if path.suffix else source}}
    recipe = recipe_from_dict(deep_merge(base, overrides), where="flags")
    return recipe.resolve_paths(Path.cwd())


def _name_from(path: Path) -> str:
    stem = path.stem if path.suffix else path.name.rpartition(":")[2]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "model"


@app.command("compile")
def compile_cmd(
    source: str = typer.Argument(..., help="A recipe (.yaml), an ONNX file, a .pt2 file, or module.py:factory."),
    inputs: list[str] = typer.Option([], "--input", "-i", help="Input signature name:1x3x224x224[:dtype] (repeat)."),
    targets: list[str] = typer.Option([], "--target", "-t", help="SKU names (repeat or comma-separated); 'host' is the best CPU SKU this machine runs."),
    backends: list[str] = typer.Option([], "--backend", "-b", help="Restrict to these backends."),
    passes: list[str] = typer.Option([], "--pass", "-p", help="Pass kinds to run, in order (replaces the recipe's)."),
    model_name: Optional[str] = typer.Option(None, "--name", help="Model name in the store."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory for the manifest."),
    store: Optional[Path] = typer.Option(
        None, "--store", help="Artifact store folder (over the recipe's store, then $MLOPT_STORE)."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="A SKU catalog file."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Benchmark batch sizes, e.g. 1,8."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed runs per batch size."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warm-up runs per batch size."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads used while measuring."),
    trials: Optional[int] = typer.Option(None, "--trials", help="MetaSchedule tuning trials for TVM builds."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Accuracy budget: largest allowed drop."),
    on_violation: Optional[str] = typer.Option(None, "--on-violation", help="fail or skip a pass over budget."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Evaluation data: .npz or module:function."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Evaluation metric."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration data: .npz or module:function."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="Gate against this manifest (a path or an http(s):// / file:// URL): exit 6 when a "
                                 "gate breaks."),
    gate_latency: Optional[float] = typer.Option(None, "--gate-latency", help="Largest p50 growth, e.g. 0.10."),
    gate_throughput: Optional[float] = typer.Option(None, "--gate-throughput", help="Largest throughput drop."),
    gate_accuracy: Optional[float] = typer.Option(None, "--gate-accuracy", help="Largest metric drop vs the baseline."),
    gate_size: Optional[float] = typer.Option(None, "--gate-size", help="Largest artifact size growth, e.g. 0.10."),
    gate_noise_k: Optional[float] = typer.Option(None, "--gate-noise-k", help="Noise band width in combined IQRs."),
    strict_gates: Optional[bool] = typer.Option(
        None, "--strict-gates/--lenient-gates", help="Fail (or only warn) on inconclusive latency verdicts."),
    push: bool = typer.Option(False, "--push", help="Then build each SKU's OCI image and push it (image.push)."),
    registry: Optional[str] = typer.Option(None, "--registry", help="Registry repository HOST/REPO (image.registry)."),
    base_image: Optional[str] = typer.Option(
        None, "--base-image", help="Base image for every SKU: HOST/REPO:TAG, ...@sha256:..., or oci:PATH[:TAG] "
                                   "(image.base_image)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe as YAML and stop."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
) -> None:
    """Build, validate, measure and store a model for each target SKU; write a manifest."""
    flags = dict(inputs=inputs, targets=targets, backends=backends, passes=passes, model_name=model_name,
                 out=out_dir, store=store, catalog=catalog, batch_sizes=batch_sizes, runs=runs, warmup=warmup,
                 threads=threads, trials=trials, max_drop=max_drop, on_violation=on_violation,
                 eval_data=eval_data, metric=metric, calib_data=calib_data, baseline=baseline,
                 gate_latency=gate_latency, gate_throughput=gate_throughput, gate_accuracy=gate_accuracy,
                 gate_size=gate_size, gate_noise_k=gate_noise_k, strict_gates=strict_gates,
                 push=push, registry=registry, base_image=base_image)

    def go() -> int:
        recipe = make_recipe(source, compile_overrides(**flags))
        if dry_run:
            from mlopt.recipes import dump_recipe

            typer.echo(dump_recipe(recipe), nl=False)
            return 0
        from mlopt.compiler.pipeline import compile
        from mlopt.store import Store
        from mlopt.core.util import stdout_to_stderr

        st = Store(recipe.store)
        console = err if as_json else out  # with --json, stdout carries only the manifest
        with console.status(f"compiling {recipe.name} ...", spinner="dots") as status:
            def log(message: str) -> None:
                console.print(message, highlight=False, markup=False)
                if message.startswith("[stage] "):
                    status.update(f"compiling {recipe.name}: {message[8:]} ...")

            with stdout_to_stderr() if as_json else contextlib.nullcontext():
                result = compile(recipe, st, log)
        if as_json:
            typer.echo(json.dumps(result.manifest.model_dump(mode="json"), indent=2))
        else:
            _summary(result.manifest)
            _gates_summary(result.manifest)
            out.print(f"manifest: {result.manifest_path}")
        for e in result.manifest.errors:
            err.print(f"[red]failed:[/] {e}", highlight=False)
        if result.error is not None:  # the build was reported above; publishing its images failed
            raise result.error
        return result.exit_code

    raise typer.Exit(guarded(go))


def _summary(m: Any) -> None:
    t = Table(title=f"{m.models[0].name} v{m.models[0].version}")
    for col in ("SKU", "backend", "status", "built", "validation", "p50 ms by batch", "best thr/s", "accuracy",
                "$/M inf", "artifact"):
        t.add_column(col)
    for e in m.entries:
        for c in e.candidates:
            meas = c.measurement
            lat = " ".join(f"b{b.batch_size}:{b.p50_ms:.2f}" for b in meas.batches) if meas else "-"
            thr = f"{max(b.throughput_per_s or 0 for b in meas.batches):.1f}" if meas else "-"
            acc = f"{meas.accuracy.value:.4f}" if meas and meas.accuracy else "-"
            chosen = c.backend == e.chosen_backend
            cost = f"{e.cost.usd_per_million:.4f}" if chosen and e.cost else "-"
            built = f"{c.compiled or '-'}{' (cached)' if c.cached else ''}" if c.status == "built" else "-"
            status = c.status + (" *" if chosen else "")
            t.add_row(e.sku + (" (host)" if e.requested_as == "host" else ""), c.backend, status, built, c.validation.status if c.validation else "-", lat, thr, acc,
                      cost, c.artifact.key[:12] if c.artifact else (c.reason[:40] or "-"))
    out.print(t)
    out.print("* the SKU's chosen build", style="dim")
    host = next((e.sku for e in m.entries if e.requested_as == "host"), None)
    if host:
        out.print(f"target 'host' is {host} on this machine ({m.host.cpu}); builds for SKUs it cannot run are "
                  "cross-compiled and carry no figures", highlight=False)


def _gates_summary(m: Any) -> None:
    """The gate table and its warnings, when the build was gated against a baseline."""
    if m.gates is None:
        return
    from mlopt.diff import gate_table

    out.print(gate_table(m.gates))
    for w in m.gates.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)


# ------------------------------------------------------------------ diff


@app.command("diff")
def diff_cmd(
    old: str = typer.Argument(..., help="The baseline manifest: a path or an http(s):// / file:// URL."),
    new: str = typer.Argument(..., help="The new manifest: a path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the diff as JSON (format mlopt-diff/1)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print GitHub-flavoured Markdown (for a PR comment)."),
    fail_on_gates: bool = typer.Option(False, "--fail-on-gates", help="Exit 6 when a gate fails."),
    gate_latency: Optional[float] = typer.Option(None, "--gate-latency", help="Largest p50 growth, e.g. 0.10."),
    gate_throughput: Optional[float] = typer.Option(None, "--gate-throughput", help="Largest throughput drop."),
    gate_accuracy: Optional[float] = typer.Option(None, "--gate-accuracy", help="Largest metric drop."),
    gate_size: Optional[float] = typer.Option(None, "--gate-size", help="Largest artifact size growth."),
    gate_noise_k: Optional[float] = typer.Option(None, "--gate-noise-k", help="Noise band width in combined IQRs."),
    strict_gates: Optional[bool] = typer.Option(None, "--strict-gates/--lenient-gates",
                                                help="Fail (or only warn) on inconclusive latency verdicts."),
) -> None:
    """What changed per SKU between two manifests (backend, figures, digests) with the gate verdicts.
    Limits default to those NEW was gated with, else the recipe defaults. Exit 0 unless --fail-on-gates."""
    flags = dict(latency_regression=gate_latency, throughput_drop=gate_throughput, accuracy_drop=gate_accuracy,
                 size_growth=gate_size, noise_k=gate_noise_k, strict=strict_gates)

    def go() -> None:
        from mlopt.diff import default_limits, diff_manifests, diff_table, to_markdown
        from mlopt.core.errors import GateFailed
        from mlopt.gates import load_manifest_ref
        from mlopt.manifest import GateLimits

        a, b = load_manifest_ref(old, "old manifest"), load_manifest_ref(new, "new manifest")
        given = {k: v for k, v in flags.items() if v is not None}
        _check_gate_flags(given)
        limits = GateLimits.model_validate({**default_limits(b).model_dump(), **given})
        d = diff_manifests(a, b, limits, old, new)
        if as_json:
            typer.echo(json.dumps(d.model_dump(mode="json"), indent=2))
        elif markdown:
            typer.echo(to_markdown(d), nl=False)
        else:
            out.print(diff_table(d))
            for f in d.failures:
                out.print(f"[red]gate failed:[/] {f}", highlight=False)
            for w in d.warnings:
                out.print(f"[yellow]warning:[/] {w}", highlight=False)
        if fail_on_gates and d.verdict == "fail":
            raise GateFailed(f"{len(d.failures)} gate(s) failed: " + "; ".join(d.failures))
    guarded(go)


# ------------------------------------------------------------------ build-matrix


@app.command("build-matrix")
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
) -> None:
    """Build every recipe for every SKU, one parallel task each; a failed task does not stop the others,
    a rerun skips what the store holds, and one combined manifest is written."""
    def go() -> int:
        from mlopt.matrix import run_matrix
        from mlopt.matrix.progress import MatrixView, summary_table
        from mlopt.matrix.tasks import make_config
        from mlopt.core.util import stdout_to_stderr

        skus = None if not targets else "all" if targets.strip() == "all" else \
            [t.strip() for t in targets.split(",") if t.strip()]
        config = make_config(
            recipes=[str(r) for r in recipes], targets=skus, executor=executor, workers=workers, retries=retries,
            address=address, placement=placement, ship=ship, node_store=node_store,
            store=str(store) if store else None, out=str(out_dir) if out_dir else None,
            catalog=str(catalog) if catalog else None, image=image, namespace=namespace, use_ledger=not no_ledger)
        console = err if as_json else out
        with stdout_to_stderr() if as_json else contextlib.nullcontext():
            result = run_matrix(config, lambda tasks: MatrixView(tasks, err, f"build matrix ({config.executor})"))
        if result.manifest is None:  # k8s: the Jobs were written
            if as_json:
                typer.echo(json.dumps({"jobs": [str(p) for p in result.jobs]}, indent=2))
            else:
                for p in result.jobs:
                    out.print(str(p), highlight=False)
                out.print(f"{len(result.jobs)} Jobs written; submit them with kubectl apply -f {result.jobs[0].parent}")
            return 0
        if as_json:
            typer.echo(json.dumps(result.manifest.model_dump(mode="json"), indent=2))
        console.print(summary_table(result.manifest.matrix))
        console.print(f"manifest: {result.manifest_path}")
        for e in result.manifest.errors:
            err.print(f"[red]failed:[/] {e}", highlight=False)
        return result.exit_code

    raise typer.Exit(guarded(go))


# ------------------------------------------------------------------ targets and doctor


targets_app = typer.Typer(help="The SKU catalog: `mlopt targets` lists it, `mlopt targets show h100` shows one SKU.")
app.add_typer(targets_app, name="targets")
CatalogOpt = typer.Option(None, "--catalog", help="A SKU catalog file (extends the bundled one).")


@targets_app.callback(invoke_without_command=True)
def targets_cmd(ctx: typer.Context, catalog: Optional[Path] = CatalogOpt,
                as_json: bool = typer.Option(False, "--json")) -> None:
    """The SKU catalog as a table."""
    if ctx.invoked_subcommand is not None:
        return

    def go() -> None:
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
    guarded(go)


@targets_app.command("show")
def targets_show(name: str = typer.Argument(..., help="SKU name or alias, e.g. h100."),
                 catalog: Optional[Path] = CatalogOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Everything the catalog says about one SKU, and what this machine can build for it."""
    def go() -> None:
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
    guarded(go)


@app.command("doctor")
def doctor_cmd(
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="A SKU catalog file (extends the bundled one)."),
    sku: Optional[str] = typer.Option(None, "--sku", help="Check this machine against one SKU: exit 4 when its "
                                                          "device is absent or a requirement fails."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document to stdout."),
) -> None:
    """What this machine has (GPUs, drivers, runtimes, toolchains), matched to catalog SKUs with every
    requirement checked. Exit 4 when a GPU here misses a requirement of its SKU (the fix is printed)."""
    def go() -> None:
        from mlopt.targets import doctor
        from mlopt.targets.catalog import load_catalog

        report = doctor.diagnose(load_catalog(catalog), doctor.environment(), sku)
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2))
        else:
            doctor.render(report, out)
        doctor.raise_for(report)
    guarded(go)


# ------------------------------------------------------------------ artifacts


def _store(path: Optional[Path]) -> Any:
    from mlopt.store import Store

    return Store(path)


StoreOpt = typer.Option(None, "--store", envvar="MLOPT_STORE", help="Artifact store folder.")


@artifacts_app.command("list")
def artifacts_list(store: Optional[Path] = StoreOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stored artifacts by model and version."""
    def go() -> None:
        st = _store(store)
        rows = []
        for name, entry in st.models().items():
            for v in entry["versions"]:
                for key in v["artifacts"]:
                    art = st.get(key)
                    if art:
                        rows.append({"model": name, "version": v["version"], "id": key, "sku": art.meta["sku"],
                                     "backend": art.meta["backend"], "precision": art.meta["precision"],
                                     "bytes": sum(f["bytes"] for f in art.meta["files"].values()),
                                     "created": art.meta["created"]})
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        t = Table(title=f"artifacts in {st.root}")
        for col in ("id", "model", "version", "SKU", "backend", "precision", "size", "created"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["id"][:12], r["model"], f"v{r['version']}", r["sku"], r["backend"], r["precision"],
                      _size(r["bytes"]), r["created"])
        out.print(t)
    guarded(go)


@artifacts_app.command("show")
def artifacts_show(artifact_id: str, store: Optional[Path] = StoreOpt) -> None:
    """An artifact's metadata (files, digests, provenance) as JSON."""
    guarded(lambda: typer.echo(json.dumps({**_store(store).resolve(artifact_id).meta}, indent=2)))


@artifacts_app.command("verify")
def artifacts_verify(artifact_id: Optional[str] = typer.Argument(None, help="An id; all artifacts when omitted."),
                     store: Optional[Path] = StoreOpt) -> None:
    """Re-hash artifacts' files against their recorded digests (exit 2 when any is damaged)."""
    def go() -> int:
        st = _store(store)
        arts = [st.resolve(artifact_id)] if artifact_id else st.artifacts()
        bad = 0
        for art in arts:
            problems = st.verify(art)
            bad += bool(problems)
            out.print(f"{art.short} {'ok' if not problems else 'DAMAGED: ' + '; '.join(problems)}", highlight=False)
        out.print(f"{len(arts) - bad} ok, {bad} damaged")
        return 2 if bad else 0
    raise typer.Exit(guarded(go))


@artifacts_app.command("gc")
def artifacts_gc(store: Optional[Path] = StoreOpt,
                 keep_last: Optional[int] = typer.Option(None, "--keep-last", min=0, help="Versions to keep per model."),
                 damaged: bool = typer.Option(False, "--damaged", help="Also remove artifacts that fail verification.")) -> None:
    """Remove unreferenced objects, stale temp folders, and old versions beyond --keep-last."""
    def go() -> None:
        removed = _store(store).gc(keep_last=keep_last, damaged=damaged)
        out.print(", ".join(f"{v} {k}" for k, v in removed.items()) + " removed")
    guarded(go)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------ manifest and recipe


@manifest_app.command("show")
def manifest_show(path: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Validate a manifest against its schema and show it as a table."""
    def go() -> None:
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
            _summary(m)
        _gates_summary(m)
    guarded(go)


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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
