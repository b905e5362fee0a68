"""The benchmark manifest: one JSON document per run, read by serving layers to route requests.

``MANIFEST_SCHEMA_VERSION`` follows semver: a new optional field bumps the minor version, a changed
or removed field the major. The JSON Schema shipped in ``mlopt/schemas/manifest.schema.json`` is
generated from these models (``mlopt manifest schema``) and a test keeps the two identical.
Every figure is measured on the machine its ``provenance`` names; a figure that was not measured
is absent (null), never estimated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from mlopt.core.artifact import Validation
from mlopt.core.errors import BadInput, MloptError
from mlopt.core.files import write_json
from mlopt.core.spec import InputSpec, Record

MANIFEST_SCHEMA_VERSION = "1.6"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "manifest.schema.json"


class Host(Record):
    machine: str = Field(description="CPU architecture (uname -m).")
    cpu: str = Field(description="CPU model name.")
    cores: int | None = Field(description="Logical CPUs of the machine.")
    x86_level: str | None = Field(description="x86-64 micro-architecture level, when x86.")
    features: list[str] = Field(description="Notable CPU features (AVX-512, VNNI, AMX, SVE ...).")
    os: str
    python: str
    cpu_flags_override: str | None = Field(None, description="MLOPT_CPU_FLAGS, when it narrowed the CPU flags mlopt "
                                                             "relied on (schema 1.3).")


class Provenance(Record):
    host: Host = Field(description="The machine the figures were measured on.")
    libraries: dict[str, str] = Field(description="Versions of the runtime libraries that ran the build.")
    measured_at: str = Field(description="UTC time of the measurement.")
    threads: int = Field(description="Intra-op threads used.")
    measured_by: Literal["mlopt compile", "mlopt measure"] | None = Field(
        None, description="The command that measured: `mlopt compile` on the build machine, or `mlopt measure` on "
                          "a machine of the SKU later (schema 1.4).")


class BatchFigures(Record):
    batch_size: int
    runs: int = Field(description="Timed runs (after warm-up).")
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_per_s: float | None = Field(description="Inferences per second at p50 (batch_size / p50).")
    spread: float = Field(description="(p75 - p25) / p50 of the timings.")
    noisy: bool = Field(description="spread above 0.10: treat the figures with care.")


class Accuracy(Record):
    metric: str
    value: float = Field(description="Metric of this build on the evaluation data.")
    reference: float = Field(description="Metric of the original model on the same data.")
    drop: float = Field(description="reference - value.")
    within_budget: bool
    per_output: dict[str, float] | None = Field(
        None, description="Fidelity metrics (cosine, relative-error, snr): each output's figure; value is the worst.")


class Measurement(Record):
    provenance: Provenance
    batches: list[BatchFigures]
    peak_memory_bytes: int | None = Field(description="Peak resident memory growth to load and run the build.")
    memory_method: str | None
    noisy: bool
    accuracy: Accuracy | None = Field(description="Absent when the recipe has no evaluation data.")


class ArtifactRef(Record):
    key: str = Field(description="Content address: sha256 of everything that made the artifact.")
    content_digest: str = Field(description="sha256 over the artifact's file digests.")
    path: str = Field(description="Folder of the artifact in the store.")
    size_bytes: int
    files: list[str]


class Candidate(Record):
    backend: str
    status: Literal["built", "failed", "unavailable"]
    compiled: Literal["here", "cross", "on-device"] | None = Field(
        None, description="'here': built for this machine's hardware; 'cross': built here for hardware not present; "
                          "'on-device': a build plan (ONNX plus an entry point) that builds the engine when the "
                          "container first starts on the SKU, so it has no figures until measured there."
    )
    reason: str = ""
    precision: str | None = None
    artifact: ArtifactRef | None = None
    validation: Validation | None = None
    measurement: Measurement | None = None
    build_seconds: float | None = None
    cached: bool = False
    details: dict[str, Any] = Field(default_factory=dict, description="Backend-specific facts (tuning, target).")


class Cost(Record):
    usd_per_million: float = Field(description="price_per_hour / (throughput_per_s * 3600) * 1e6.")
    usd_per_hour: float
    throughput_per_s: float
    batch_size: int
    price_source: str
    price_date: str


class ImageRecord(Record):
    """The OCI image of an entry's chosen build (written by `mlopt image build|push`, `compile --push`)."""

    tag: str
    digest: str = Field(description="sha256 of the image manifest: the same inputs give the same digest.")
    base: str = Field(description="The base image it was built on.")
    base_digest: str
    pushed: list[str] = Field(default_factory=list, description="Registry references by digest it was pushed to.")


