"""What a build is: the typed contents of a stored artifact's ``artifact.json``.

A backend's ``build`` returns a ``BuildOutput`` (its precision, entry point, format and
backend-specific ``details``); the compiler adds what made it (model, SKU, toolchain, validation),
and the store adds the file digests: the whole is a ``BuildMeta``. ``Validation`` is also a part of
the manifest (``mlopt.manifest`` re-exports it), so a stored validation and a reported one are one type.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from mlopt.core.spec import InputSpec, Record, Strict


class Validation(Record):
    status: Literal["passed", "failed", "not-run"]
    max_abs_diff: float | None = None
    atol: float | None = None
    rtol: float | None = None
    reason: str = ""


class BuildOutput(Strict):
    """What ``Backend.build`` returns: every key a backend writes is a field (unknown keys are refused)."""

    precision: str
    entry: str  # the file the runtime loads first
    format: str  # onnx, tvm-relax-vm, openvino-ir, tensorrt-plan ...
    details: dict[str, Any] = {}  # backend-specific facts (tuning, providers, engine plan); shown in the manifest
    session: str | None = None  # ONNX Runtime: the session settings file
    config: str | None = None  # OpenVINO: the compile configuration file
    plan: str | None = None  # TensorRT / MIGraphX: the engine plan file


class FileDigest(Strict):
    sha256: str
    bytes: int


class BuildInfo(BuildOutput):
    """A backend's output plus what made it: what the compiler hands the store."""

    requires: dict[str, Any] = {}  # what the build needs of the CPU that runs it (mlopt.runtime.isa)
    model: str
    model_digest: str
    sku: str
    backend: str
    toolchain: dict[str, str]
    validation: Validation
    build_seconds: float
    signature: list[InputSpec]
    outputs: list[str]


class BuildMeta(BuildInfo):
    """Exactly what ``artifact.json`` holds: the build info plus the store's key and file digests."""

    key: str
    files: dict[str, FileDigest]
    content_digest: str
    created: str

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())


def dump(meta: BaseModel) -> dict[str, Any]:
    """A build model as the dict written to disk: only the keys that were given, as they were given."""
    return meta.model_dump(exclude_unset=True)
