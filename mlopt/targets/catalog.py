"""The SKU catalog: one YAML file of data (``catalog.yaml``); users pass their own with ``--catalog``.

A SKU's abilities are data (arch, dtypes, needs_gpu, backend order, compiler targets, execution
providers) that the backends read; nothing in the code branches on a vendor name.

A user's catalog file extends the bundled one by default (``extends: bundled``): its ``skus`` add
new SKUs or replace bundled ones of the same name, and ``overrides`` patch fields of bundled SKUs
(a fleet's own prices, for example). ``extends: none`` makes the file the whole catalog.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from mlopt.core.errors import BadInput, UnknownName
from mlopt.core.files import deep_merge
from mlopt.core.spec import Strict

BUNDLED = Path(__file__).with_name("catalog.yaml")
RESERVED = {"host"}  # target names that are not SKUs (``detect.resolve_targets`` resolves them)


class Price(Strict):
    usd_per_hour: float = Field(gt=0, description="On-demand price of one unit of this SKU (one GPU, or one instance for CPU SKUs).")
    source: str = Field(description="Where the price comes from (a public price list and the instance type).")
    date: str = Field(description="When the price was recorded (YYYY-MM).")


class Requirements(Strict):
    driver: str | None = Field(None, description="Minimum kernel driver version (NVIDIA driver, amdgpu, Intel compute runtime).")
    runtimes: dict[str, str] = Field(default_factory=dict,
                                     description="Minimum runtime versions: cuda, rocm, oneapi, level_zero.")
    cpu_flags: list[str] = Field(default_factory=list, description="CPU flags the code needs (from /proc/cpuinfo).")


class Kubernetes(Strict):
    resource: str | None = Field(None, description="Extended resource to request, e.g. nvidia.com/gpu.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels that select this SKU.")
    operator: str | None = Field(None, description="The cluster operator that manages this SKU's drivers.")


class Peak(Strict):
    """Dense peak rates from the vendor's data sheet (no sparsity); null where the sheet gives none."""

    fp32_tflops: float | None = Field(None, gt=0)
    fp16_tflops: float | None = Field(None, gt=0)
    bf16_tflops: float | None = Field(None, gt=0)
    int8_tops: float | None = Field(None, gt=0)
    fp8_tflops: float | None = Field(None, gt=0)
    source: str = Field("", description="Where the figures come from.")


class Device(Strict):
    """How detection tools name this SKU, to match what `mlopt doctor` finds."""

    match: list[str] = Field(default_factory=list,
                             description="Regular expressions for the product name reported by nvidia-smi/NVML, "
                                         "amd-smi/rocm-smi or xpu-smi/sysfs (case-insensitive, searched).")
    pci_ids: list[str] = Field(default_factory=list, description="PCI vendor:device ids, e.g. '10de:2330'.")


SKU_NAME = r"^[a-z0-9][a-z0-9._-]{0,127}$"  # mlopt.core.util.NAME_PATTERN, lower-case


class SKU(Strict):
    """One hardware target in a fleet."""

    name: str = Field(pattern=SKU_NAME, description="Lower-case; it becomes paths and image tags.")
    aliases: list[Annotated[str, Field(pattern=SKU_NAME)]] = Field(
        default_factory=list, description="Other names `--target` accepts.")
    description: str = ""
    vendor: Literal["intel", "amd", "nvidia", "arm", "generic"]
    kind: Literal["cpu", "gpu"]
    arch: str = Field(description="ISA level or GPU architecture: x86-64-v3, x86-64-v4, armv8.2-a, sm_90, gfx942 ...")
    machine: Literal["x86_64", "aarch64"] = Field("x86_64", description="Host CPU architecture of the SKU.")
    vcpus: int | None = Field(None, gt=0)
    memory_gb: float | None = Field(None, gt=0, description="Host memory (CPU SKUs) or device memory (GPU SKUs).")
    memory_bandwidth_gbps: float | None = Field(None, gt=0, description="Memory bandwidth in GB/s.")
    peak: Peak | None = Field(None, description="Peak dense compute rates.")
    dtypes: list[str] = Field(default_factory=lambda: ["float32"], description="Precisions the hardware runs fast.")
    price: Price | None = None
    price_note: str | None = Field(None, description="Why there is no price, where there is none.")
    requirements: Requirements = Field(default_factory=Requirements)
    base_image: str | None = Field(None, description="Container base image for serving.")
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    device: Device = Field(default_factory=Device)
    backends: list[str] = Field(description="Backends to try, in order.")
    tvm_target: dict[str, Any] | None = Field(None, description="TVM target (dict form) for this SKU.")
    onnxruntime_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1,
                                             description="ONNX Runtime execution providers to serve with, in order.")
    openvino_device: str | None = Field(None, description="OpenVINO device name (CPU, GPU) for this SKU.")
    threads: int | None = Field(None, gt=0, description="Threads a deployment uses (defaults to the benchmark plan's).")
    ray_accelerator: str | None = Field(
        None, description="Ray's accelerator type for this GPU (`ray.util.accelerators`: H100, A10G, "
                          "AMD-Instinct-MI300X-OAM ...): build-matrix tasks that need the device ask Ray for "
                          "`accelerator_type:<this>`.")

    @property
    def needs_gpu(self) -> bool:
        return self.kind == "gpu"

    @property
    def requires(self) -> dict[str, Any]:
        """What machine code built for this SKU needs of the CPU running it (``mlopt.runtime.isa``);
        a GPU SKU's host code needs only its machine type."""
        return {"machine": self.machine, "cpu_flags": list(self.requirements.cpu_flags)}

    @field_validator("device")
    @classmethod
    def _regexes_compile(cls, v: Device) -> Device:
        for pattern in v.match:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"device.match {pattern!r} is not a regular expression: {e}") from None
        return v

    def matches_device(self, product: str) -> bool:
        return any(re.search(p, product, re.IGNORECASE) for p in self.device.match)


