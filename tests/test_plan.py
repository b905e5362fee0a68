"""mlopt plan: inputs, capacity, the MILP, the simulation, the Kubernetes files (offline, fast).

Every GPU figure here is a FIXTURE (tests/plan_fixtures.py): synthetic batch curves, not measured.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

import plan_fixtures as fx
from mlopt.core.errors import BadInput, UnknownName
from mlopt.plan import queueing
from mlopt.plan.assemble import make_plan
from mlopt.plan.command import plan_command
from mlopt.plan.curve import Curve
from mlopt.plan.inputs import Fleet, ModelTraffic, SkuFleet, Traffic, load_fleet, load_traffic
from mlopt.plan.k8s import HTTPROUTE_SCHEMA, validate_http_route, write_k8s
from mlopt.plan.planner import Options
from mlopt.plan.schemas import SCHEMA_DIR, schemas
from mlopt.plan.simulate import Served, simulate_model
from mlopt.runtime.batching import DEFAULT_SERVER_OVERHEAD_MS

pytest.importorskip("scipy")


def _fleet(overhead_ms: float | None = None, **units: int) -> Fleet:
    extra = {} if overhead_ms is None else {"server_overhead_ms": overhead_ms}
    return Fleet.model_validate({"skus": {k: {"zones": {"zone-a": n}, **extra} for k, n in units.items()}})


def _traffic(**models: dict) -> Traffic:
    return Traffic.model_validate({"models": models})


@pytest.fixture
def two_models(tmp_path: Path) -> Path:
    """vision runs cheapest per request on t4, llm on l4 (FIXTURE curves)."""
    return fx.write(tmp_path / "manifest.json", [
        fx.entry("vision", "t4", [fx.candidate("vision", "t4", "tensorrt", "float16", fx.curve(2.0, 0.3))]),
        fx.entry("vision", "l4", [fx.candidate("vision", "l4", "tensorrt", "float16", fx.curve(1.8, 0.25))]),
        fx.entry("llm", "t4", [fx.candidate("llm", "t4", "tensorrt", "float16", fx.curve(20.0, 4.0))]),
        fx.entry("llm", "l4", [fx.candidate("llm", "l4", "tensorrt", "float16", fx.curve(6.0, 1.0))]),
    ])


TWO = {"vision": {"mean_rps": 1000, "peak_rps": 2000, "p99_sla_ms": 40},
       "llm": {"mean_rps": 200, "peak_rps": 400, "p99_sla_ms": 60}}


def test_schemas_match_the_models_and_every_input_field_is_described() -> None:
    for name, schema in schemas().items():
        assert json.loads((SCHEMA_DIR / name).read_text()) == json.loads(json.dumps(schema)), \
            f"{name} is stale: run python -m mlopt.plan.schemas"
    for model in (Fleet, SkuFleet, Traffic, ModelTraffic):
        assert all(f.description for f in model.model_fields.values()), model.__name__


def test_inputs_are_strict(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"skus": {"t4": {"zones": {"a": 1}, "gpus": 2}}}))
    with pytest.raises(BadInput, match="unknown field 'gpus'") as e:
        load_fleet(tmp_path / "fleet.yaml")
    assert e.value.exit_code == 2
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"skus": {"t5": {"zones": {"a": 1}}}}))
    with pytest.raises(UnknownName, match="unknown SKU 't5'; choose from .*t4"):
        load_fleet(tmp_path / "fleet.yaml")
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump({"models": {"m": {"mean_rps": 5, "peak_rps": 1,
                                                                             "p99_sla_ms": 10}}}))
    with pytest.raises(BadInput, match="peak_rps 1 is below mean_rps 5"):
        load_traffic(tmp_path / "traffic.yaml")
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"skus": {"mi210": {"zones": {"a": 1}}}}))
    with pytest.raises(BadInput, match="SKU 'mi210' has no price in the catalog"):
        load_fleet(tmp_path / "fleet.yaml")


def test_a_mix_of_two_skus_is_cheaper_than_any_single_sku(two_models: Path) -> None:
    fleet, traffic = _fleet(t4=200, l4=200), _traffic(**TWO)
    plan = make_plan([two_models], fleet, traffic)
    assert set(plan.skus) == {"t4", "l4"} and plan.meets_sla
    assert {p.model: p.sku for p in plan.pools} == {"vision": "t4", "llm": "l4"}
    for sku in ("t4", "l4"):
        single = make_plan([two_models], fleet, traffic, Options(only_sku=sku, bindings=False))
        assert single.meets_sla and plan.usd_per_hour < single.usd_per_hour, sku


def test_binding_inventory_is_exit_2_naming_the_sku_and_one_more_unit(two_models: Path, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"skus": {"l4": {"zones": {"a": 1}}}}))
    traffic = tmp_path / "traffic.yaml"
    traffic.write_text(yaml.safe_dump({"models": TWO}))
    with pytest.raises(BadInput) as e:
        plan_command([two_models], fleet, traffic, console=Console(file=io.StringIO()))
    assert e.value.exit_code == 2
    assert "inventory is binding" in e.value.message and "SKU l4 (inventory 1 units)" in e.value.message
    assert "vision" in e.value.message and "llm" in e.value.message


def test_one_unit_short_says_what_one_more_would_cost(two_models: Path) -> None:
    traffic = _traffic(llm=TWO["llm"])
    need = make_plan([two_models], _fleet(l4=40), traffic).pools[0].replicas
    with pytest.raises(BadInput, match=rf"l4 \(inventory {need - 1} units\) is 1 unit\(s\) short for llm; "
                                       r"with one more unit of l4 the plan costs \$"):
        make_plan([two_models], _fleet(l4=need - 1), traffic)


def test_n_plus_one_adds_a_replica(two_models: Path) -> None:
    normal = make_plan([two_models], _fleet(l4=40), _traffic(llm=TWO["llm"]))
    critical = make_plan([two_models], _fleet(l4=40), _traffic(llm={**TWO["llm"], "priority": "critical"}))
    assert sum(p.replicas for p in critical.pools) == sum(p.replicas for p in normal.pools) + 1
    assert critical.models[0].n_plus_one and any(b.constraint == "n-plus-one" for b in critical.binding)


def test_accuracy_floor_excludes_the_int8_variant(tmp_path: Path) -> None:
    m = fx.write(tmp_path / "m.json", [fx.entry("vision", "t4", [
        fx.candidate("vision", "t4", "tensorrt", "float16", fx.curve(2.0, 0.3), accuracy=0.90),
        fx.candidate("vision", "t4", "tensorrt", "int8", fx.curve(1.0, 0.1), accuracy=0.82)])])
    loose = make_plan([m], _fleet(t4=40), _traffic(vision=TWO["vision"]))
    assert {p.precision for p in loose.pools} == {"int8"}  # cheaper when no floor holds it back
    strict = make_plan([m], _fleet(t4=40), _traffic(vision={**TWO["vision"], "accuracy_floor": 0.85}))
    assert {p.precision for p in strict.pools} == {"float16"}
    assert any("int8 on t4: measured accuracy 0.82 is below the floor 0.85" in e for e in strict.excluded)


def test_an_unmeasured_build_is_never_estimated(tmp_path: Path) -> None:
    m = fx.write(tmp_path / "m.json", [
        fx.entry("vision", "t4", [fx.candidate("vision", "t4", "tensorrt", "float16", fx.curve(2.0, 0.3))]),
        fx.entry("vision", "h100", [fx.candidate("vision", "h100", "tvm", "float16", None)])])
    plan = make_plan([m], _fleet(t4=40, h100=8), _traffic(vision=TWO["vision"]))
    assert {p.sku for p in plan.pools} == {"t4"}
    assert any("on h100: not measured on the SKU (cross); never estimated" in e for e in plan.excluded)
    with pytest.raises(BadInput, match="model vision has no usable pool: .*h100: not measured"):
        make_plan([m], _fleet(h100=8), _traffic(vision=TWO["vision"]))


def test_capacity_never_extrapolates_beyond_the_largest_measured_batch() -> None:
    c = Curve.from_measurement(fx.measurement(fx.curve(1.0, 0.01, sizes=(1, 4))))
    with pytest.raises(ValueError, match="beyond the largest measured batch 4"):
        c.at(5)
    assert queueing.replica_capacity(c, 1.0, 1.0).batch <= 4
    assert np.allclose(c.at(2), (1.02e-3, 1.25 * 1.02e-3))  # linear between measured sizes


def test_allen_cunneen_is_kingman_for_one_server_and_uses_erlang_c() -> None:
    assert queueing.erlang_c(2, 1.0) == pytest.approx(1 / 3)
    wait, pw = queueing.allen_cunneen_wait(lam=0.8, mean_s=1.0, c=1, ca2=4.0, cs2=0.5)
    assert pw == pytest.approx(0.8) and wait == pytest.approx(0.8 / 0.2 * (4.0 + 0.5) / 2)  # Kingman
    assert queueing.allen_cunneen_wait(2.0, 1.0, 2, 1.0, 1.0)[0] == float("inf")


def test_planned_pool_meets_the_sla_in_simulation_and_the_queueing_blind_one_misses(tmp_path: Path) -> None:
    m = fx.write(tmp_path / "m.json", [fx.entry("vision", "t4", [
        fx.candidate("vision", "t4", "tensorrt", "float16", fx.curve(2.0, 0.3))])])
    bursty = {**TWO["vision"], "peak_rps": 5000, "p99_sla_ms": 15, "arrival_cv": 2.0}
    fleet = _fleet(overhead_ms=0.0, t4=40)  # queueing in the batcher is the point here, not the HTTP stage
    plan = make_plan([m], fleet, _traffic(vision=bursty))
    pool, model = plan.pools[0], plan.models[0]
    assert model.meets_sla and pool.simulated_p99_ms <= 15 and pool.server_overhead_source == "fleet"
    blind = make_plan([m], fleet, _traffic(vision=bursty),
                      Options(capacity_model="blind", derate=False, bindings=False))
    assert blind.pools[0].replicas < pool.replicas and not blind.meets_sla  # Mélange's plan is cheaper and late
    import jsonschema

    jsonschema.validate(json.loads(blind.model_dump_json()), json.loads((SCHEMA_DIR / "plan.schema.json").read_text()))
    curve = Curve.from_measurement(fx.measurement(fx.curve(2.0, 0.3)))
    at_blind = Served(pool.replicas, 1.0, blind.pools[0].max_batch, blind.pools[0].queue_delay_us / 1e6, curve)
    _, whole = simulate_model("vision", ModelTraffic(**bursty),
                              pool.replicas * blind.pools[0].replica_capacity_rps, [at_blind], 20_000)
    assert whole.p99_s * 1e3 > 15  # the same replicas driven at the queueing-blind capacity miss the SLA


def test_a_pool_that_misses_in_simulation_is_derated_and_re_solved(two_models: Path, monkeypatch) -> None:
    from mlopt.plan import pools

    real = pools.replica_capacity

    def optimistic(*args: object) -> queueing.Capacity:
        c = real(*args)
        return queueing.Capacity(c.rate * 5, c.batch, c.queue_delay_s, c.p99_s)

    monkeypatch.setattr(pools, "replica_capacity", optimistic)
    plan = make_plan([two_models], _fleet(l4=40), _traffic(llm={**TWO["llm"], "p99_sla_ms": 30, "arrival_cv": 1.5}))
    assert plan.derate_rounds >= 1 and plan.meets_sla and plan.pools[0].derate < 1


def test_the_plan_is_deterministic(two_models: Path) -> None:
    a, b = (make_plan([two_models], _fleet(t4=40, l4=40), _traffic(**TWO)).model_dump() for _ in range(2))
    a.pop("solve_seconds"), b.pop("solve_seconds")
    assert a == b


def test_a_trace_is_replayed(two_models: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "arrivals.txt").write_text("\n".join(f"{t:.6f}" for t in np.cumsum(rng.exponential(1, 5000))))
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump({"models": {"llm": {**TWO["llm"], "trace": "arrivals.txt"}}}))
    plan = make_plan([two_models], _fleet(l4=40), load_traffic(tmp_path / "traffic.yaml"))
    assert plan.meets_sla and 0.9 < plan.models[0].arrival_cv < 1.1


def test_what_if(two_models: Path) -> None:
    fleet, traffic = _fleet(t4=40, l4=40), _traffic(**TWO)
    more = make_plan([two_models], fleet, traffic, what_if="rate=1.5")
    assert more.baseline_usd_per_hour < more.usd_per_hour and more.models[0].peak_rps == 3000
    without = make_plan([two_models], fleet, traffic, what_if="remove=t4")
    assert without.skus == ["l4"]
    with pytest.raises(BadInput, match="unknown --what-if"):
        make_plan([two_models], fleet, traffic, what_if="price=2")


def test_kubernetes_files_validate(two_models: Path, tmp_path: Path) -> None:
    from mlopt.package.kube import validate_k8s

    plan = make_plan([two_models], _fleet(t4=40, l4=40),
                     _traffic(**{**TWO, "llm": {**TWO["llm"], "priority": "critical"}}))
    files = write_k8s(plan, tmp_path / "k8s")
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text())]
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["Deployment", "HTTPRoute", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PriorityClass",
                     "Service"]
    for d in docs:
        (validate_http_route if d["kind"] == "HTTPRoute" else validate_k8s)(d)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for pool in plan.pools:
        dep = next(d for d in deployments.values() if d["metadata"]["labels"]["mlopt.dev/sku"] == pool.sku
                   and d["metadata"]["labels"]["app.kubernetes.io/part-of"] == pool.model)
        assert dep["spec"]["replicas"] == pool.replicas
        pod = dep["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == pool.image and "@sha256:" in pool.image
        assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == pool.market
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["priorityClassName"] == f"mlopt-{next(m.priority for m in plan.models if m.model == pool.model)}"
        assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    for route in (d for d in docs if d["kind"] == "HTTPRoute"):
        refs = route["spec"]["rules"][0]["backendRefs"]
        assert {r["name"] for r in refs} <= services and sum(r["weight"] for r in refs) == pytest.approx(1000, abs=2)
    assert {d["metadata"]["name"]: d["value"] for d in docs if d["kind"] == "PriorityClass"} == \
        {"mlopt-critical": 1_000_000, "mlopt-normal": 10_000}


def test_httproute_structure_check_refuses_what_the_crd_refuses() -> None:
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "m"},
             "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [{"name": "s", "port": 80,
                                                                                   "weight": 2_000_000}]}]}}
    with pytest.raises(BadInput, match="backendRefs/0/weight"):
        validate_http_route(route)
    assert HTTPROUTE_SCHEMA["properties"]["spec"]["properties"]["rules"]["maxItems"] == 16


def test_a_pool_without_an_image_is_an_error_unless_placeholders(tmp_path: Path) -> None:
    m = fx.write(tmp_path / "m.json", [fx.entry("vision", "t4", [
        fx.candidate("vision", "t4", "tensorrt", "float16", fx.curve(2.0, 0.3))], image=False)])
    plan = make_plan([m], _fleet(t4=40), _traffic(vision=TWO["vision"]))
    with pytest.raises(BadInput, match="has no pushed image"):
        write_k8s(plan, tmp_path / "k8s")
    files = write_k8s(plan, tmp_path / "k8s", placeholder=True)
    dep = yaml.safe_load(next(f for f in files if f.name == "deployment.yaml").read_text())
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].startswith("placeholder.invalid/")


def test_plan_command_prints_a_table_and_json(two_models: Path, tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"skus": {"t4": {"zones": {"a": 20}},
                                                                  "l4": {"zones": {"a": 20}}}}))
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump({"models": TWO}))
    buf = io.StringIO()
    plan_command([two_models], tmp_path / "fleet.yaml", tmp_path / "traffic.yaml", out=tmp_path / "k8s",
                 console=Console(file=buf, width=200))
    assert "vision" in buf.getvalue() and "wrote" in buf.getvalue() and (tmp_path / "k8s" / "httproutes").is_dir()
    buf = io.StringIO()
    plan_command([two_models], tmp_path / "fleet.yaml", tmp_path / "traffic.yaml", as_json=True,
                 console=Console(file=buf, width=200))
    import jsonschema

    jsonschema.validate(json.loads(buf.getvalue()), json.loads((SCHEMA_DIR / "plan.schema.json").read_text()))


def test_the_cli_plans_writes_files_and_exits_2_when_infeasible(two_models: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlopt.cli import app

    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"skus": {"t4": {"zones": {"a": 20}},
                                                                  "l4": {"zones": {"a": 20}}}}))
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump({"models": TWO}))
    args = ["plan", "--manifest", str(two_models), "--fleet", str(tmp_path / "fleet.yaml"),
            "--traffic", str(tmp_path / "traffic.yaml")]
    ok = CliRunner().invoke(app, args + ["--out", str(tmp_path / "k8s"), "--what-if", "rate=1.5"])
    assert ok.exit_code == 0, ok.output
    assert "what-if rate=1.5" in ok.output and (tmp_path / "k8s" / "priorityclasses.yaml").is_file()
    as_json = CliRunner().invoke(app, args + ["--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["meets_sla"] is True
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"skus": {"l4": {"zones": {"a": 1}}}}))
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 2 and "inventory is binding: SKU l4" in bad.output


def test_every_plan_field_is_described() -> None:
    schema = schemas()["plan.schema.json"]
    for name, d in [("Plan", schema), *schema["$defs"].items()]:
        assert all("description" in v for v in d["properties"].values()), name


def test_the_plan_batches_as_the_image_and_predicts_what_its_batching_simulates(two_models: Path) -> None:
    """One batching rule: the serve.json the pool's image gets for the model's SLA has the plan's max
    batch and queue delay; the simulator run with that serve.json gives the plan's simulated p99,
    and the plan's predicted p99 (the queueing model) is within 25% of it."""
    from mlopt.package.serving import ServingOptions, serve_spec
    from mlopt.plan.k8s import deployable

    traffic = _traffic(llm=TWO["llm"])
    plan = make_plan([two_models], _fleet(l4=40), traffic)
    pool, model = plan.pools[0], plan.models[0]
    assert pool.server_overhead_source == "default" and pool.server_overhead_ms == DEFAULT_SERVER_OVERHEAD_MS
    spec = serve_spec(deployable(pool, plan.catalog), ServingOptions(latency_sla_ms=model.p99_sla_ms))
    assert spec["batching"]["max_batch_size"] == pool.max_batch > 1
    assert spec["batching"]["queue_delay_us"] == pool.queue_delay_us > 0
    curve = Curve.from_measurement(fx.measurement(fx.curve(6.0, 1.0)))
    served = Served(pool.replicas, 1.0, spec["batching"]["max_batch_size"], spec["batching"]["queue_delay_us"] / 1e6,
                    curve, pool.server_overhead_ms / 1e3)
    _, whole = simulate_model("llm", traffic.models["llm"], model.peak_rps, [served], Options().requests)
    assert whole.p99_s * 1e3 == pytest.approx(pool.simulated_p99_ms) == pytest.approx(model.simulated_p99_ms)
    assert abs(pool.predicted_p99_ms - pool.simulated_p99_ms) <= 0.25 * pool.simulated_p99_ms
    assert pool.predicted_p99_ms <= model.p99_sla_ms


def test_the_simulator_counts_the_server_overhead_one_request_at_a_time() -> None:
    from mlopt.plan.simulate import after_overhead, replica_latencies

    assert np.allclose(after_overhead(np.array([0.0, 0.0, 5.0]), 1.0), [1.0, 2.0, 6.0])  # queued, then idle
    curve = Curve.from_measurement(fx.measurement(fx.curve(1.0, 0.0, sizes=(1,), tail=1.0)))
    lat = replica_latencies(np.array([0.0, 0.1]), 1, 0.0, curve, np.random.default_rng(0), overhead=0.002)
    assert np.allclose(lat, [0.003, 0.003])  # 2 ms of server overhead + 1 ms of model, apart
    c = Curve.from_measurement(fx.measurement(fx.curve(0.1, 0.01)))
    assert queueing.replica_capacity(c, 1.0, 1.0, 0.002).rate < 500  # one event loop: below 1 / overhead
