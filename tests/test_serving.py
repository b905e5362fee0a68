"""Serving configs from a real digits manifest: the batching plan, Triton configs parsed by Triton's
own ModelConfig protobuf, Kubernetes and KServe manifests validated offline, and the in-image entry
point serving the real artifacts over HTTP."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ARM, HOST, triton_python_model
from mlopt.cli import app
from mlopt.core.errors import BadInput
from mlopt.manifest import BatchFigures, Measurement, read_manifest
from mlopt.package import entry, kube, triton
from mlopt.package.serving import (
    Deployable,
    ServingOptions,
    deployables,
    memory_request,
    plan_batching,
    serve_spec,
)
from mlopt.store import Store
from mlopt.targets.catalog import load_catalog

runner = CliRunner()
IMAGE = "127.0.0.1:5000/mlopt/digits@sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def cpu(digits_build: dict) -> Deployable:
    assert digits_build["result"].exit_code == 0, digits_build["result"].output
    items, _ = deployables(read_manifest(digits_build["out"] / "manifest.json"), Store(digits_build["store"]),
                           load_catalog())
    return next(d for d in items if d.sku.name == HOST)


@pytest.fixture(scope="module")
def gpu_manifest(digits_build: dict) -> Path:
    """The digits model for an H100: a TensorRT build plan (built on the device) plus ONNX Runtime;
    ingest and passes come from a copy of the shared store (its cache), so this takes about a second
    and the shared store keeps only the session build's artifacts."""
    out = digits_build["tmp"] / "out-gpu"
    shutil.copytree(digits_build["store"], out / "store")
    res = runner.invoke(app, ["compile", str(digits_build["recipe"]), "--target", "h100",
                              "--backend", "tensorrt,onnxruntime", "--out", str(out), "--store", str(out / "store")])
    assert res.exit_code == 0, res.output
    return out / "manifest.json"


@pytest.fixture(scope="module")
def gpu(gpu_manifest: Path, digits_build: dict) -> Deployable:
    items, _ = deployables(read_manifest(gpu_manifest), Store(gpu_manifest.parent / "store"), load_catalog())
    return items[0]


def with_backend(d: Deployable, backend: str) -> Deployable:
    """The deployable as if ``backend``'s candidate had been chosen."""
    cand = next(c for c in d.entry.candidates if c.backend == backend)
    entry_ = d.entry.model_copy(update={"chosen_backend": backend, "artifact": cand.artifact,
                                        "measurement": cand.measurement, "precision": cand.precision})
    store = Store(Path(cand.artifact.path).parents[1])
    others = tuple(store.get(c.artifact.key) for c in d.entry.candidates if c.artifact and c.backend != backend)
    return dataclasses.replace(d, entry=entry_, artifact=store.checked(cand.artifact.key), compiled=cand.compiled,
                               siblings=others)


def figures(*rows: tuple[int, float, float, float]) -> Measurement:
    """A measurement from (batch, p50 ms, p99 ms, throughput/s) rows."""
    batches = [BatchFigures(batch_size=b, runs=20, p50_ms=p50, p90_ms=p99, p99_ms=p99, mean_ms=p50, min_ms=p50,
                            throughput_per_s=thr, spread=0.01, noisy=False) for b, p50, p99, thr in rows]
    return Measurement.model_construct(batches=batches, peak_memory_bytes=None)


# ------------------------------------------------------------------ batching plan


def test_plan_follows_the_measured_curve_and_the_sla() -> None:
    curve = figures((1, 2.0, 2.5, 500.0), (4, 3.0, 4.0, 1330.0), (8, 5.0, 7.0, 1600.0), (16, 12.0, 20.0, 1700.0))
    plan = plan_batching(curve, 10.0, batchable=True, overhead_ms=0.0)
    assert plan.max_batch_size == 4  # batch 8 leaves no room to wait for one more: 2 x p99 7 ms > 10 ms
    assert plan.preferred == (4,)  # at least 10% more throughput than every smaller size
    assert plan.queue_delay_us == 2250  # p50(4) x 3/4: the time a full-rate stream takes to fill it
    served = plan_batching(curve, 10.0, batchable=True)  # the server's default overhead is part of the budget
    assert (served.max_batch_size, served.queue_delay_us) == (4, 2250)  # 2 x 4 + 1.3 ms <= 10 ms
    assert plan_batching(curve, 8.0, batchable=True).max_batch_size == 1  # 2 x 4 + 1.3 ms is past 8 ms
    no_sla = plan_batching(curve, None, batchable=True)
    assert (no_sla.max_batch_size, no_sla.queue_delay_us) == (16, 0) and 16 not in no_sla.preferred
    tight = plan_batching(curve, 1.0, batchable=True)
    assert tight.max_batch_size == 1 and tight.preferred == () and "cannot be met" in tight.notes[0]
    assert plan_batching(None, 10.0, batchable=True, unmeasured_max=8).max_batch_size == 8
    assert plan_batching(curve, 10.0, batchable=False).max_batch_size == 0


