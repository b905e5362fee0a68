"""The planner's inputs: ``fleet.yaml`` (what hardware there is, at what price) and ``traffic.yaml``
(what each model must serve, how fast). Both are strict (unknown keys are errors), versioned and
published as JSON Schemas in ``mlopt/plan/schemas/``; a test keeps the files equal to the models.

``--what-if`` edits them before planning: ``rate=1.5`` multiplies every rate, ``sla=0.8`` every
p99 SLA, ``remove=SKU`` takes a SKU out of the fleet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from mlopt.core.errors import BadInput
from mlopt.core.spec import Strict
from mlopt.runtime.batching import DEFAULT_SERVER_OVERHEAD_MS
from mlopt.targets.catalog import Catalog, load_catalog

INPUT_SCHEMA_VERSION = "1.0"  # traffic.yaml
FLEET_SCHEMA_VERSION = "1.1"  # 1.1: skus.<sku>.server_overhead_ms
PRIORITIES: dict[str, int] = {"critical": 1_000_000, "high": 100_000, "normal": 10_000, "low": 1_000}
"""Priority class -> Kubernetes PriorityClass value (higher is scheduled first, evicted last)."""


class SkuFleet(Strict):
    """The units of one catalog SKU the fleet may use (a GPU, or one instance of a CPU SKU)."""

    zones: dict[str, int] = Field(min_length=1, description="Nodes of this SKU per zone (zone name -> count).")
    gpus_per_node: int = Field(1, ge=1, description="Units per node: GPUs on a GPU node, 1 for a CPU instance. "
                                                    "A replica takes one unit.")
    on_demand_usd_per_hour: float | None = Field(None, gt=0, description="On-demand price of one unit; default: "
                                                                         "the catalog's price of the SKU.")
    spot_usd_per_hour: float | None = Field(None, gt=0, description="Spot price of one unit; absent: no spot "
                                                                    "capacity for this SKU.")
    server_overhead_ms: float | None = Field(
        None, ge=0, description="The serving runtime's own time per request on this SKU (HTTP parse and encode, "
                                "hand-offs; bench/plan_vs_server.py measures it: latency at one client less the "
                                "queue delay and the model's compute). Default: DEFAULT_SERVER_OVERHEAD_MS of "
                                "mlopt.runtime.batching (1.3 ms, measured on a 2-core x86-64-v3 machine); the plan "
                                "records which was used. Since schema 1.1.")

    @model_validator(mode="after")
    def _counts(self) -> "SkuFleet":
        if any(n < 0 for n in self.zones.values()):
            raise ValueError("zone counts must be >= 0")
        return self

    @property
    def units(self) -> int:
        """Units over every zone."""
        return sum(self.zones.values()) * self.gpus_per_node


class Fleet(Strict):
    """``fleet.yaml``: per catalog SKU, how many units there are and what they cost."""

    schema_version: Literal["1.0", "1.1"] = Field(FLEET_SCHEMA_VERSION, description="Version of this file's schema "
                                                                                "(1.0 files read as they are).")
    catalog: str | None = Field(None, description="A catalog file extending the bundled one (as --catalog); "
                                                  "relative to this file.")
    max_spot_share: float = Field(0.5, ge=0, le=1, description="Largest share of the plan's replicas on spot "
                                                               "capacity.")
    capacity_type_label: str = Field("karpenter.sh/capacity-type", description="Node label whose value is "
                                                                               "'on-demand' or 'spot'.")
    gateway: str = Field("mlopt", description="Name of the Gateway the HTTPRoutes attach to.")
    skus: dict[str, SkuFleet] = Field(min_length=1, description="Catalog SKU name -> its units and prices.")


class ModelTraffic(Strict):
    """What one model must serve."""

    mean_rps: float = Field(gt=0, description="Mean request rate (requests/s); prices $ per million inferences.")
    peak_rps: float = Field(gt=0, description="Peak request rate the plan must serve within the SLA.")
    p99_sla_ms: float = Field(gt=0, description="99th percentile end-to-end latency the model must meet (ms).")
    priority: Literal["critical", "high", "normal", "low"] = Field("normal", description="Priority class.")
    arrival_cv: float | None = Field(None, gt=0, description="Coefficient of variation of inter-arrival times: 1 "
                                                             "is Poisson, above 1 bursty (default 1).")
    trace: str | None = Field(None, description="File of arrival timestamps (seconds, one a line), relative to "
                                                "this file; replayed by the simulation, scaled to the peak rate.")
    accuracy_floor: float | None = Field(None, description="Lowest acceptable measured accuracy metric; a build "
                                                           "without a measured accuracy, or below it, is excluded.")
    n_plus_one: bool | None = Field(None, description="Keep the peak rate with any one replica lost; default: "
                                                      "true for the critical class.")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelTraffic":
        if self.peak_rps < self.mean_rps:
            raise ValueError(f"peak_rps {self.peak_rps:g} is below mean_rps {self.mean_rps:g}")
        if self.arrival_cv is not None and self.trace is not None:
            raise ValueError("give arrival_cv or trace, not both")
        return self

    @property
    def redundant(self) -> bool:
        """Whether the model's pools must survive losing one replica."""
        return self.n_plus_one if self.n_plus_one is not None else self.priority == "critical"


