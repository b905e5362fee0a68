"""Passes (the compress stage): ``Model -> Model`` plus a report. Each pass describes itself once.

A pass module holds its strict config model (with a ``kind`` literal) beside its function and
registers both with ``@register``, which stores a ``PassSpec``. The recipe's ``passes`` union and
its ordering rules are built from ``PASSES``, so a new pass is its module plus one import line at
the end of this file. Heavy libraries are imported inside the pass functions, so importing the
registry is cheap (``mlopt --help`` imports neither torch nor onnxruntime).

This package sits below recipes: it imports only ``mlopt.core`` (and ``mlopt.runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

from mlopt.core.errors import UnknownName
from mlopt.core.model import Model


@dataclass(frozen=True)
class Figures:
    """One backend's figures for a candidate ONNX file."""

    accuracy: float  # the recipe's metric on the evaluation data
    latency_ms: float  # geometric mean of p50 over the plan's batch sizes


Judge = Callable[[Path], Figures]  # runs an ONNX file on one backend; raises when that backend cannot


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the model: a work folder, the recipe's data, and judges."""

    workdir: Path
    calibration: Any = None  # mlopt.compiler.data.Batches, or None when the recipe has no calibration data
    # backend name -> its judge, for each CPU backend of the recipe's targets that runs here (ONNX Runtime
    # first); empty when the recipe has no evaluation data
    judges: dict[str, Judge] = field(default_factory=dict)
    evaluation: Any = None  # mlopt.compiler.data.Batches the metric judges (``evaluate`` reads them itself)
    evaluate: Callable[[Path], float] | None = None  # the metric of an ONNX file on the evaluation data (ONNX Runtime)
    reference: float | None = None  # the original model's metric
    max_drop: float = 0.0
    log: Callable[[str], None] = field(default=lambda _: None)
    # nn.Module -> ONNX Model, checked against the module like ingest (export(module, path, atol=None,
    # torchscript=False); torchscript: the exporter that writes fake_quantize ops as QDQ)
    export: Callable[..., Model] | None = None
    original: Callable[[], Any] | None = None  # the PyTorch module as ingested (None for an ONNX source)


PassFn = Callable[[Model, Any, PassContext], tuple[Model, dict[str, Any]]]


@dataclass(frozen=True)
class PassSpec:
    """Everything mlopt knows about one pass kind; calling it runs the pass."""

    kind: str
    config: type  # the strict pydantic model of its recipe step
    fn: PassFn
    changes_outputs: bool  # judged by the accuracy budget (True) or checked numerically against the input (False)
    trains_module: bool  # trains the PyTorch module: needs a PyTorch source, and the module must still be there
    summary: str
    onnx_only: bool = False  # its result exists only as ONNX (contrib operators, QDQ): no export of a module reproduces it

    @property
    def keeps_module(self) -> bool:
        """Whether the PyTorch module still describes the result, so a later training pass can use it.

        A pass that trains the module returns the trained one; a pass that keeps outputs (graph
        clean-up) leaves it valid; a pass that changes outputs without training it (quantization)
        leaves only ONNX, and so does one whose result is ONNX only (fused contrib operators, or the QDQ
        model quantization-aware training exports: it trains a module, but not one a later pass could use).
        """
        return not self.onnx_only and (self.trains_module or not self.changes_outputs)

    def __call__(self, model: Model, cfg: Any, ctx: PassContext) -> tuple[Model, dict[str, Any]]:
        return self.fn(model, cfg, ctx)


PASSES: dict[str, PassSpec] = {}


def register(kind: str, *, config: type, changes_outputs: bool, trains_module: bool = False,
             onnx_only: bool = False, summary: str | None = None) -> Callable[[PassFn], PassFn]:
    """Register pass ``kind``: its config model and the function that runs it. A kind is registered once."""
    def deco(fn: PassFn) -> PassFn:
        if kind in PASSES:
            raise ValueError(f"pass {kind!r} is registered twice ({PASSES[kind].fn.__module__} and {fn.__module__})")
        _check_config(kind, config)
        line = summary or (config.__doc__ or fn.__doc__ or kind).strip().splitlines()[0]
        PASSES[kind] = PassSpec(kind, config, fn, changes_outputs, trains_module, line, onnx_only)
        return fn
    return deco


def _check_config(kind: str, config: type) -> None:
    """The recipe's union is discriminated on ``kind``, and the pipeline reads ``name`` and ``on_violation``."""
    fields = getattr(config, "model_fields", None)
    if fields is None:
        raise ValueError(f"pass {kind!r}: config {config.__name__} is not a pydantic model")
    tag = fields.get("kind")
    if tag is None or get_origin(tag.annotation) is not Literal or get_args(tag.annotation) != (kind,):
        raise ValueError(f"pass {kind!r}: config {config.__name__} needs the field kind: Literal[{kind!r}]")
    missing = [f for f in ("name", "on_violation") if f not in fields]
    if missing:
        raise ValueError(f"pass {kind!r}: config {config.__name__} lacks the fields {missing}")


def get_pass(kind: str) -> PassSpec:
    """The pass ``kind``; an unknown kind lists the kinds that exist."""
    if kind not in PASSES:
        raise UnknownName(f"unknown pass {kind!r}; choose from {', '.join(sorted(PASSES))}")
    return PASSES[kind]


def save_onnx(proto: Any, out: Path) -> Path:
    """Save a ModelProto; weights go to an external file past protobuf's 2 GB limit."""
    import onnx

    if proto.ByteSize() > 1_800_000_000:
        onnx.save(proto, str(out), save_as_external_data=True, location=out.name + ".data")
    else:
        onnx.save(proto, str(out))
    return out


# The passes, registered on import, in the order the recipe schema lists them: a new pass adds its module here.
from mlopt.passes import graph, quantize, prune, distill, fuse, qat  # noqa: E402,F401,I001
