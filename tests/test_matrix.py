"""`mlopt build-matrix`: the local process pool, Ray on a real local cluster, and Kubernetes Jobs.

Two recipes (the digits CNN with a fast plan, a tiny ONNX model) for three SKUs (x86 measured here,
aarch64 cross-compiled, H100 cross-compiled with nvcc); the tiny model's aarch64 task fails on
purpose (its recipe allows only a backend that SKU lacks). A third recipe's evaluation data kills
the worker process that first loads it, to check retries.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ARM, EXAMPLES, FAST_BENCH, HOST, digits_recipe, tiny_onnx, write_recipe
from mlopt.cli import app
from mlopt.manifest import SCHEMA_FILE
from mlopt.matrix import MatrixConfig, run_matrix
from mlopt.store import Store
from mlopt.targets.gpu_toolchain import cuda_missing

SKUS = [HOST, ARM, "h100"]
FAILING = "tiny/cpu-aarch64-neoverse-v1"
H100_BUILDS = cuda_missing() is None  # without nvcc the H100 tasks fail (exit 4) under both executors
CRASH_ONCE = '''
import os, signal
from pathlib import Path

import numpy as np


def evaluation():
    marker = Path(__file__).with_name("crashed-once")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((4, 4)).astype(np.float32)} for _ in range(2)]
'''


def _digits(tmp: Path) -> Path:
    folder = tmp / "digits"
    folder.mkdir()
    path = digits_recipe(folder, name="digits", backends={"cpu": ["onnxruntime", "tvm"], "gpu": ["tvm"]})
    data = yaml.safe_load(path.read_text())
    data["model"]["source"] = str(EXAMPLES / "digits" / "model.py:untrained")  # skip the 3 s of training
    return write_recipe(path, data)


def _tiny(tmp: Path) -> Path:
    return write_recipe(tmp / "tiny.yaml", {
        "name": "tiny",
        "model": {"source": str(tiny_onnx(tmp / "tiny.onnx")), "inputs": [{"name": "x", "shape": ["batch", 4]}]},
        "backends": {"cpu-aarch64-neoverse-v1": ["openvino"], "cpu": ["onnxruntime"], "gpu": ["tvm"]},
        "benchmark": FAST_BENCH})


def _crashing(folder: Path) -> Path:
    """A tiny ONNX recipe whose evaluation data kills the process that first loads it."""
    folder.mkdir()
    (folder / "crash_data.py").write_text(CRASH_ONCE)
    return write_recipe(folder / "crash.yaml", {
        "name": "crash", "model": {"source": str(tiny_onnx(folder / "tiny.onnx")),
                                   "inputs": [{"name": "x", "shape": ["batch", 4]}]},
        "data": {"evaluation": {"source": "crash_data.py:evaluation", "metric": "cosine"}},
        "backends": ["onnxruntime"], "benchmark": FAST_BENCH})


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("recipes")
    return [str(_digits(tmp)), str(_tiny(tmp))]


@pytest.fixture(scope="module")
def local_run(recipes: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("local")
    config = MatrixConfig(recipes=recipes, targets=SKUS, workers=2, store=str(tmp / "store"), out=str(tmp / "out"))
    return {"result": run_matrix(config), "config": config, "tmp": tmp}


def cells(result) -> dict[str, dict]:
    return {f"{c.recipe}/{c.sku}": c.model_dump() for c in result.manifest.matrix.cells}


def expected_ok(task_id: str) -> bool:
    return task_id != FAILING and (H100_BUILDS or not task_id.endswith("/h100"))


# ------------------------------------------------------------------ local executor


def test_every_task_runs_and_a_failure_does_not_stop_the_others(local_run: dict) -> None:
    res = local_run["result"]
    got = cells(res)
    assert len(got) == 6
    for task_id, c in got.items():
        assert (c["status"] == "built") == expected_ok(task_id), (task_id, c)
    assert got[FAILING]["exit_code"] == 4 and "none of the recipe's backends" in got[FAILING]["error"]
    assert res.exit_code == 4 and res.manifest.status == "failed"
    assert any(e.startswith(FAILING) for e in res.manifest.errors)
    data = json.loads(res.manifest_path.read_text())
    import jsonschema

    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
    assert got[f"digits/{HOST}"]["p50_ms"].keys() == {"1", "4"}  # measured here
    assert got[f"digits/{ARM}"]["p50_ms"] == {}  # cross-compiled: no figures
    assert (Path(local_run["config"].out) / "tasks" / "tiny--cpu-aarch64-neoverse-v1" / "log.txt").is_file()


def test_tasks_of_one_recipe_share_the_store(local_run: dict) -> None:
    """The digits tasks ran at the same time on one store: one ingest, one model version, intact artifacts."""
    store = Store(local_run["tmp"] / "store")
    digits = [e for e in local_run["result"].manifest.entries if e.model == "digits"]
    assert len({e.version for e in digits}) == 1
    assert len(store.models()["digits"]["versions"]) == 1
    assert len(list((store.root / "cache" / "ingest").iterdir())) == 1
    logs = [r.log for r in local_run["result"].results if r.task_id.startswith("digits/")]
    exported = [any(line.startswith("[ingest] exported") for line in log) for log in logs]
    assert sorted(exported) == [False, False, True]  # one task exported, the others waited and reused it
    assert all(not store.verify(a) for a in store.artifacts())


def test_rerun_is_served_before_dispatch(local_run: dict) -> None:
    cfg = local_run["config"]
    args = ["build-matrix", *cfg.recipes, "--targets", ",".join(SKUS), "--store", cfg.store, "--out", cfg.out, "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 4, res.output
    m = json.loads(res.stdout)
    for c in m["matrix"]["cells"]:
        task_id = f"{c['recipe']}/{c['sku']}"
        assert c["status"] == ("cached" if expected_ok(task_id) else "failed"), c
    assert m["matrix"]["wall_seconds"] < 15  # only the failed task starts a worker
    before = {c.artifact_key for c in local_run["result"].manifest.matrix.cells}
    assert {c["artifact_key"] for c in m["matrix"]["cells"]} == before


def test_ledger_ignores_a_record_whose_artifacts_are_gone(local_run: dict, tmp_path: Path) -> None:
    from mlopt.matrix import ledger, plan

    store = Store(shutil.copytree(local_run["tmp"] / "store", tmp_path / "store"))
    task = next(t for t in plan(local_run["config"]) if t.id == f"digits/{HOST}")
    key = ledger.task_key(task, "local")
    assert ledger.lookup(store, task, key) is not None
    hit = ledger.lookup(store, task, key)
    shutil.rmtree(store.root / "objects" / hit.manifest["entries"][0]["artifact"]["key"])
    assert ledger.lookup(store, task, key) is None


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("crash-local")
    config = MatrixConfig(recipes=[str(_crashing(tmp / "r"))], targets=SKUS[:2], workers=2,
                          store=str(tmp / "store"), out=str(tmp / "out"))
    return {"result": run_matrix(config), "tmp": tmp}


def test_a_killed_worker_is_retried(crash_run: dict) -> None:
    res = crash_run["result"]
    assert (crash_run["tmp"] / "r" / "crashed-once").is_file()
    assert res.exit_code == 0, res.manifest.errors
    attempts = sorted(c.attempts for c in res.manifest.matrix.cells)
    # the task whose worker was killed ran twice; the other ran twice too when it shared the broken pool
    assert attempts[-1] == 2 and attempts[0] in (1, 2)


def test_concurrent_tasks_of_one_recipe_get_one_version(tmp_path: Path) -> None:
    import threading

    recipe = _crashing(tmp_path / "r")
    (tmp_path / "r" / "crashed-once").write_text("no crash in this test")
    store = Store(tmp_path / "store")
    held, release = threading.Event(), threading.Event()

    def hold_store_lock() -> None:  # both tasks block at their first store write: they overlap for sure
        with store.lock():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_store_lock)
    holder.start()
    held.wait(10)
    threading.Timer(6.0, release.set).start()
    result = run_matrix(MatrixConfig(recipes=[str(recipe)], targets=SKUS[:2], workers=2, store=str(store.root),
                                     out=str(tmp_path / "out")))
    holder.join()
    a, b = result.results
    assert result.exit_code == 0, result.manifest.errors
    assert a.started < b.finished and b.started < a.finished, "the two tasks did not overlap"
    assert [v["version"] for v in store.models()["crash"]["versions"]] == [1]
    assert len(list((store.root / "cache" / "reference").iterdir())) == 1
    assert {e.version for e in result.manifest.entries} == {1}
    assert all(not store.verify(a) for a in store.artifacts())


# ------------------------------------------------------------------ Ray executor


@pytest.fixture(scope="module")
def ray_cluster():
    """Two nodes: a head with 2 CPUs, and a 1-CPU node holding the resource that stands for an H100."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=1, resources={"accelerator_type:H100": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield {"gpu_node": gpu_node.node_id}
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def ray_run(ray_cluster: dict, recipes: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same matrix on Ray, shipping artifacts back from a separate node store into a fresh one."""
    tmp = tmp_path_factory.mktemp("ray")
    config = MatrixConfig(recipes=recipes, targets=SKUS, executor="ray", ship=True, node_store=str(tmp / "node-store"),
                          store=str(tmp / "store"), out=str(tmp / "out"))
    return {"result": run_matrix(config), "tmp": tmp}


def test_ray_result_equals_the_local_one(ray_run: dict, local_run: dict) -> None:
    ray_cells, local_cells = cells(ray_run["result"]), cells(local_run["result"])
    for task_id, c in local_cells.items():
        r = ray_cells[task_id]
        assert (r["status"], r["exit_code"], r["chosen_backend"], r["artifact_key"]) == \
               (c["status"], c["exit_code"], c["chosen_backend"], c["artifact_key"]), task_id
    assert ray_run["result"].exit_code == local_run["result"].exit_code == 4


def test_device_tasks_ran_on_the_node_with_their_accelerator(ray_run: dict, ray_cluster: dict) -> None:
    for c in ray_run["result"].manifest.matrix.cells:
        on_gpu = c.where["node_id"] == ray_cluster["gpu_node"]
        has_resource = "accelerator_type:H100" in c.where["resources"]
        if c.sku == "h100":
            assert on_gpu and has_resource, c.where
        else:
            assert not has_resource and c.where["requested"] == {}, c.where


def test_device_tasks_measure_with_mlopt_measure_on_their_node(ray_run: dict, ray_cluster: dict) -> None:
    """A task placed on its device runs `mlopt measure`'s function there after compiling; the node
    here only carries the H100's resource, not the GPU, so measure refuses (exit 4) and says why,
    and the compile's manifest is kept."""
    if not H100_BUILDS:
        pytest.skip("no nvcc here: the H100 tasks build nothing to measure")
    for c in ray_run["result"].manifest.matrix.cells:
        if c.sku == "h100" and c.status != "failed":
            m = c.where["measure"]
            assert m["by"] == "mlopt measure" and m["exit_code"] == 4 and "no matching GPU" in m["error"], m
        else:
            assert "measure" not in c.where, c.where


def test_measure_here_fills_the_builds_the_compile_left_without_figures(local_run: dict) -> None:
    """What a device-placed Ray task runs after its compile, here on the host SKU: the candidates the
    compile left unmeasured are validated and timed by `mlopt measure`'s function and merged."""
    import copy

    from mlopt.matrix.tasks import measure_here, plan

    task = next(t for t in plan(local_run["config"]) if t.id == f"digits/{HOST}")
    done = next(r for r in local_run["result"].results if r.task_id == task.id)
    result = copy.deepcopy(done)
    entry = next(e for e in result.manifest["entries"] if e["sku"] == task.sku.name)
    for c in entry["candidates"]:
        c["measurement"] = None
    entry["measurement"] = entry["cost"] = None
    measure_here(task, result, str(local_run["tmp"] / "store"))
    assert result.where["measure"]["exit_code"] == 0 and result.where["measure"]["measured"], result.where
    entry = next(e for e in result.manifest["entries"] if e["sku"] == task.sku.name)
    chosen = next(c for c in entry["candidates"] if c["backend"] == entry["chosen_backend"])
    # figures back for every build (here the store's timing of the same build on this SKU is reused, as
    # `mlopt measure` does; on a device node nothing timed it before)
    assert all({b["batch_size"] for b in c["measurement"]["batches"]} == {1, 4}
               for c in entry["candidates"] if c["status"] == "built")
    compiled = next(e for e in done.manifest["entries"] if e["sku"] == task.sku.name)
    assert entry["measurement"] == chosen["measurement"] and entry["cost"] == compiled["cost"]
    before = copy.deepcopy(result)
    measure_here(task, result, str(local_run["tmp"] / "store"))  # nothing pending: nothing changes
    assert result.manifest == before.manifest


def test_shipped_artifacts_are_filed_in_the_driver_store(ray_run: dict) -> None:
    store, node = Store(ray_run["tmp"] / "store"), Store(ray_run["tmp"] / "node-store")
    keys = {a.key for e in ray_run["result"].manifest.entries for a in [e.artifact] if a}
    assert keys and keys <= {a.key for a in store.artifacts()}
    for e in ray_run["result"].manifest.entries:
        if e.artifact:
            art = store.get(e.artifact.key)
            assert not store.verify(art) and e.artifact.path == str(art.path)
            assert art.meta["content_digest"] == node.get(e.artifact.key).meta["content_digest"]
    linked = {k for v in store.models()["digits"]["versions"] for k in v["artifacts"]}
    assert {e.artifact.key for e in ray_run["result"].manifest.entries if e.model == "digits" and e.artifact} <= linked


def test_ray_retries_a_killed_worker(ray_cluster: dict, tmp_path: Path) -> None:
    config = MatrixConfig(recipes=[str(_crashing(tmp_path / "r"))], targets=[HOST], executor="ray",
                          store=str(tmp_path / "store"), out=str(tmp_path / "out"))
    res = run_matrix(config)
    assert (tmp_path / "r" / "crashed-once").is_file()
    assert res.exit_code == 0, res.manifest.errors
    assert res.manifest.matrix.cells[0].attempts == 2


# ------------------------------------------------------------------ Kubernetes Jobs


def test_k8s_jobs_per_task_validate(recipes: list[str], tmp_path: Path) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    config = MatrixConfig(recipes=recipes, targets=SKUS, executor="k8s", image="registry.example/mlopt:0.1.0",
                          namespace="builds", out=str(tmp_path / "out"))
    res = run_matrix(config)
    jobs = {p.name: yaml.safe_load(p.read_text()) for p in res.jobs}
    assert len(jobs) == 6
    for job in jobs.values():
        kubernetes_validate.validate(job, latest_version(), strict=True)
        assert job["metadata"]["namespace"] == "builds"
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == "registry.example/mlopt:0.1.0"
        sku = job["metadata"]["labels"]["mlopt.dev/sku"]
        assert container["args"][container["args"].index("--target") + 1] == sku
        if sku == "h100":
            assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
            assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        else:
            assert "limits" not in container["resources"] and "kubernetes.io/arch" in pod["nodeSelector"]


def test_k8s_needs_an_image(recipes: list[str], tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["build-matrix", *recipes, "--executor", "k8s", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--image" in res.output


# ------------------------------------------------------------------ placement and flags


@pytest.mark.parametrize(("placement", "cluster", "expected"), [
    ("auto", {"CPU": 4}, {}),
    ("auto", {"CPU": 4, "accelerator_type:H100": 1}, {"resources": {"accelerator_type:H100": 0.001}}),
    ("auto", {"CPU": 4, "GPU": 8, "accelerator_type:H100": 8},
     {"resources": {"accelerator_type:H100": 0.001}, "num_gpus": 1}),
    ("anywhere", {"CPU": 4, "accelerator_type:H100": 1}, {}),
    ("device", {"CPU": 4, "accelerator_type:H100": 1}, {"resources": {"accelerator_type:H100": 0.001}}),
])
def test_gpu_tasks_ask_for_their_accelerator(recipes: list[str], placement: str, cluster: dict, expected: dict) -> None:
    from mlopt.matrix import plan
    from mlopt.matrix.ray_executor import placement as ray_placement

    config = MatrixConfig(recipes=recipes[1:], targets=["h100", HOST], placement=placement)
    gpu, cpu = plan(config)
    assert ray_placement(gpu, config, cluster) == expected
    assert ray_placement(cpu, config, cluster) == {}


def test_device_placement_without_the_device_fails_before_running(recipes: list[str]) -> None:
    from mlopt.core.errors import BadInput
    from mlopt.matrix import plan
    from mlopt.matrix.ray_executor import placement as ray_placement

    config = MatrixConfig(recipes=recipes[1:], targets=["mi300x"], placement="device")
    with pytest.raises(BadInput, match="accelerator_type:AMD-Instinct-MI300X-OAM"):
        ray_placement(plan(config)[0], config, {"CPU": 4})


def test_bad_flags_are_bad_input(recipes: list[str], tmp_path: Path) -> None:
    run = CliRunner().invoke
    res = run(app, ["build-matrix", *recipes, "--executor", "slurm", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "executor" in res.output
    res = run(app, ["build-matrix", *recipes, "--targets", "h1OO", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown SKU 'h1OO'" in res.output


def test_timing_waits_while_a_matrix_task_builds_here() -> None:
    """A timed loop takes the host lock alone: it waits for a task (another process) holding its share."""
    import subprocess
    import sys
    import time

    from mlopt.core import hostlock

    script = "import time\nfrom mlopt.core import hostlock\nwith hostlock.building():\n    print('held', flush=True)\n" \
             "    time.sleep(1.0)\n"
    task = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert task.stdout.readline().strip() == "held"
    t0 = time.perf_counter()
    with hostlock.timing():
        waited = time.perf_counter() - t0
    assert task.wait() == 0 and waited > 0.5


def test_one_unusable_recipe_is_listed_and_the_others_are_built(tmp_path: Path) -> None:
    good = _tiny(tmp_path)
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\nmodel: {source: [unclosed\n")
    typo = write_recipe(tmp_path / "typo.yaml", {"name": "typo", "model": {"source": "m.onnx"}, "pases": []})
    res = CliRunner().invoke(app, ["build-matrix", str(good), str(bad), str(typo), "--targets", "host",
                                   "--workers", "1", "--store", str(tmp_path / "store"), "--out",
                                   str(tmp_path / "out")])
    assert res.exit_code == 2, res.output  # the bad recipes are bad input; the good one was still built
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(c["recipe"], c["status"]) for c in manifest["matrix"]["cells"]] == [("tiny", "built")]
    assert manifest["status"] == "failed"
    errors = manifest["errors"]
    assert len(errors) == 2 and str(bad) in errors[0] and str(typo) in errors[1] and "pases" in errors[1]
    assert "Traceback" not in res.output
    # with every recipe bad there is nothing to build: exit 2 with the first one's error
    res = CliRunner().invoke(app, ["build-matrix", str(bad), "--targets", "host", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "broken.yaml" in res.output
