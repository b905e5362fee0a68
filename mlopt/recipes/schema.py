"""The recipe: a strict description of one compile job (what to build, how, for which SKUs).

Every field is documented here, except each pass's settings, which live beside the pass in
``mlopt/passes/`` (the ``passes`` list is built from that registry); ``mlopt recipe schema`` prints
the JSON Schema generated from these models. Unknown keys are errors. ``RECIPE_SCHEMA_VERSION`` changes when a field changes
meaning; new optional fields keep the version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from mlopt.core.spec import InputSpec, Strict
from mlopt.core.util import NAME_RULE, is_safe_name
from mlopt.passes import PASSES

RECIPE_SCHEMA_VERSION = 1

def _safe_name(value: str, what: str) -> str:
    """The one name rule (``mlopt.core.util.NAME_PATTERN``): a name becomes a path or a tag, so never '..' or '/'."""
    if not is_safe_name(value):
        raise ValueError(f"{what} {value!r} must be {NAME_RULE}, and not '.' or '..'")
    return value


class ModelSource(Strict):
    """Where the model comes from and its input signature."""

    source: str = Field(
        description="An ONNX file (.onnx), a torch.export file (.pt2), or a PyTorch factory "
        "'path/to/module.py:function' / 'package.module:function' returning an nn.Module."
    )
    name: str | None = Field(None, description="Model name in the store; defaults to the recipe name.")
    checkpoint: str | None = Field(
        None, description="A state_dict file loaded into the factory's module (weights_only=True: never runs code)."
    )
    inputs: list[InputSpec] = Field(
        default_factory=list,
        description="Input signature. Required for PyTorch sources; for ONNX it is read from the file and, "
        "when given, checked against it.",
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset for PyTorch exports.")
    batch_axis: str = Field("batch", description="The dynamic axis that benchmark batch sizes bind to.")
    export_atol: float = Field(1e-4, gt=0, description="Tolerance of the export check against the PyTorch module.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return v if v is None else _safe_name(v, "model.name")

    @property
    def kind(self) -> Literal["onnx", "pt2", "torch"]:
        if self.source.endswith(".onnx"):
            return "onnx"
        if self.source.endswith(".pt2"):
            return "pt2"
        return "torch"

    @model_validator(mode="after")
    def _check(self) -> "ModelSource":
        if self.kind == "torch" and ":" not in self.source:
            raise ValueError(
                f"model source {self.source!r} is neither an .onnx/.pt2 file nor a 'module:function' factory"
            )
        if self.kind != "onnx" and not self.inputs:
            raise ValueError("a PyTorch source needs an input signature: model.inputs (or --input name:shape)")
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names repeat: {names}")
        return self


class DataSource(Strict):
    """Batches of inputs (and optional labels): a 'module:function' yielding batches, or an .npz file.

    A function returns an iterable of ``dict`` batches mapping input names to arrays; the key
    ``labels`` holds labels. An .npz holds one array per input name (and optionally ``labels``),
    cut into batches of ``batch_size``.
    """

    source: str = Field(description="'path/to/data.py:function', 'package.module:function' or a .npz file.")
    batch_size: int = Field(16, gt=0, description="Batch size when cutting an .npz into batches.")
    max_batches: int | None = Field(None, gt=0, description="Use at most this many batches.")

    @field_validator("source")
    @classmethod
    def _form(cls, v: str) -> str:
        if not v.endswith(".npz") and ":" not in v:
            raise ValueError(f"data source {v!r} must be a .npz file or 'module:function'")
        return v


BUILTIN_METRICS = ("accuracy", "top1-agreement", "cosine", "relative-error", "snr")


class Evaluation(DataSource):
    """The evaluation data and the metric that scores a model on it."""

    metric: str = Field(
        "cosine",
        description="'accuracy' (argmax of the first output vs labels), 'top1-agreement' (argmax vs the "
        "original model's), or a fidelity metric over every output, the worst output deciding: 'cosine' (mean "
        "per-sample cosine similarity to the original's; 1 - relative L2 error for an output with one value a "
        "sample), 'relative-error' (1 - ||out - original|| / ||original||), 'snr' (signal-to-noise ratio in dB, "
        "at most 100); or a 'module:function(outputs: dict[str, ndarray], labels) -> float' (higher is better).",
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in BUILTIN_METRICS and ":" not in v:
            raise ValueError(f"unknown metric {v!r}; choose from {', '.join(BUILTIN_METRICS)} or 'module:function'")
        return v


class Data(Strict):
    calibration: DataSource | None = Field(None, description="Data for calibration (quantization) and fine-tuning.")
    evaluation: Evaluation | None = Field(None, description="Data and metric for the accuracy budget and the manifest.")


class AccuracyBudget(Strict):
    max_drop: float = Field(
        0.01, ge=0, description="Largest allowed drop of the evaluation metric below the original model's (absolute)."
    )
    on_violation: Literal["fail", "skip"] = Field(
        "fail", description="What a pass that breaks the budget does: fail the build (exit 3) or be skipped."
    )
    min_speedup: float | None = Field(
        None, ge=1.0, description="A pass that changes outputs must make the model at least this much faster "
        "than its input on the backend it is judged on (quick medians), or it is skipped: compression that "
        "keeps accuracy but does not pay is not shipped; a pass that raises its input's accuracy (distillation "
        "after pruning) is kept at equal speed. None: passes are judged on accuracy only.")


# The pass steps: one config model per registered pass (``mlopt.passes``), told apart by ``kind``.
PassStep = Annotated[Union[tuple(spec.config for spec in PASSES.values())], Field(discriminator="kind")]


class Tuning(Strict):
    trials: int = Field(0, ge=0, description="MetaSchedule trials for TVM builds (0: no tuning).")
    timeout_s: int = Field(180, gt=0, description="Per-candidate build timeout for tuning workers.")


class AxisRange(Strict):
    """A dynamic axis that real traffic varies: engines (TensorRT profiles, MIGraphX dynamic dimensions)
    accept every size from ``min`` to ``max``; the benchmark measures at ``opt``."""

    min: int = Field(gt=0)
    opt: int = Field(gt=0)
    max: int = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> "AxisRange":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"an axis range needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class Benchmark(Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], description="Batch sizes to measure.")
    warmup: int = Field(5, ge=0, description="Untimed runs before timing.")
    runs: int = Field(50, gt=0, description="Timed runs per batch size (at most).")
    max_seconds: float = Field(
        20.0, gt=0, description="Time budget per (build, batch size); fewer runs are recorded if it runs out."
    )
    threads: int = Field(2, gt=0, description="Intra-op threads every backend uses while measured.")
    dims: dict[str, Union[int, AxisRange]] = Field(
        default_factory=dict, description="Values of dynamic axes other than the batch axis: a size, or "
        "{min, opt, max} for an axis real traffic varies (engines accept the range; the benchmark uses opt).")

    @property
    def sizes(self) -> dict[str, int]:
        """Each dynamic axis's benchmark size (a range's ``opt``)."""
        return {k: v if isinstance(v, int) else v.opt for k, v in self.dims.items()}

    @property
    def largest(self) -> dict[str, int]:
        """Each dynamic axis at its largest (a range's ``max``): what memory bounds are checked at."""
        return {k: v if isinstance(v, int) else v.max for k, v in self.dims.items()}

    @property
    def ranges(self) -> dict[str, tuple[int, int, int]]:
        """The axes given as ranges: (min, opt, max)."""
        return {k: (v.min, v.opt, v.max) for k, v in self.dims.items() if not isinstance(v, int)}

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of positive integers")
        return sorted(set(v))


class ImageSettings(Strict):
    """Container images of the builds (`mlopt image build`, `mlopt compile --push`)."""

    base_image: str | None = Field(
        None, description="Base image for every SKU, over the catalog's: a registry reference HOST/REPO:TAG or "
                          "HOST/REPO@sha256:..., or oci:PATH[:TAG] for an OCI layout folder.")
    base_images: dict[str, str] = Field(default_factory=dict, description="Base image per SKU name, over base_image.")
    runtime_dir: str | None = Field(
        None, description="A folder of Python packages (pip install --target) added as a layer on PYTHONPATH, for "
                          "base images without the build's runtime.")
    runtime_dirs: dict[str, str] = Field(default_factory=dict, description="Runtime folder per SKU name.")
    registry: str | None = Field(None, description="Registry repository HOST/REPO that images are pushed to.")
    push: bool = Field(False, description="Build and push the images after the compile (needs registry).")
    push_with: Literal["http", "skopeo"] = Field("http", description="Push with the registry HTTP API or skopeo.")
    tag: str = Field("v{version}-{sku}", description="Image tag template: {model} {version} {sku} {backend}.")
    builder: Literal["builtin", "buildah", "podman", "docker"] = Field(
        "builtin", description="builtin: mlopt writes the OCI layout itself (no daemon); else that tool builds the "
                               "Dockerfile context.")
    compress: bool = Field(True, description="gzip the layers (weights hardly compress; off saves time).")

    @model_validator(mode="after")
    def _check(self) -> "ImageSettings":
        from mlopt.core.errors import BadInput
        from mlopt.core.refs import parse_base, parse_repository

        if self.push and not self.registry:
            raise ValueError("push needs a registry: image.registry HOST/REPO (--registry)")
        try:  # references and the tag template are checked when the recipe loads, not after the build
            if self.registry:
                parse_repository(self.registry)
            for ref in [self.base_image, *self.base_images.values()]:
                if ref:
                    parse_base(ref)
        except BadInput as e:
            raise ValueError(e.message) from None
        _check_tag_template(self.tag)
        return self

    def resolved(self, base: Path) -> "ImageSettings":
        """A copy with relative oci: base images and runtime folders resolved against ``base``."""
        def oci(ref: str | None) -> str | None:
            if ref is None or not ref.startswith("oci:") or ref[4:].startswith(("/", "~")):
                return ref
            return "oci:" + str(base / ref[4:])

        def folder(p: str | None) -> str | None:
            return p if p is None or Path(p).expanduser().is_absolute() else str((base / p).resolve())

        return self.model_copy(update={
            "base_image": oci(self.base_image), "base_images": {k: oci(v) for k, v in self.base_images.items()},
            "runtime_dir": folder(self.runtime_dir), "runtime_dirs": {k: folder(v) for k, v in self.runtime_dirs.items()}})


def _check_tag_template(template: str) -> None:
    from mlopt.core.refs import TAG

    try:
        sample = template.format(model="model", version=1, sku="sku", backend="backend")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"tag {template!r}: {e}; placeholders are {{model}} {{version}} {{sku}} {{backend}}") from None
    if not TAG.match(sample) or not is_safe_name(sample):
        raise ValueError(f"tag {template!r} does not make a valid image tag (1-128 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit)")