def test_queue_delay_is_the_time_a_batch_takes_to_fill() -> None:
    plan = plan_batching(figures((1, 1.0, 1.5, 1000.0), (8, 4.0, 5.0, 2000.0)), 100.0, batchable=True)
    assert plan.queue_delay_us == 3500  # p50(8) x 7/8: waiting longer than the batch takes to fill gains nothing


# ------------------------------------------------------------------ Triton


def test_triton_config_of_the_real_build_parses_as_model_config(cpu: Deployable) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    d = with_backend(cpu, "onnxruntime")
    text = triton.config_text(d, ServingOptions(latency_sla_ms=50.0))
    c = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert c.name == "digits-cnn" and c.platform == "onnxruntime_onnx"
    measured = [b.batch_size for b in d.entry.measurement.batches]
    assert c.max_batch_size == max(measured) == 4
    assert [(i.name, list(i.dims)) for i in c.input] == [("x", [1, 8, 8])]
    assert [(o.name, list(o.dims), o.data_type) for o in c.output] == [("output", [10], model_config_pb2.TYPE_FP32)]
    assert all(s <= c.max_batch_size for s in c.dynamic_batching.preferred_batch_size)
    top = max(d.entry.measurement.batches, key=lambda b: b.batch_size)
    assert c.dynamic_batching.max_queue_delay_microseconds / 1000 + top.p99_ms <= 50.0
    assert [(g.kind, g.count) for g in c.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert c.parameters["intra_op_thread_count"].string_value == "2"


def test_preferred_batch_above_max_is_an_error(cpu: Deployable) -> None:
    text = triton.config_text(with_backend(cpu, "onnxruntime"), ServingOptions())
    bad = text.replace("dynamic_batching {", "dynamic_batching {\n  preferred_batch_size: 64")
    with pytest.raises(BadInput, match="preferred_batch_size 64 is above max_batch_size 4"):
        triton.validate(bad)
    with pytest.raises(BadInput, match="dynamic_batching needs max_batch_size > 0"):
        triton.validate(text.replace("max_batch_size: 4", "max_batch_size: 0"))
    with pytest.raises(BadInput, match="not a Triton ModelConfig"):
        triton.validate(text + "\nno_such_field: 1\n")


def test_tensorrt_plan_runs_on_the_onnxruntime_platform_with_the_tensorrt_accelerator(gpu: Deployable) -> None:
    from tritonclient.grpc import model_config_pb2

    assert gpu.backend == "tensorrt" and gpu.compiled == "on-device"
    text = triton.config_text(gpu, ServingOptions())
    c = triton.validate(text)
    assert c.platform == "onnxruntime_onnx" and c.default_model_filename == "model.onnx"
    acc = c.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_engine_cache_enable"] == "1"
    assert c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert c.max_batch_size == 8 and "not measured on this SKU" in text  # no H100 here: defaults, said so


def test_openvino_and_tvm_builds_map_to_their_triton_backends(cpu: Deployable, tmp_path: Path) -> None:
    ov = triton.validate(triton.config_text(with_backend(cpu, "openvino"), ServingOptions()))
    assert ov.backend == "openvino" and ov.default_model_filename == "model.xml"
    folder = triton.write_repository(with_backend(cpu, "tvm"), tmp_path, ServingOptions())
    assert triton.validate((folder / "config.pbtxt").read_text()).backend == "python"
    names = {p.name for p in (folder / "1").iterdir()}
    assert {"model.py", "serve.json", "mlopt_entry.py", "model.so", "tvm_entry.json"} <= names


def test_python_backend_model_runs_the_tvm_build(cpu: Deployable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.py written for Triton's Python backend, run with a minimal stand-in for Triton's
    ``triton_python_backend_utils`` (the module Triton injects)."""
    folder = triton.write_repository(with_backend(cpu, "tvm"), tmp_path, ServingOptions())
    model = triton_python_model(folder / "1" / "model.py", monkeypatch)
    model.initialize({"model_repository": str(folder), "model_version": "1"})
    x = _digits(4)
    [out] = model.execute([{"x": x}])
    np.testing.assert_allclose(out["output"], _reference(cpu, x), atol=1e-4)


def test_export_triton_cli_writes_a_repository_per_sku(digits_build: dict, tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", "triton", str(digits_build["out"] / "manifest.json"), "--out", str(tmp_path),
                              "--sla-ms", "5"])
    assert res.exit_code == 0, res.output
    for sku in (HOST, ARM):
        triton.validate((tmp_path / sku / "digits-cnn" / "config.pbtxt").read_text())
        assert list((tmp_path / sku / "digits-cnn" / "1").iterdir())


# ------------------------------------------------------------------ Kubernetes and KServe


def test_export_k8s_needs_a_built_image(digits_build: dict, tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", "k8s", str(digits_build["out"] / "manifest.json"), "--out", str(tmp_path),
                              "--images", str(tmp_path / "no-images")])
    assert res.exit_code == 2 and f"no image built for digits-cnn-v1-{HOST}" in res.output


def test_deployment_and_service_validate_strictly(cpu: Deployable) -> None:
    w = kube.workload(cpu, IMAGE, ServingOptions())
    dep, svc = kube.deployment(w, ServingOptions()), kube.service(w, ServingOptions())
    kube.validate_k8s(dep)
    kube.validate_k8s(svc)
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == IMAGE and c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert pod["nodeSelector"] == dict(cpu.sku.kubernetes.node_selector)  # the host SKU's labels, from the catalog
    mem, _ = memory_request(cpu)
    assert c["resources"]["requests"]["memory"] == f"{-(-mem // (1 << 20))}Mi"
    assert mem >= cpu.entry.artifact.size_bytes
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy2"] = "Always"
    with pytest.raises(BadInput, match="imagePullPolicy2"):
        kube.validate_k8s(bad)


def test_gpu_deployment_asks_for_the_gpu_on_the_sku_nodes(gpu: Deployable) -> None:
    dep = kube.deployment(kube.workload(gpu, IMAGE, ServingOptions()), ServingOptions())
    kube.validate_k8s(dep)
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == dict(gpu.sku.kubernetes.node_selector)
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "engine-cache", "mountPath": "/var/cache/mlopt"} in c["volumeMounts"]  # the JIT plan's engines
    assert dep["metadata"]["annotations"]["mlopt.dev/min-driver"] == gpu.sku.requirements.driver


def test_inference_service_validates(gpu: Deployable) -> None:
    isvc = kube.inference_service(kube.workload(gpu, IMAGE, ServingOptions()), ServingOptions(max_replicas=3))
    kube.validate_kserve(isvc)
    c = isvc["spec"]["predictor"]["containers"][0]
    assert c["name"] == "kserve-container" and c["ports"][0]["name"] == "http1"  # what Knative accepts
    assert c["readinessProbe"]["httpGet"]["port"] == 8000 and c["startupProbe"]["httpGet"]["port"] == 8000
    assert {"name": "engine-cache", "emptyDir": {}} in isvc["spec"]["predictor"]["volumes"]
    assert isvc["spec"]["predictor"]["maxReplicas"] == 3
    bad = json.loads(json.dumps(isvc))
    bad["spec"]["predictor"]["replicas"] = 2
    with pytest.raises(BadInput, match="replicas"):
        kube.validate_kserve(bad)
    bad = json.loads(json.dumps(isvc))
    bad["spec"]["predictor"]["containers"][0]["resources"]["limits"]["memory"] = {"x": 1}
    with pytest.raises(BadInput, match="limits/memory"):
        kube.validate_kserve(bad)


# ------------------------------------------------------------------ the in-image entry point


def _digits(n: int) -> np.ndarray:
    return np.random.default_rng(1).random((n, 1, 8, 8), dtype=np.float32)


def _reference(d: Deployable, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(with_backend(d, "onnxruntime").artifact.path / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _call(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "tvm"])
def test_entry_point_serves_the_build(cpu: Deployable, backend: str) -> None:
    d = with_backend(cpu, backend)
    model = entry.ServedModel(serve_spec(d, ServingOptions()), d.artifact.path)
    server = entry.make_server(model, "127.0.0.1", 0)
    port = server.port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _wait_status(port, "/healthz") == 503  # not loaded yet: the readiness probe waits
        assert _call(port, "/v2/models/digits-cnn/infer", {"inputs": []})[0] == 503  # loading
        model.load()
        assert _call(port, "/v2/health/ready") == (200, {"ready": True})
        x = _digits(3)
        status, out = _call(port, "/v2/models/digits-cnn/infer", {"inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
        assert status == 200, out
        [t] = out["outputs"]
        assert t["name"] == "output" and t["shape"] == [3, 10] and t["datatype"] == "FP32"
        np.testing.assert_allclose(np.array(t["data"], np.float32).reshape(3, 10), _reference(cpu, x), atol=1e-4)
        assert _call(port, "/v2/models/digits-cnn")[1]["inputs"][0]["shape"] == [-1, 1, 8, 8]
        status, out = _call(port, "/v2/models/digits-cnn/infer", {"inputs": [{"name": "y", "shape": [1], "data": [0]}]})
        assert status == 400 and "inputs must be ['x']" in out["error"]
    finally:
        server.stop()
        thread.join(10)


def _wait_status(port: int, path: str) -> int:
    """The status of ``path`` once the server thread answers."""
    for _ in range(100):
        try:
            return _call(port, path)[0]
        except urllib.error.URLError:
            time.sleep(0.05)
    raise AssertionError(f"no answer on port {port}")


def test_entry_check_mode(cpu: Deployable, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = with_backend(cpu, "onnxruntime")
    spec = tmp_path / "serve.json"
    spec.write_text(json.dumps(serve_spec(d, ServingOptions())))
    assert entry.main(["--serving", str(spec), "--model-dir", str(d.artifact.path), "--check"]) == 0
    assert json.loads(capsys.readouterr().out.strip()) == {"output": [1, 10]}