class Choice(Record):
    """How the SKU's build was picked among the measured ones (schema 1.5)."""

    method: Literal["fastest", "interleaved"] = Field(
        description="'fastest': the lowest geometric mean of p50 over the batch sizes, clear of the noise; "
                    "'interleaved': the two fastest were noisy or within each other's noise band, so they were "
                    "timed again in alternating blocks (A/B, B/A ...) and that decided.")
    runner_up: str | None = Field(description="The backend of the second-fastest measured build.")
    ratio: float | None = Field(description="The runner-up's latency over the chosen build's (geometric mean over "
                                            "the batch sizes; interleaved: of the per-round block medians).")
    confidence: float | None = Field(description="Interleaved: the share of A/B rounds the faster build won "
                                                 "(0.5: a coin flip, 1: every round).")
    tie: bool = Field(description="The two could not be told apart (ratio under 1.03, or the faster won under 75% "
                                  "of the rounds): the chosen one is then the first in the SKU's backend order, "
                                  "a rule no timing can flip.")
    reason: str = Field(description="Why this method: the noise or closeness that triggered the re-measure.")
    rounds: int | None = Field(None, description="Interleaved: A/B rounds timed, over all batch sizes.")


class Entry(Record):
    """One (model, SKU): the chosen build and every candidate tried."""

    model: str
    version: int
    sku: str
    sku_kind: Literal["cpu", "gpu"]
    chosen_backend: str | None = Field(description="The backend a server should deploy for this SKU.")
    chosen_by: str = Field(description="How the choice was made.")
    artifact: ArtifactRef | None
    precision: str | None
    measurement: Measurement | None
    cost: Cost | None = Field(description="Absent unless the SKU has a price and its throughput was measured.")
    candidates: list[Candidate]
    image: ImageRecord | None = Field(None, description="The OCI image of the chosen build, once one is built.")
    choice: Choice | None = Field(None, description="How the build was chosen among the measured ones, and how "
                                                    "sure that is (schema 1.5).")
    requested_as: Literal["host"] | None = Field(None, description="'host' when the recipe's target 'host' resolved "
                                                                   "to this SKU on the machine that ran mlopt "
                                                                   "(schema 1.3).")


class PassReport(Record):
    name: str
    kind: str
    status: Literal["applied", "skipped", "rejected"]
    seconds: float
    size_before: int
    size_after: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    judged_on: str | None = Field(None, description="1.6: the CPU backend this pass's accuracy and latency figures "
                                  "were measured on (passes that change outputs).")
    latency_ms_before: float | None = Field(
        None, description="1.6: ms, the pass's input model on judged_on, timed interleaved with its output (A/B "
        "blocks of 3 calls, up to 8 rounds per batch size): geometric mean over the plan's batch sizes of the "
        "median block; a figure to compare the steps of one build, not a benchmark.")
    latency_ms_after: float | None = Field(None, description="1.6: ms, the pass's output, measured as latency_ms_before.")
    cached: bool = False
    details: dict[str, Any] = Field(default_factory=dict)


class ReferenceAccuracy(Record):
    metric: str
    value: float
    samples: int


class ModelInfo(Record):
    name: str
    version: int
    source: str
    input_digest: str = Field(description="sha256 of the ingested ONNX model.")
    final_digest: str = Field(description="sha256 of the ONNX model after all passes.")
    inputs: list[InputSpec]
    outputs: list[str]
    reference_accuracy: ReferenceAccuracy | None
    passes: list[PassReport]


class RecipeRef(Record):
    name: str
    digest: str = Field(description="sha256 of the resolved recipe.")
    resolved: dict[str, Any] | None = Field(
        None, description="The resolved recipe as data: what `mlopt measure` replays (its benchmark plan, data and "
                          "accuracy budget) on a machine of the SKU (schema 1.4).")


class GateCheck(Record):
    """One figure compared with the baseline's."""

    gate: Literal["latency", "throughput", "accuracy", "size"]
    figure: str = Field(description="What was compared: 'p50 b8', 'throughput b8', the metric's name, 'size'.")
    verdict: Literal["pass", "fail", "inconclusive", "not-measured"]
    old: float | None = Field(description="The baseline's figure (ms, inferences/s, metric value or bytes).")
    new: float | None = Field(description="This build's figure.")
    change: float | None = Field(description="How much worse this build is, in the limit's unit (negative: better): "
                                             "growth new / old - 1 for latency and size, drop 1 - new / old for "
                                             "throughput, drop old - new (absolute) for accuracy.")
    limit: float | None = Field(description="The gate's threshold, in the unit of change.")
    noise: float | None = Field(None, description="Latency and throughput: the noise band (relative) a change had "
                                                  "to exceed to fail.")
    reason: str = ""


class SkuGates(Record):
    """The gate checks of one (model, SKU) present in the baseline, the build, or both."""

    model: str
    sku: str
    presence: Literal["both", "added", "removed"] = Field(description="added: not in the baseline; removed: only "
                                                                      "in the baseline.")
    backend_old: str | None
    backend_new: str | None
    checks: list[GateCheck]
    warnings: list[str] = Field(default_factory=list)


class GateLimits(Record):
    """The thresholds the gates applied (null: that gate was off)."""

    latency_regression: float | None
    throughput_drop: float | None
    accuracy_drop: float | None
    size_growth: float | None
    noise_k: float
    strict: bool


