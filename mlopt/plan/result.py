"""The plan ``mlopt plan`` prints (``--json``) and writes Kubernetes files from: strict, versioned,
published as ``mlopt/plan/schemas/plan.schema.json`` (a test keeps the file equal to the models)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlopt.core.spec import Strict

PLAN_SCHEMA_VERSION = "1.1"  # 1.1: pools[].server_overhead_ms and server_overhead_source; batching by batch_rule


class PoolPlan(Strict):
    """One pool: replicas of one build of one model on one SKU and market."""

    name: str = Field(description="model/backend-precision/sku/market.")
    model: str = Field(description="The model, as named in the manifest and traffic.yaml.")
    sku: str = Field(description="The catalog SKU the replicas run on.")
    market: Literal["on-demand", "spot"] = Field(description="The capacity type of the nodes.")
    backend: str = Field(description="The build's backend.")
    precision: str | None = Field(description="The build's precision.")
    manifest: str = Field(description="Path of the manifest the build comes from.")
    entry: int = Field(description="Index of the (model, SKU) entry in that manifest.")
    artifact_key: str = Field(description="The build's content address in the store.")
    image: str | None = Field(description="The image by digest; null when the build has no pushed image.")
    replicas: int = Field(ge=1, description="Replicas at the peak (the Deployment's; the HPA's maximum).")
    max_batch: int = Field(ge=1, description="The batcher's largest batch: for a queueing plan the one the image's "
                                             "serve.json has for this SLA (mlopt.runtime.batching.batch_rule).")
    queue_delay_us: int = Field(ge=0, description="The batcher's queue delay: for a queueing plan the image's "
                                                  "serve.json's for this SLA (batch_rule).")
    server_overhead_ms: float = Field(0.0, ge=0, description="The server's own time per request (HTTP parse and "
                                                             "encode) the prediction and simulation include, and "
                                                             "the batching rule leaves out of the SLA. Since 1.1.")
    server_overhead_source: Literal["fleet", "default"] = Field(
        "default", description="fleet: fleet.yaml's server_overhead_ms for the SKU; default: "
                               "DEFAULT_SERVER_OVERHEAD_MS (not measured for this fleet). Since 1.1.")
    replica_capacity_rps: float = Field(description="Requests/s one replica serves within the SLA (after any "
                                                    "derating by the simulation).")
    derate: float = Field(description="Factor the simulation applied to the queueing model's capacity (1: none).")
    blind_capacity_rps: float | None = Field(description="Mélange's queueing-blind capacity of one replica.")
    weight: float = Field(description="Share of the model's traffic routed to this pool.")
    peak_rps: float = Field(description="The pool's rate at the model's peak.")
    usd_per_hour: float = Field(description="The pool's price: replicas x the unit price of its market.")
    predicted_p99_ms: float | None = Field(description="Queueing model's p99 at the pool's peak rate; null when "
                                                       "that rate overloads a replica (a queueing-blind plan).")
    simulated_p50_ms: float = Field(description="Simulated p50 of the pool's requests at the model's peak.")
    simulated_p99_ms: float = Field(description="Simulated p99 of the pool's requests at the model's peak.")


class ModelPlan(Strict):
    """One model's pools and what the simulation measured."""

    model: str = Field(description="The model.")
    priority: Literal["critical", "high", "normal", "low"] = Field(description="Its priority class.")
    n_plus_one: bool = Field(description="Whether its pools survive losing any one replica.")
    mean_rps: float = Field(description="Mean request rate (traffic.yaml).")
    peak_rps: float = Field(description="Peak request rate the plan serves (traffic.yaml).")
    p99_sla_ms: float = Field(description="The p99 SLA (traffic.yaml).")
    arrival_cv: float = Field(description="Coefficient of variation of the arrivals the plan assumed.")
    weights: dict[str, float] = Field(description="Pool name -> share of the model's traffic.")
    predicted_p99_ms: float | None = Field(description="Largest predicted p99 over the model's pools (null: a "
                                                       "pool is overloaded).")
    simulated_p50_ms: float = Field(description="Simulated p50 over all its requests at the peak rate.")
    simulated_p99_ms: float = Field(description="Simulated p99 over all its requests at the peak rate.")
    meets_sla: bool = Field(description="simulated_p99_ms <= p99_sla_ms.")


class Binding(Strict):
    """A constraint the plan is held by, and what relaxing it by one unit would do."""

    constraint: Literal["inventory", "spot-share", "n-plus-one"] = Field(description="Which kind of constraint.")
    subject: str = Field(description="The SKU (inventory), the fleet (spot share) or the model (N+1).")
    detail: str = Field(description="What binds, in words.")
    usd_per_hour_saved_by_one_more: float | None = Field(description="$/h saved with one more unit of it "
                                                                     "(inventory), or without it (n-plus-one), "
                                                                     "re-solved; null where not computed.")


class Plan(Strict):
    """The cheapest mix of pools that meets every model's p99 SLA, checked by simulation."""

    schema_version: Literal["1.1"] = Field(PLAN_SCHEMA_VERSION, description="Version of this document's schema.")
    objective: str = Field(description="What was minimised, in order.")
    capacity_model: Literal["queueing", "blind"] = Field(description="queueing: Allen-Cunneen with the arrival "
                                                                     "variability; blind: Mélange's (no queueing).")
    usd_per_hour: float = Field(description="The plan's price: every pool's replicas at their unit prices.")
    usd_per_million: float = Field(description="$/h divided by the inferences an hour at the mean rates, x 1e6.")
    skus: list[str] = Field(description="The distinct SKUs the plan uses.")
    pools: list[PoolPlan] = Field(description="The pools with at least one replica.")
    models: list[ModelPlan] = Field(description="Per model: routing and the simulated figures.")
    binding: list[Binding] = Field(description="Constraints the plan is held by.")
    excluded: list[str] = Field(description="Builds no pool was made of, and why.")
    derate_rounds: int = Field(description="Times the simulation derated a pool and the plan was re-solved.")
    solve_seconds: float = Field(description="Time in the solver, the derating re-solves included (not those of the binding constraints).")
    what_if: str | None = Field(None, description="The --what-if applied to the inputs.")
    baseline_usd_per_hour: float | None = Field(None, description="With --what-if: the plan's $/h without it.")
    meets_sla: bool = Field(description="Every model's simulated p99 is within its SLA.")
    catalog: str | None = Field(None, description="The catalog file the fleet named (null: the bundled one).")
    gateway: str = Field(description="The Gateway the HTTPRoutes attach to.")
    capacity_type_label: str = Field(description="Node label selecting on-demand or spot nodes.")


def plan_schema() -> dict:
    schema = Plan.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://mlopt.dev/schemas/plan-{PLAN_SCHEMA_VERSION}.json"
    return schema