class ServingSettings(Strict):
    """Serving configs made from the measurements (images, `mlopt export triton|k8s|kserve`)."""

    latency_sla_ms: float | None = Field(
        None, gt=0, description="p99 latency a request may take: batch sizes whose measured p99 exceeds it are not "
                                "used, and Triton's queue delay is what the SLA leaves after the largest batch's p99.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the in-image server.")
    replicas: int = Field(1, ge=0, description="Replicas of each Kubernetes Deployment (KServe minReplicas).")
    max_replicas: int = Field(1, ge=0, description="KServe maxReplicas.")
    unmeasured_max_batch: int = Field(8, gt=0, description="Triton max_batch_size for SKUs without measured figures.")


class Gates(Strict):
    """CI gates: the build is compared with a baseline manifest, SKU by SKU (``mlopt compile --baseline``).

    Latency is judged against the measured noise of both runs (see ``mlopt.gates``): a growth over
    ``latency_regression`` fails only when it is also outside the noise band; otherwise it is
    inconclusive (a warning, or a failure with ``strict``). A null limit turns its gate off.
    """

    baseline: str | None = Field(
        None, description="The previous build's manifest: a file path (relative to the recipe) or an http(s):// or "
                          "file:// URL. Without one no gate runs.")
    latency_regression: float | None = Field(
        0.10, ge=0, description="Largest allowed growth of p50 latency per batch size, as a ratio (0.10: 10%).")
    throughput_drop: float | None = Field(
        None, ge=0, lt=1, description="Largest allowed drop of throughput per batch size, as a ratio (null: off).")
    accuracy_drop: float | None = Field(
        None, ge=0, description="Largest allowed drop of the evaluation metric below the baseline's (absolute; "
                                "null: the recipe's accuracy.max_drop).")
    size_growth: float | None = Field(
        0.10, ge=0, description="Largest allowed growth of the chosen artifact's size, as a ratio (0.10: 10%).")
    noise_k: float = Field(
        1.0, ge=0, description="Width of the latency noise band, in combined relative IQRs of the two runs: a "
                               "regression must exceed it to fail.")
    strict: bool = Field(False, description="Fail on inconclusive latency verdicts (too noisy to tell) instead of "
                                            "warning.")

    def resolved(self, base: Path) -> "Gates":
        """A copy whose relative baseline file path is resolved against ``base``."""
        b = self.baseline
        if b is None or "://" in b or Path(b).expanduser().is_absolute() or b.startswith("~"):
            return self
        return self.model_copy(update={"baseline": str((base / b).resolve())})


