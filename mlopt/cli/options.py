"""Options shared by several commands, and the flag table: each ``compile`` (and ``diff``) flag declared
once, as (parameter, option names, recipe field, help, type, parse), from which both the command's
signature and the recipe overrides are made.

Flags given on the command line are relative to the working directory (recipe paths: to the recipe's
folder), so the parse functions of path flags make them absolute.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from mlopt.core.errors import RecipeError

AsJson = Annotated[bool, typer.Option("--json")]
Catalog = Annotated[Optional[Path], typer.Option("--catalog", help="A SKU catalog file.")]
CatalogOver = Annotated[Optional[Path], typer.Option("--catalog", help="A SKU catalog file (extends the bundled one).")]
StoreFolder = Annotated[Optional[Path], typer.Option("--store", envvar="MLOPT_STORE", help="Artifact store folder.")]
Skus = Annotated[list[str], typer.Option("--sku", help="Only these SKUs (repeat).")]


@dataclass(frozen=True)
class Flag:
    """One flag: the command's parameter, its option names, the recipe field (a dotted path) its value
    goes to, how the value is parsed on the way, and its help. ``requires`` names a flag without which
    this one is ignored (``--metric`` only goes with ``--eval-data``)."""

    name: str
    decls: tuple[str, ...]
    field: str
    help: str
    type: Any = Optional[str]
    default: Any = None
    parse: Callable[[Any], Any] = lambda v: v
    requires: str | None = None

    def parameter(self) -> inspect.Parameter:
        return inspect.Parameter(self.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=self.type,
                                 default=typer.Option(self.default, *self.decls, help=self.help))

    def given(self, value: Any) -> bool:
        """Whether the flag was given: its value differs from the default (an empty text counts as not given)."""
        return value != self.default and value != ""


def with_flags(table: tuple[Flag, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command whose keyword-only ``flags`` parameter stands for the table's flags: they
    are declared in its place, and the command gets their values as one dict, ``flags``."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(command, eval_str=True)
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            params += [f.parameter() for f in table] if p.name == "flags" else \
                [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)]

        @functools.wraps(command)
        def with_table(**kwargs: Any) -> Any:
            flags = {f.name: kwargs.pop(f.name) for f in table}
            return command(**kwargs, flags=flags)

        with_table.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return with_table
    return decorate


def overrides(table: tuple[Flag, ...], values: dict[str, Any]) -> dict[str, Any]:
    """The recipe fields the given flags set, as a nested dict: ``{"benchmark": {"runs": 5}}``."""
    given = {f.name for f in table if f.given(values[f.name])}
    out: dict[str, Any] = {}
    for f in table:
        if f.name in given and (f.requires is None or f.requires in given):
            *parents, leaf = f.field.split(".")
            node = out
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = f.parse(values[f.name])
    return out


# ------------------------------------------------------------------ parse functions


def parse_input(spec: str) -> dict[str, Any]:
    """'name:1x3x224x224[:dtype]' (a non-number dimension names a dynamic axis) -> InputSpec fields."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise RecipeError(f"--input {spec!r} must look like name:1x3x224x224 or name:batchx128:int64")
    dims = [int(d) if d.isdigit() else d for d in parts[1].split("x")]
    return {"name": parts[0], "shape": dims, **({"dtype": parts[2]} if len(parts) == 3 else {})}


def _inputs(specs: list[str]) -> list[dict[str, Any]]:
    return [parse_input(s) for s in specs]


def _names(specs: list[str]) -> list[str]:
    """Repeated and comma-separated names, in order."""
    return [t.strip() for spec in specs for t in spec.split(",") if t.strip()]


def _passes(kinds: list[str]) -> list[dict[str, str]]:
    return [{"kind": p} for p in kinds]


def _path(p: Path) -> str:
    return str(Path(p).expanduser().resolve())


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"{flag} {text!r} must be comma-separated integers, e.g. 1,8,32") from None


def _source(text: str) -> str | None:
    from mlopt.recipes.schema import resolve_source

    return resolve_source(text, Path.cwd())


def _baseline(text: str) -> str:
    from mlopt.gates import is_url

    return text if is_url(text) else _path(Path(text))


