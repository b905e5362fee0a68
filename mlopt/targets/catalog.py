"""The SKU catalog: one YAML file of data (``catalog.yaml``); users pass their own with ``--catalog``.

A SKU's abilities are data (arch, dtypes, needs_gpu, backend order, compiler targets) that the
backends read; nothing in the code branches on a vendor name.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlopt.errors import BadInput, UnknownName

BUNDLED = Path(__file__).with_name("catalog.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(Strict):
    usd_per_hour: float = Field(gt=0, description="On-demand price of one instance of this SKU.")
    source: str = Field(description="Where the price comes from (a public price list and the instance type).")
    date: str = Field(description="When the price was recorded (YYYY-MM).")


class Requirements(Strict):
    driver: str | None = Field(None, description="Minimum kernel driver version (NVIDIA/AMD/Intel).")
    runtimes: dict[str, str] = Field(default_factory=dict, description="Minimum runtime versions, e.g. {cuda: '12.4'}.")
    cpu_flags: list[str] = Field(default_factory=list, description="CPU flags the code needs (from /proc/cpuinfo).")


class Kubernetes(Strict):
    resource: str | None = Field(None, description="Extended resource to request, e.g. nvidia.com/gpu.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels that select this SKU.")


class SKU(Strict):
    """One hardware target in a fleet."""

    name: str
    description: str = ""
    vendor: Literal["intel", "amd", "nvidia", "arm", "generic"]
    kind: Literal["cpu", "gpu"]
    arch: str = Field(description="ISA level or GPU architecture: x86-64-v3, x86-64-v4, armv8.2-a, sm_90, gfx942 ...")
    machine: Literal["x86_64", "aarch64"] = Field("x86_64", description="Host CPU architecture of the SKU.")
    vcpus: int | None = Field(None, gt=0)
    memory_gb: float | None = Field(None, gt=0, description="Host memory (CPU SKUs) or device memory (GPU SKUs).")
    dtypes: list[str] = Field(default_factory=lambda: ["float32"], description="Precisions the hardware runs fast.")
    price: Price | None = None
    requirements: Requirements = Field(default_factory=Requirements)
    base_image: str | None = Field(None, description="Container base image for serving.")
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    backends: list[str] = Field(description="Backends to try, in order.")
    tvm_target: dict[str, Any] | None = Field(None, description="TVM target (dict form) for this SKU.")
    threads: int | None = Field(None, gt=0, description="Threads a deployment uses (defaults to the benchmark plan's).")

    @property
    def needs_gpu(self) -> bool:
        return self.kind == "gpu"


class Catalog(Strict):
    catalog_version: Literal[1] = 1
    skus: list[SKU]

    def get(self, name: str) -> SKU:
        for sku in self.skus:
            if sku.name == name:
                return sku
        raise UnknownName(
            f"unknown SKU {name!r}; choose from {', '.join(s.name for s in self.skus)}",
            hint="`mlopt targets` lists the catalog; add your own with --catalog FILE",
        )


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The bundled catalog, or the one at ``path``."""
    return _load(str(Path(path).resolve()) if path else str(BUNDLED))


@lru_cache(maxsize=8)
def _load(path: str) -> Catalog:
    try:
        raw = yaml.safe_load(Path(path).read_text())
        catalog = Catalog.model_validate(raw)
    except FileNotFoundError:
        raise BadInput(f"catalog {path} does not exist") from None
    except (yaml.YAMLError, ValidationError) as e:
        raise BadInput(f"catalog {path} is invalid: {str(e).splitlines()[0]} ... {str(e).splitlines()[1:3]}") from None
    names = [s.name for s in catalog.skus]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise BadInput(f"catalog {path} names SKUs twice: {', '.join(sorted(dup))}")
    return catalog