class Recipe(Strict):
    """One compile job. ``mlopt recipe schema`` prints this as JSON Schema."""

    schema_version: Literal[1] = Field(1, description="Recipe schema version.")
    name: str = Field(description="Recipe name; also the model name in the store unless model.name is set.")
    model: ModelSource
    data: Data = Field(default_factory=Data)
    passes: list[PassStep] = Field(default_factory=list, description="Ordered compression/optimization passes.")
    accuracy: AccuracyBudget = Field(default_factory=AccuracyBudget)
    targets: list[str] = Field(default_factory=lambda: ["host"], description=(
        "SKU names from the catalog; 'host' is the best CPU SKU the machine running the compile can run "
        "(x86-64-v4, v3 or v2; an aarch64 SKU on Arm), resolved at run time and recorded in the manifest."))
    backends: list[str] | dict[str, list[str]] | None = Field(
        None, description="Restrict backends to these, kept in each SKU's catalog order (default: every backend of "
                          "the SKU). A list applies to every SKU; a mapping applies per SKU name, or per SKU kind "
                          "('cpu', 'gpu'), the name winning: {cpu: [onnxruntime], gpu: [tensorrt, tvm]}."
    )
    tuning: Tuning = Field(default_factory=Tuning)
    benchmark: Benchmark = Field(default_factory=Benchmark)
    output: str = Field("out", description="Directory for the run's manifest and build links.")
    store: str | None = Field(None, description="Artifact store folder (default: $MLOPT_STORE or ~/.cache/mlopt/store).")
    catalog: str | None = Field(None, description="A SKU catalog file replacing the bundled one.")
    image: ImageSettings = Field(default_factory=ImageSettings, description="Container images of the builds.")
    serving: ServingSettings = Field(default_factory=ServingSettings, description="Serving configs from the measurements.")
    gates: Gates = Field(default_factory=Gates, description="CI gates against a baseline manifest.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _safe_name(v, "name")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("targets must name at least one SKU (see `mlopt targets`)")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _pass_order(self) -> "Recipe":
        """A pass that trains the PyTorch module needs one: a PyTorch source, and no pass before it that drops it."""
        dropped_by = None  # the first pass after which only ONNX is left (quantization)
        for i, step in enumerate(self.passes):
            spec, label = PASSES[step.kind], _step_label(step, i)
            if spec.trains_module and self.model.kind == "onnx":
                raise ValueError(
                    f"pass {label} trains the PyTorch module, and this recipe's model source is ONNX only "
                    f"({Path(self.model.source).name}): give model.source as a PyTorch factory 'model.py:function' "
                    "or a .pt2 file")
            if spec.trains_module and dropped_by is not None:
                raise ValueError(f"pass {label} must come before {dropped_by}: it trains the float PyTorch module, "
                                 "and only the ONNX model is left after that pass")
            if not spec.keeps_module and dropped_by is None:
                dropped_by = label
        return self

    @property
    def model_name(self) -> str:
        return self.model.name or self.name

    def backends_for(self, sku_name: str, sku_kind: str) -> list[str] | None:
        """The backends this recipe allows for a SKU (None: all of the SKU's)."""
        if self.backends is None or isinstance(self.backends, list):
            return self.backends
        return self.backends.get(sku_name, self.backends.get(sku_kind))

    def all_backends(self) -> list[str]:
        """Every backend name the recipe mentions."""
        if self.backends is None:
            return []
        return self.backends if isinstance(self.backends, list) else [b for v in self.backends.values() for b in v]

    def resolve_paths(self, base: Path) -> "Recipe":
        """Return a copy whose relative file paths are resolved against ``base`` (the recipe's folder)."""
        def fix(p: str | None) -> str | None:
            return resolve_source(p, base)

        model = self.model.model_copy(update={"source": fix(self.model.source), "checkpoint": fix(self.model.checkpoint)})
        data = self.data.model_copy(update={
            k: getattr(self.data, k).model_copy(update={"source": fix(getattr(self.data, k).source)})
            for k in ("calibration", "evaluation") if getattr(self.data, k) is not None
        })
        ev = data.evaluation
        if ev is not None and ":" in ev.metric:
            data = data.model_copy(update={"evaluation": ev.model_copy(update={"metric": fix(ev.metric)})})
        passes = [p.model_copy(update={"student": fix(p.student)}) if isinstance(getattr(p, "student", None), str)
                  else p for p in self.passes]
        dirs = {k: str((base / getattr(self, k)).resolve()) for k in ("output", "store", "catalog")
                if getattr(self, k) is not None and not Path(getattr(self, k)).expanduser().is_absolute()
                and not getattr(self, k).startswith("~")}
        return self.model_copy(update={"model": model, "data": data, "passes": passes, **dirs,
                                       "image": self.image.resolved(base),
                                       "gates": self.gates.resolved(base)})


def _step_label(step: Strict, index: int) -> str:
    """How an error names a pass step: 'prune (passes[1])', or "prune 'small' (passes[1])" when it has a name."""
    kind, name = step.kind, step.name  # type: ignore[attr-defined]  (every pass config has both)
    return f"{kind} {name!r} (passes[{index}])" if name and name != kind else f"{kind} (passes[{index}])"


def resolve_source(p: str | None, base: Path) -> str | None:
    """Resolve a file path, or the file part of 'file.py:function', against ``base``."""
    if p is None:
        return None
    file, sep, func = p.rpartition(":") if p.count(":") == 1 and not p.endswith((".onnx", ".pt2", ".npz")) else (p, "", "")
    if not sep:
        file = p
    looks_like_file = file.endswith((".py", ".onnx", ".pt2", ".npz", ".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_file and not Path(file).is_absolute():
        file = str((base / file).resolve())
    return f"{file}{sep}{func}"