def _oci(text: str) -> str | None:
    from mlopt.core.refs import absolute_oci

    return absolute_oci(text)


# ------------------------------------------------------------------ the tables

Num, Int, Paths = Optional[float], Optional[int], Optional[Path]

GATE_FLAGS = (
    Flag("gate_latency", ("--gate-latency",), "gates.latency_regression", "Largest p50 growth, e.g. 0.10.", Num),
    Flag("gate_throughput", ("--gate-throughput",), "gates.throughput_drop", "Largest throughput drop.", Num),
    Flag("gate_accuracy", ("--gate-accuracy",), "gates.accuracy_drop", "Largest metric drop vs the baseline.", Num),
    Flag("gate_size", ("--gate-size",), "gates.size_growth", "Largest artifact size growth, e.g. 0.10.", Num),
    Flag("gate_noise_k", ("--gate-noise-k",), "gates.noise_k", "Noise band width in combined IQRs.", Num),
    Flag("strict_gates", ("--strict-gates/--lenient-gates",), "gates.strict",
         "Fail (or only warn) on inconclusive latency verdicts.", Optional[bool]),
)

COMPILE_FLAGS = (
    Flag("inputs", ("--input", "-i"), "model.inputs", "Input signature name:1x3x224x224[:dtype] (repeat).",
         list[str], [], _inputs),
    Flag("targets", ("--target", "-t"), "targets", "SKU names (repeat or comma-separated); 'host' is the best CPU "
         "SKU this machine runs.", list[str], [], _names),
    Flag("backends", ("--backend", "-b"), "backends", "Restrict to these backends.", list[str], [], _names),
    Flag("passes", ("--pass", "-p"), "passes", "Pass kinds to run, in order (replaces the recipe's).",
         list[str], [], _passes),
    Flag("model_name", ("--name",), "model.name", "Model name in the store."),
    Flag("out_dir", ("--out", "-o"), "output", "Output directory for the manifest.", Paths, parse=_path),
    Flag("store", ("--store",), "store", "Artifact store folder (over the recipe's store, then $MLOPT_STORE).",
         Paths, parse=_path),
    Flag("catalog", ("--catalog",), "catalog", "A SKU catalog file.", Paths, parse=_path),
    Flag("batch_sizes", ("--batch-sizes",), "benchmark.batch_sizes", "Benchmark batch sizes, e.g. 1,8.",
         parse=functools.partial(_ints, flag="--batch-sizes")),
    Flag("runs", ("--runs",), "benchmark.runs", "Timed runs per batch size.", Int),
    Flag("warmup", ("--warmup",), "benchmark.warmup", "Warm-up runs per batch size.", Int),
    Flag("threads", ("--threads",), "benchmark.threads", "Threads used while measuring.", Int),
    Flag("trials", ("--trials",), "tuning.trials", "MetaSchedule tuning trials for TVM builds.", Int),
    Flag("max_drop", ("--max-drop",), "accuracy.max_drop", "Accuracy budget: largest allowed drop.", Num),
    Flag("on_violation", ("--on-violation",), "accuracy.on_violation", "fail or skip a pass over budget."),
    Flag("eval_data", ("--eval-data",), "data.evaluation.source", "Evaluation data: .npz or module:function.",
         parse=_source),
    Flag("metric", ("--metric",), "data.evaluation.metric", "Evaluation metric.", requires="eval_data"),
    Flag("calib_data", ("--calib-data",), "data.calibration.source", "Calibration data: .npz or module:function.",
         parse=_source),
    Flag("baseline", ("--baseline",), "gates.baseline", "Gate against this manifest (a path or an http(s):// / "
         "file:// URL): exit 6 when a gate breaks.", parse=_baseline),
    *GATE_FLAGS,
    Flag("push", ("--push",), "image.push", "Then build each SKU's OCI image and push it (image.push).", bool, False),
    Flag("registry", ("--registry",), "image.registry", "Registry repository HOST/REPO (image.registry)."),
    Flag("base_image", ("--base-image",), "image.base_image", "Base image for every SKU: HOST/REPO:TAG, "
         "...@sha256:..., or oci:PATH[:TAG] (image.base_image).", parse=_oci),
)