class Traffic(Strict):
    """``traffic.yaml``: per model, its rates, SLA and class."""

    schema_version: Literal["1.0"] = Field(INPUT_SCHEMA_VERSION, description="Version of this file's schema.")
    headroom: float = Field(0.1, ge=0, le=2, description="Capacity above the peak rate the plan keeps (0.1: 10%).")
    models: dict[str, ModelTraffic] = Field(min_length=1, description="Model name (as in the manifest) -> traffic.")


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{what} file {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{what} file {path} is not valid YAML: {e}") from None


def _validate(cls: type[Strict], raw: Any, path: Path, what: str) -> Any:
    if not isinstance(raw, dict):
        raise BadInput(f"{what} file {path} must be a mapping")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = next((x for x in e.errors() if x["type"] == "extra_forbidden"), e.errors()[0])
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = f"unknown field {err['loc'][-1]!r}" if err["type"] == "extra_forbidden" else err["msg"]
        raise BadInput(f"{what} file {path} is invalid at {where}: {msg}",
                       hint=f"the schema is mlopt/plan/schemas/{what}.schema.json") from None


def load_fleet(path: str | Path) -> Fleet:
    """Read and check ``fleet.yaml``: every SKU must be in the catalog and have a price."""
    path = Path(path)
    fleet = _validate(Fleet, _read_yaml(path, "fleet"), path, "fleet")
    if fleet.catalog:
        fleet = fleet.model_copy(update={"catalog": str((path.parent / fleet.catalog).resolve())})
    check_fleet(fleet, catalog_of(fleet))
    return fleet


def load_traffic(path: str | Path) -> Traffic:
    """Read ``traffic.yaml``; trace paths are made absolute (relative to the file)."""
    path = Path(path)
    traffic = _validate(Traffic, _read_yaml(path, "traffic"), path, "traffic")
    models = {name: t.model_copy(update={"trace": str((path.parent / t.trace).resolve())}) if t.trace else t
              for name, t in traffic.models.items()}
    return traffic.model_copy(update={"models": models})


def catalog_of(fleet: Fleet) -> Catalog:
    """The catalog the fleet names (the bundled one by default)."""
    return load_catalog(fleet.catalog)


def check_fleet(fleet: Fleet, catalog: Catalog) -> None:
    """Every fleet SKU exists in the catalog (an unknown one is ``UnknownName``) and has a price."""
    for name in fleet.skus:
        if catalog.get(name).name != name:
            raise BadInput(f"fleet SKU {name!r} is an alias; use the catalog name {catalog.get(name).name!r}")
        on_demand_price(fleet, catalog, name)


def server_overhead(fleet: Fleet, sku: str) -> tuple[float, Literal["fleet", "default"]]:
    """The server's per-request overhead (ms) on ``sku``: the fleet's figure, else the stated default."""
    given = fleet.skus[sku].server_overhead_ms
    return (given, "fleet") if given is not None else (DEFAULT_SERVER_OVERHEAD_MS, "default")


def on_demand_price(fleet: Fleet, catalog: Catalog, sku: str) -> float:
    """$/h of one on-demand unit: the fleet's price, else the catalog's."""
    given = fleet.skus[sku].on_demand_usd_per_hour
    if given is not None:
        return given
    price = catalog.get(sku).price
    if price is None:
        raise BadInput(f"SKU {sku!r} has no price in the catalog", hint="give on_demand_usd_per_hour in fleet.yaml")
    return price.usd_per_hour


def apply_what_if(fleet: Fleet, traffic: Traffic, what_if: str | None) -> tuple[Fleet, Traffic]:
    """The inputs edited by one ``--what-if``: ``rate=X``, ``sla=X`` or ``remove=SKU``."""
    if not what_if:
        return fleet, traffic
    kind, _, value = what_if.partition("=")
    if kind == "remove":
        if value not in fleet.skus:
            raise BadInput(f"--what-if remove={value}: the fleet has no SKU {value!r}; it has "
                           f"{', '.join(sorted(fleet.skus))}")
        if len(fleet.skus) == 1:
            raise BadInput(f"--what-if remove={value} would leave the fleet empty")
        return fleet.model_copy(update={"skus": {k: v for k, v in fleet.skus.items() if k != value}}), traffic
    if kind not in ("rate", "sla"):
        raise BadInput(f"unknown --what-if {what_if!r}; choose from rate=X, sla=X, remove=SKU")
    try:
        factor = float(value)
    except ValueError:
        raise BadInput(f"--what-if {what_if!r}: {value!r} is not a number") from None
    if not factor > 0:
        raise BadInput(f"--what-if {what_if!r}: the factor must be positive")
    fields = ("mean_rps", "peak_rps") if kind == "rate" else ("p99_sla_ms",)
    models = {n: t.model_copy(update={f: getattr(t, f) * factor for f in fields}) for n, t in traffic.models.items()}
    return fleet, traffic.model_copy(update={"models": models})