class Catalog(Strict):
    catalog_version: Literal[1] = 1
    skus: list[SKU]

    def get(self, name: str) -> SKU:
        wanted = name.lower()
        for sku in self.skus:
            if wanted == sku.name or wanted in sku.aliases:
                return sku
        names = [s.name for s in self.skus] + [a for s in self.skus for a in s.aliases]
        close = difflib.get_close_matches(wanted, names, n=1)
        raise UnknownName(
            f"unknown SKU {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; choose from {', '.join(s.name for s in self.skus)}",
            hint="`mlopt targets` lists the catalog; add your own with --catalog FILE",
        )


class _UserFile(Strict):
    catalog_version: Literal[1] = 1
    extends: Literal["bundled", "none"] = "bundled"
    skus: list[dict[str, Any]] = Field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The bundled catalog, or the bundled one extended by the file at ``path``."""
    return _load(str(Path(path).resolve()) if path else None)


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"catalog {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"catalog {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"catalog {path} is not valid YAML: {e}") from None


def _problem(path: Path, e: ValidationError, skus: list[dict[str, Any]]) -> BadInput:
    errors = e.errors()
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains a missing field
    loc = list(err["loc"])
    where = ".".join(str(p) for p in loc)
    if len(loc) >= 2 and loc[0] == "skus" and isinstance(loc[1], int) and loc[1] < len(skus):
        where = f"SKU {skus[loc[1]].get('name', loc[1])!r}: " + ".".join(str(p) for p in loc[2:])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        known = list(SKU.model_fields) if len(loc) == 3 else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        msg = f"unknown field {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return BadInput(f"catalog {path} is invalid: {where}: {msg}", hint="every field is described in mlopt/targets/catalog.py")


@lru_cache(maxsize=8)
def _load(path: str | None) -> Catalog:
    bundled = _read(BUNDLED)
    if path is None:
        return _validate(BUNDLED, bundled)
    raw = _read(Path(path))
    if not isinstance(raw, dict):
        raise BadInput(f"catalog {path} must be a mapping with a 'skus' list")
    try:
        user = _UserFile.model_validate(raw)
    except ValidationError as e:
        raise _problem(Path(path), e, raw.get("skus") or []) from None
    base = [] if user.extends == "none" else list(bundled["skus"])
    by_name = {s["name"]: i for i, s in enumerate(base)}
    for sku in user.skus:
        if sku.get("name") in by_name:
            base[by_name[sku["name"]]] = sku
        else:
            by_name[sku.get("name")] = len(base)
            base.append(sku)
    for name, patch in user.overrides.items():
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            raise BadInput(f"catalog {path} overrides unknown SKU {name!r}"
                           + (f" (did you mean {close[0]!r}?)" if close else ""))
        base[by_name[name]] = deep_merge(base[by_name[name]], patch)
    return _validate(Path(path), {"catalog_version": 1, "skus": base})


def _validate(path: Path, raw: Any) -> Catalog:
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as e:
        raise _problem(path, e, (raw or {}).get("skus") or [] if isinstance(raw, dict) else []) from None
    names = [n for s in catalog.skus for n in (s.name, *s.aliases)]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise BadInput(f"catalog {path} names SKUs twice: {', '.join(sorted(dup))}")
    if RESERVED & set(names):
        raise BadInput(f"catalog {path} names a SKU {', '.join(sorted(RESERVED & set(names)))!r}, which is "
                       "reserved: it means the best SKU this machine runs", hint="rename that SKU")
    return catalog
