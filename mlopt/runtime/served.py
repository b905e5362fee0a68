"""The model behind an image's server: loads the build named by ``serve.json`` through its runtime
loader, warms it up (which also gives the outputs' datatypes and shapes), and runs requests through
the dynamic batcher. Protocol front ends (``http_server``, ``grpc_server``) share one ``ServedModel``.

serve.json's ``batching`` (max batch size and queue delay, from the measured curve and the latency
SLA: the numbers the Triton config gets) and ``limits`` (per-request batch and body, queue length,
concurrency, keep-alive, drain grace) set the serving behaviour; an older serve.json without them
serves one request per run with the defaults below.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import load as load_build
from .batcher import BatchConfig, Batcher
from .v2 import DTYPE_V2, Signature, TensorSpec, signature_from_spec, zeros

DEFAULT_LIMITS = {"max_request_batch": 64, "max_body_bytes": 64 << 20, "max_queue": 256, "max_concurrency": 1024,
                  "keep_alive_s": 30, "grace_s": 25}


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_batch: int
    max_body_bytes: int
    max_queue: int
    max_concurrency: int
    keep_alive_s: int
    grace_s: int

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> Limits:
        given = spec.get("limits") or {}
        return cls(**{k: int(given.get(k, v)) for k, v in DEFAULT_LIMITS.items()})


def load_runner(spec: Mapping[str, Any], model_dir: Path | None = None) -> Any:
    """The callable that runs the build named by a serve.json ``spec`` (its CPU needs checked first;
    a missing runtime library or device raises ``runtime.Unavailable``, exit 4)."""
    return load_build(spec["loader"], Path(model_dir or spec["model_dir"]), spec, spec.get("threads"))


class ServedModel:
    """One build, loading or loaded, with its batcher and its drain state."""

    def __init__(self, spec: Mapping[str, Any], model_dir: Path | None = None):
        self.spec = spec
        self.model_dir = model_dir
        self.name, self.version = str(spec["model"]), str(spec["version"])
        self.limits = Limits.of(spec)
        batching = spec.get("batching") or {}
        self.max_batch = int(batching.get("max_batch_size", 0))
        self.queue_delay_us = int(batching.get("queue_delay_us", 0))
        self.preferred = [int(b) for b in batching.get("preferred", [])]
        self.runner: Any = None
        self.signature: Signature | None = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self.exit_code = 0  # of a failed load: 4 where the runtime library or device is missing
        self.draining = False
        self.inflight = 0  # requests being answered (the drain waits for them)
        self.loaded_at: float | None = None
        self._count = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    @property
    def drained(self) -> bool:
        return self.inflight == 0 and (self.batcher is None or self.batcher.idle)

    def enter(self) -> None:
        """A request starts (HTTP on the event loop, gRPC on its threads)."""
        with self._count:
            self.inflight += 1

    def leave(self) -> None:
        with self._count:
            self.inflight -= 1

    def load(self) -> None:
        """Load, warm up on zeros, start the batcher; a failure is kept for the liveness probe."""
        try:
            runner = load_runner(self.spec, self.model_dir)
            sig = signature_from_spec(self.spec, (), self.limits.max_request_batch)
            out = runner(zeros(sig))  # the first run also pays for lazy initialisation, before ready
            sig = dataclasses.replace(sig, outputs=self._outputs(out, sig.batched))
            batcher = Batcher(runner, BatchConfig(self.max_batch if sig.batched else 0, self.queue_delay_us / 1e6,
                                                  self.limits.max_queue))
            batcher.start()
            self.runner, self.signature, self.batcher, self.loaded_at = runner, sig, batcher, time.time()
        except Exception as e:  # reported by /v2/health/live and the log; the pod restarts
            self.error = f"{type(e).__name__}: {e}"
            self.exit_code = getattr(e, "exit_code", 1)
            print(f"entry: loading {self.name} failed: {self.error}", file=sys.stderr, flush=True)

    def _outputs(self, out: Mapping[str, Any], batched: bool) -> tuple[TensorSpec, ...]:
        names = [n for n in self.spec.get("outputs", []) if n in out] or list(out)
        specs = []
        for n in names:
            arr = np.asarray(out[n])
            shape = tuple(-1 if (k == 0 and batched) else d for k, d in enumerate(arr.shape))
            specs.append(TensorSpec(n, str(arr.dtype), shape))
        return tuple(specs)

    def start_loading(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="mlopt-load", daemon=True)
        t.start()
        return t

    # ------------------------------------------------------------ what the protocol reports
    def metadata(self) -> dict[str, Any]:
        assert self.signature is not None
        return {"name": self.name, "versions": [self.version], "platform": str(self.spec.get("backend", "")),
                "inputs": [i.metadata() for i in self.signature.inputs],
                "outputs": [o.metadata() for o in self.signature.outputs]}

    def config(self) -> dict[str, Any]:
        """The model's configuration in the JSON form of Triton's ModelConfig."""
        assert self.signature is not None
        batched = self.signature.batched

        def decl(t: TensorSpec) -> dict[str, Any]:
            dims = list(t.shape[1:] if batched else t.shape)
            return {"name": t.name, "data_type": f"TYPE_{DTYPE_V2[t.dtype]}", "dims": dims}
        cfg = {"name": self.name, "platform": "", "backend": str(self.spec.get("backend", "")),
               "version_policy": {"specific": {"versions": [self.version]}},
               "max_batch_size": self.max_batch if batched else 0,
               "input": [decl(i) for i in self.signature.inputs], "output": [decl(o) for o in self.signature.outputs],
               "instance_group": [{"name": self.name, "kind": "KIND_CPU" if "cpu" in str(self.spec.get("sku", "cpu"))
                                   else "KIND_GPU", "count": 1}]}
        if batched and self.max_batch:
            cfg["dynamic_batching"] = {"preferred_batch_size": self.preferred,
                                       "max_queue_delay_microseconds": self.queue_delay_us,
                                       "default_queue_policy": {"max_queue_size": self.limits.max_queue}}
        return cfg

    def statistics(self) -> dict[str, Any]:
        """This model's entry of Triton's statistics extension."""
        s = self.batcher.stats if self.batcher else None

        def pair(v: list[int] | None) -> dict[str, int]:
            return {"count": v[0], "ns": v[1]} if v else {"count": 0, "ns": 0}
        zero = pair(None)
        return {"name": self.name, "version": self.version, "last_inference": s.last_inference_ms if s else 0,
                "inference_count": s.inference_count if s else 0, "execution_count": s.execution_count if s else 0,
                "inference_stats": {"success": pair(s and s.success), "fail": pair(s and s.fail),
                                    "queue": pair(s and s.queue), "compute_input": zero,
                                    "compute_infer": pair(s and s.compute), "compute_output": zero,
                                    "cache_hit": zero, "cache_miss": zero},
                "batch_stats": [{"batch_size": b, "compute_input": {"count": c, "ns": 0},
                                 "compute_infer": {"count": c, "ns": ns}, "compute_output": {"count": c, "ns": 0}}
                                for b, (c, ns) in sorted((s.batches if s else {}).items())],
                "memory_usage": []}

    def state(self) -> dict[str, Any]:
        """This model's row of the repository index."""
        state = "READY" if self.batcher else ("UNAVAILABLE" if self.error else "LOADING")
        return {"name": self.name, "version": self.version, "state": state, "reason": self.error or ""}