class GateReport(Record):
    """This build compared with a baseline manifest (``mlopt compile --baseline``)."""

    baseline: str = Field(description="Path or URL of the baseline manifest.")
    baseline_created: str = Field(description="When the baseline manifest was made.")
    baseline_recipe_digest: str
    limits: GateLimits
    verdict: Literal["pass", "warn", "fail"] = Field(description="fail: a gate broke (exit 6); warn: inconclusive "
                                                                 "checks or warnings only.")
    failures: list[str]
    warnings: list[str]
    skus: list[SkuGates]


class MatrixCell(Record):
    """One (recipe, SKU) task of a build matrix."""

    recipe: str
    sku: str
    status: Literal["built", "cached", "failed"] = Field(description="cached: every build came from the store.")
    exit_code: int = Field(description="The task's exit code, as `mlopt compile` of that recipe and SKU would give.")
    chosen_backend: str | None = None
    artifact_key: str | None = Field(None, description="The chosen build's artifact.")
    p50_ms: dict[str, float] = Field(default_factory=dict, description="p50 latency of the chosen build (ms) by "
                                                                        "batch size; empty where it was not measured.")
    seconds: float = Field(description="Wall time of the task in its worker (0 when answered before dispatch).")
    attempts: int = Field(1, description="Attempts it took (a worker that died is retried).")
    where: dict[str, Any] = Field(default_factory=dict, description="Where it ran: executor, host, pid; on Ray the "
                                                                    "node id and the resources it was given.")
    error: str | None = None


class MatrixRecipe(Record):
    name: str
    path: str
    digest: str = Field(description="sha256 of the resolved recipe, its targets left out.")


class MatrixReport(Record):
    """What `mlopt build-matrix` ran: every recipe for every SKU, one task each (schema 1.2)."""

    executor: Literal["local", "ray", "k8s"]
    workers: int
    skus: list[str]
    recipes: list[MatrixRecipe]
    cells: list[MatrixCell]
    wall_seconds: float


class Manifest(Record):
    schema_version: Literal["1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6"] = MANIFEST_SCHEMA_VERSION
    mlopt_version: str
    created: str
    recipe: RecipeRef
    host: Host = Field(description="The machine that ran mlopt.")
    toolchain: dict[str, str]
    store: str
    models: list[ModelInfo]
    entries: list[Entry]
    status: Literal["ok", "failed"]
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list, description="Candidates that failed on a SKU that still has "
                                "a chosen build (schema 1.4): each backend's full reason.")
    stage_seconds: dict[str, float] = Field(default_factory=dict, description="Wall time of each pipeline stage.")
    gates: GateReport | None = Field(None, description="The comparison with a baseline manifest, when one was "
                                                       "given (schema 1.2).")
    matrix: MatrixReport | None = Field(None, description="The tasks of a build matrix, when this manifest combines "
                                                          "them (`mlopt build-matrix`; schema 1.2).")


def manifest_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://mlopt.dev/schemas/manifest-{MANIFEST_SCHEMA_VERSION}.json"
    return schema


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Validate against the shipped JSON Schema, then write atomically."""
    data = manifest.model_dump(mode="json")
    bad = non_finite(data)
    if bad:  # RFC 8259 has no NaN or infinity: a reader's JSON parser would refuse the file
        raise MloptError(f"the manifest would hold a non-finite number at {', '.join(bad[:3])}; nothing was written",
                         hint="report this with the recipe: a figure was computed from bad data")
    validate_manifest(data)
    write_json(path, data, sort_keys=False)


def non_finite(data: Any, where: str = "") -> list[str]:
    """The paths (``entries.0.measurement.accuracy.value``) of NaN or infinite floats in ``data``."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [where or "(top level)"]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in non_finite(v, f"{where}.{i}" if where else str(i))]
    return []


def validate_manifest(data: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    # The shipped schema itself is checked against its metaschema by the tests, not on every compile:
    # jsonschema.validate() would re-check it each time (0.3 s of a 2 s cached rebuild).
    validator = jsonschema.validators.validator_for(schema)(schema)
    e = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if e is not None:
        where = "/".join(str(p) for p in e.absolute_path)
        raise BadInput(f"manifest does not match schema {MANIFEST_SCHEMA_VERSION} at {where or '(root)'}: {e.message}") from None


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"manifest {path} does not exist") from None
    except IsADirectoryError:
        raise BadInput(f"manifest {path} is a folder", hint="give the manifest.json file inside it") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"manifest {path} is not JSON: byte {e.object[e.start]:#04x} at offset {e.start} is not "
                       "UTF-8", hint="give a manifest.json written by mlopt compile") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"manifest {path} is not JSON: {e}", hint="give a manifest.json written by mlopt compile") from None
    if not isinstance(data, dict):
        raise BadInput(f"manifest {path} is not a manifest (a JSON {type(data).__name__}, not an object)")
    validate_manifest(data)
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise BadInput(f"manifest {path} is invalid: {e.errors()[0]['msg']}") from None
