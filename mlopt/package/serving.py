"""Serving settings derived from a manifest's measurements, shared by the image and the exporters.

A ``Deployable`` gathers what the configs of one (model, SKU) are made from: the manifest entry,
the model's signature, the SKU from the catalog and the verified artifact from the store.
``plan_batching`` turns the measured latency/throughput curve and the recipe's latency SLA into
Triton's batching settings; ``serve_spec`` is the ``serve.json`` the in-image entry point reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlopt.core.errors import BadInput, StoreError
from mlopt.manifest import Entry, Manifest, Measurement, ModelInfo
from mlopt.store import Artifact, Store
from mlopt.runtime import SHIPPED_NAME
from mlopt.runtime.batching import DEFAULT_SERVER_OVERHEAD_MS, batch_rule
from mlopt.targets.backends import backend_spec
from mlopt.targets.catalog import SKU, Catalog
from mlopt.targets.ort import ENGINE_CACHE  # the volume the session settings and engine plans cache on

IMAGE_ROOT = "/opt/mlopt"
MODEL_DIR = f"{IMAGE_ROOT}/model"
SERVING_DIR = f"{IMAGE_ROOT}/serving"
ENTRY_PATH = f"{IMAGE_ROOT}/entry.py"
RUNTIME_PATH = f"{IMAGE_ROOT}/{SHIPPED_NAME}"  # the mlopt.runtime package, whose loaders entry.py calls
RUNTIME_OVERHEAD = 256 << 20  # Python, numpy and the runtime library beside the model (bytes)
# A request's tensors are held as the body (JSON text, up to ~20 bytes a number), the decoded values
# and the array the runtime reads: 64 bytes per input element covers the widest encoding accepted.
REQUEST_BYTES_PER_ELEMENT = 64
RUN_AS = 65532  # the image's non-root user and group (the "nonroot" id distroless images use)
JSON_BYTES_PER_ELEMENT = 24  # the longest float32 text ("-0.12345678901234568, ") a JSON body carries
BODY_SLACK = 64 << 10  # the JSON header's names, shapes and parameters
MAX_BODY = 64 << 20  # where an input has a free axis beside the batch axis
MAX_QUEUE = 256  # requests waiting for the batcher; past it the server answers 503 with Retry-After
MAX_CONCURRENCY = 1024  # connections and requests uvicorn holds at once (then 503)
KEEP_ALIVE_S = 30  # an idle keep-alive connection is closed after this
GRACE_S = 25  # SIGTERM drain, within Kubernetes' default 30 s termination grace period
# the image's server: HTTP on uvicorn + starlette, gRPC on grpcio with the proto tritonclient ships compiled
SERVER_PACKAGES = ("uvicorn==0.54.0", "starlette==1.10.0", "httptools==0.9.0", "uvloop==0.23.0", "grpcio==1.85.4",
                   "protobuf==6.33.6", "tritonclient[grpc]==2.73.0")


@dataclass(frozen=True)
class ServingOptions:
    """Knobs of the serving configs (the recipe's ``serving:`` section)."""

    latency_sla_ms: float | None = None
    port: int = 8000
    replicas: int = 1
    max_replicas: int = 1
    unmeasured_max_batch: int = 8  # max_batch_size where the SKU has no figures
    server_overhead_ms: float = DEFAULT_SERVER_OVERHEAD_MS  # the server's own time per request (batching rule)


@dataclass(frozen=True)
class BatchPlan:
    max_batch_size: int  # 0: the model has no batch axis (no dynamic batching)
    preferred: tuple[int, ...]
    queue_delay_us: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Deployable:
    """One (model, SKU) of a manifest, with its SKU and verified artifact."""

    manifest: Manifest
    model: ModelInfo
    entry: Entry
    sku: SKU
    artifact: Artifact
    compiled: str | None
    siblings: tuple[Artifact, ...] = field(default=())  # the entry's other built candidates

    @property
    def backend(self) -> str:
        assert self.entry.chosen_backend is not None
        return self.entry.chosen_backend

    @property
    def threads(self) -> int:
        """Threads one instance uses: the SKU's, else the ONNX Runtime session's, else its vCPUs."""
        session = self.artifact.meta.get("session")
        settings = _read_json(self.artifact.path / session) if session else None
        return int(self.sku.threads or (settings or {}).get("intra_op_num_threads") or self.sku.vcpus or 1)

    @property
    def batchable(self) -> bool:
        """Every input's first axis is the same named dynamic axis (the batch axis)."""
        firsts = {i.shape[0] if i.shape else None for i in self.model.inputs}
        return len(firsts) == 1 and isinstance(next(iter(firsts)), str)

    @property
    def slug(self) -> str:
        return f"{self.model.name}-v{self.entry.version}-{self.sku.name}"


def is_jit(backend: str) -> bool:
    """Whether the backend's engines are built on the device when the container starts."""
    return backend_spec(backend).jit


def deployables(manifest: Manifest, store: Store, catalog: Catalog,
                skus: tuple[str, ...] = ()) -> tuple[list[Deployable], list[str]]:
    """The manifest's deployable entries (chosen build present in the store), and why others were skipped."""
    out, skipped = [], []
    for entry in manifest.entries:
        if skus and entry.sku not in skus:
            continue
        if entry.artifact is None or entry.chosen_backend is None:
            skipped.append(f"{entry.model} on {entry.sku}: no chosen build")
            continue
        art = store.checked(entry.artifact.key)
        if art is None:
            raise StoreError(f"artifact {entry.artifact.key[:12]} of {entry.model} on {entry.sku} is not in "
                             f"store {store.root}",
                             hint="pass the store the manifest was built with (--store)")
        model = next((m for m in manifest.models if m.name == entry.model and m.version == entry.version), None)
        if model is None:
            raise BadInput(f"manifest lists no model {entry.model} v{entry.version} for entry {entry.sku}")
        chosen = next((c for c in entry.candidates if c.backend == entry.chosen_backend), None)
        siblings = tuple(a for c in entry.candidates if c.artifact and c.artifact.key != art.key
                         for a in [store.get(c.artifact.key)] if a is not None)
        out.append(Deployable(manifest, model, entry, catalog.get(entry.sku), art, chosen.compiled if chosen else None,
                              siblings))
    if skus and not out and not skipped:
        raise BadInput(f"the manifest has no entry for SKU {', '.join(skus)}; it has "
                       f"{', '.join(e.sku for e in manifest.entries)}")
    return out, skipped


def plan_batching(measurement: Measurement | None, sla_ms: float | None, batchable: bool,
                  unmeasured_max: int = 8, overhead_ms: float = DEFAULT_SERVER_OVERHEAD_MS) -> BatchPlan:
    """Triton batching from the measured curve by the one batching rule the planner also uses
    (``mlopt.runtime.batching.batch_rule``): the largest measured batch that leaves room, within the
    SLA, to wait for one more (2 x its p99 + the server's overhead) is ``max_batch_size``; sizes that
    add at least 10% throughput over every smaller one are preferred; the queue delay is the time a
    full-rate stream takes to fill the batch (p50 x (b - 1) / b), at most what the SLA leaves."""
    if not batchable:
        return BatchPlan(0, (), 0, ("the model has no batch axis: Triton batching is off",))
    if measurement is None or not measurement.batches:
        return BatchPlan(unmeasured_max, (), 0, (f"not measured on this SKU: max_batch_size {unmeasured_max} "
                                                 "is a default, no preferred sizes, no queue delay",))
    batches = sorted(measurement.batches, key=lambda b: b.batch_size)
    rule = batch_rule([b.batch_size for b in batches], [b.p50_ms for b in batches], [b.p99_ms for b in batches],
                      sla_ms, overhead_ms, [b.throughput_per_s for b in batches])
    if not rule.within_sla:
        b = batches[0]
        return BatchPlan(b.batch_size, (), 0, (f"the latency SLA {sla_ms:g} ms cannot be met: p99 at batch "
                                               f"{b.batch_size} is {b.p99_ms:g} ms (+ {overhead_ms:g} ms server "
                                               "overhead); batching kept at its minimum",))
    top = next(b for b in batches if b.batch_size == rule.max_batch)
    notes = [f"max_batch_size {top.batch_size}: p99 {top.p99_ms:g} ms"
             + (f" (x2, + {overhead_ms:g} ms server overhead) within the {sla_ms:g} ms SLA" if sla_ms is not None
                else " (no latency SLA in the recipe)")]
    if sla_ms is None:
        return BatchPlan(top.batch_size, rule.preferred, 0, tuple(notes + ["no SLA: no queue delay"]))
    notes.append(f"queue delay {rule.queue_delay_us} us: queue delay + p99 {top.p99_ms:g} ms + overhead "
                 f"{overhead_ms:g} ms <= SLA {sla_ms:g} ms")
    return BatchPlan(top.batch_size, rule.preferred, rule.queue_delay_us, tuple(notes))


def batch_plan(d: Deployable, options: ServingOptions) -> BatchPlan:
    """The deployable's batching, for the Triton config and the image's own server alike."""
    return plan_batching(d.entry.measurement, options.latency_sla_ms, d.batchable, options.unmeasured_max_batch,
                         options.server_overhead_ms)


def request_limits(d: Deployable, plan: BatchPlan) -> dict[str, int]:
    """What one request may carry: at most the largest measured batch (the measured peak memory,
    which the exported memory request covers, is that batch's), and a body no larger than that
    batch written as JSON."""
    measured = [b.batch_size for b in d.entry.measurement.batches] if d.entry.measurement else []
    batch = max([plan.max_batch_size, *measured]) or 1
    per_sample = [math.prod(i.shape[1:]) if all(isinstance(x, int) for x in i.shape[1:]) else None
                  for i in d.model.inputs]
    body = MAX_BODY if None in per_sample else min(MAX_BODY, BODY_SLACK + batch * JSON_BYTES_PER_ELEMENT * sum(per_sample))
    return {"max_request_batch": batch, "max_body_bytes": body, "max_queue": MAX_QUEUE,
            "max_concurrency": MAX_CONCURRENCY, "keep_alive_s": KEEP_ALIVE_S, "grace_s": GRACE_S}


def memory_request(d: Deployable) -> tuple[int, str]:
    """Bytes of memory to request for one replica, and where the figure comes from."""
    size = d.entry.artifact.size_bytes if d.entry.artifact else 0
    measured = d.entry.measurement.peak_memory_bytes if d.entry.measurement else None
    if measured is None:
        return RUNTIME_OVERHEAD + 2 * size, "artifact size x2 + runtime overhead (memory not measured on this SKU)"
    return RUNTIME_OVERHEAD + max(measured, size), "measured peak memory (at least the artifact size) + runtime overhead"


def max_batch(d: Deployable, options: ServingOptions) -> int:
    """The largest batch the server runs: what one request may carry (``request_limits``), which is at
    least the batch it merges requests up to (``batch_plan``); 1 for a model without a batch axis."""
    return max(1, request_limits(d, batch_plan(d, options))["max_request_batch"])


def per_sample_bytes(d: Deployable) -> int:
    """Memory one more sample of a batch takes: the request's encoding of its inputs, plus the
    activations the measurement saw per sample (peak growth beyond the weights, over its batch)."""
    elements = sum(math.prod(x for x in i.shape[1:] if isinstance(x, int)) for i in d.model.inputs)
    m = d.entry.measurement
    size = d.entry.artifact.size_bytes if d.entry.artifact else 0
    measured_batch = max((b.batch_size for b in m.batches), default=1) if m else 1
    activations = max(0, (m.peak_memory_bytes or 0) - size) // measured_batch if m else 0
    return elements * REQUEST_BYTES_PER_ELEMENT + activations


def memory_limit(d: Deployable, options: ServingOptions) -> tuple[int, str]:
    """Bytes of memory one replica may use: the request plus the largest batch the server accepts
    (``max_batch`` x ``per_sample_bytes``), and at least twice the request (allocator headroom)."""
    request, _ = memory_request(d)
    batch, sample = max_batch(d, options), per_sample_bytes(d)
    return max(2 * request, request + batch * sample), f"request + max batch {batch} x {sample} bytes per sample"


def serve_spec(d: Deployable, options: ServingOptions) -> dict[str, Any]:
    """The ``serve.json`` the in-image entry point reads."""
    plan = batch_plan(d, options)
    return {
        "model": d.model.name, "version": d.entry.version, "sku": d.sku.name, "backend": d.backend,
        "loader": backend_spec(d.backend).loader,  # the mlopt_runtime module entry.py runs the build with
        "precision": d.entry.precision, "model_dir": MODEL_DIR, "entry": d.artifact.meta.get("entry"),
        "inputs": [i.model_dump(mode="json") for i in d.model.inputs], "outputs": list(d.model.outputs),
        "threads": d.threads, "providers": list(d.sku.onnxruntime_providers), "openvino_device": d.sku.openvino_device,
        "port": options.port, "engine_cache": ENGINE_CACHE if is_jit(d.backend) else None,
        "requires": d.artifact.meta.get("requires") or {},
        "batching": {"max_batch_size": plan.max_batch_size, "preferred": list(plan.preferred),
                     "queue_delay_us": plan.queue_delay_us},
        "limits": request_limits(d, plan),
    }


def requirements(d: Deployable) -> str:
    """requirements.txt pinning the runtime the artifact was built and validated with (for an
    on-device engine plan: the engine library and its CUDA binding the plan names)."""
    names = backend_spec(d.backend).serving
    pins = [f"{k}=={v}" for k, v in sorted(d.artifact.meta.get("toolchain", {}).items()) if k in names]
    plan = _read_json(d.artifact.path / "engine_plan.json") or {}
    library = plan.get("library") or {}
    pins += [x for x in (library.get("requires"), library.get("runtime")) if x]
    return "\n".join(["numpy", *SERVER_PACKAGES] + pins) + "\n"


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``folder`` that replaces it when the block succeeds and is
    removed when it fails: a failed write leaves the previous folder (or none), never half of one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp's folder is private; the result is an ordinary folder
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.rename(folder, old / folder.name)
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def removed_on_failure(folder: Path) -> Iterator[None]:
    """A folder that a failing block created is removed again (no empty output folder is left)."""
    created = not folder.exists()
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
