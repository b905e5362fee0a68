"""Exports that schedule (issue 13, item 6): the Kubernetes and KServe files of the digits builds
checked with ``kubernetes-validate --strict`` and KServe's own InferenceService CRD schema, and their
scheduling and security fields asserted; OpenVINO-only and TVM-only manifests exported as Triton
repositories and images (exit 0), whose copied repositories still hold the model as real files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import HOST, triton_python_model
from oci_helpers import make_base_layout, require_tools, umoci_unpack
from typer.testing import CliRunner

from mlopt.cli import app
from mlopt.core.errors import BadInput
from mlopt.manifest import read_manifest
from mlopt.package import kube, triton
from mlopt.package.image import BuiltImage, write_record
from mlopt.package.serving import (
    RUN_AS,
    Deployable,
    ServingOptions,
    deployables,
    max_batch,
    memory_limit,
    memory_request,
    per_sample_bytes,
)
from mlopt.store import Store
from mlopt.targets.catalog import load_catalog

runner = CliRunner()
IMAGE = "127.0.0.1:5000/mlopt/digits@sha256:" + "ab" * 32
REGISTRY = "127.0.0.1:5000/mlopt/digits"
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def _deployables(manifest: Path, store: Path) -> list[Deployable]:
    items, _ = deployables(read_manifest(manifest), Store(store), load_catalog())
    return items


@pytest.fixture(scope="module")
def cpu(digits_build: dict) -> Deployable:
    assert digits_build["result"].exit_code == 0, digits_build["result"].output
    return next(d for d in _deployables(digits_build["out"] / "manifest.json", digits_build["store"])
                if d.sku.name == HOST)


def _compile_only(digits_build: dict, tmp: Path, args: list[str]) -> Path:
    """The digits model compiled with only the given backends and targets, in a copy of the shared
    store (its ingest and pass steps are cached there: only the builds run)."""
    import shutil

    shutil.copytree(digits_build["store"], tmp / "store")
    res = runner.invoke(app, ["compile", str(digits_build["recipe"]), *args, "--out", str(tmp / "out"),
                              "--store", str(tmp / "store")])
    assert res.exit_code == 0, res.output
    return tmp / "out" / "manifest.json"


@pytest.fixture(scope="module")
def gpu(digits_build: dict, tmp_path_factory: pytest.TempPathFactory) -> Deployable:
    """A TensorRT build plan for an H100 (its engine is built on the device: an engine cache)."""
    tmp = tmp_path_factory.mktemp("gpu")
    manifest = _compile_only(digits_build, tmp, ["--target", "h100", "--backend", "tensorrt,onnxruntime"])
    return _deployables(manifest, tmp / "store")[0]


@pytest.fixture(scope="module", params=["openvino", "tvm"])
def only(request: pytest.FixtureRequest, digits_build: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest whose builds are all of one backend (no ONNX file in any artifact)."""
    tmp = tmp_path_factory.mktemp(f"only-{request.param}")
    manifest = _compile_only(digits_build, tmp, ["--target", "host", "--backend", request.param])
    assert {e.chosen_backend for e in read_manifest(manifest).entries} == {request.param}
    return manifest


def _millicpu(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def _mib(q: str) -> int:
    assert q.endswith("Mi")
    return int(q[:-2]) << 20


def _kubernetes_validate(*files: Path) -> None:
    """The kubernetes-validate command itself, strict (unknown fields are errors)."""
    res = subprocess.run([str(KUBERNETES_VALIDATE), "--strict", *map(str, files)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _assert_restricted(pod: dict, container: dict) -> None:
    """Pod Security "restricted", and nothing a "baseline" policy refuses."""
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == RUN_AS != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["readOnlyRootFilesystem"] is True
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[writable["/tmp"]]  # the read-only root leaves /tmp writable


def _assert_probes(container: dict) -> None:
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"  # passes once the model is loaded
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "lifecycle" not in container  # no preStop hook: the server drains on SIGTERM


# ------------------------------------------------------------------ Deployment and Service


def test_cpu_deployment_schedules_on_a_generic_node_and_is_restricted(cpu: Deployable, tmp_path: Path) -> None:
    w = kube.workload(cpu, IMAGE, ServingOptions(), kube.KubeOptions(pull_secrets=("regcred", "mirror.creds")))
    dep, svc = kube.deployment(w, ServingOptions()), kube.service(w, ServingOptions())
    for name, doc in (("deployment.yaml", dep), ("service.yaml", svc)):
        (tmp_path / name).write_text(yaml.safe_dump(json.loads(json.dumps(doc))))
    _kubernetes_validate(tmp_path / "deployment.yaml", tmp_path / "service.yaml")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    _assert_restricted(pod, c)
    _assert_probes(c)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["terminationGracePeriodSeconds"] == 30
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror.creds"}]
    # the request fits what a node of the SKU allocates (below its vCPUs); no CPU limit (no throttling)
    vcpus = cpu.sku.vcpus or 0
    assert 0 < _millicpu(c["resources"]["requests"]["cpu"]) <= kube.allocatable_millicpu(vcpus) < vcpus * 1000
    assert "cpu" not in c["resources"]["limits"]
    # a generic CPU SKU selects the architecture only: no cloud's instance-type label
    assert set(pod["nodeSelector"]) == {"kubernetes.io/arch"}
    # the memory limit covers the largest batch the server accepts
    request, _ = memory_request(cpu)
    limit = _mib(c["resources"]["limits"]["memory"])
    assert limit >= request + max_batch(cpu, ServingOptions()) * per_sample_bytes(cpu)
    assert limit >= memory_limit(cpu, ServingOptions())[0] and per_sample_bytes(cpu) >= 64 * 64  # 1x8x8 floats
    assert _mib(c["resources"]["requests"]["memory"]) >= request


def test_two_vcpu_node_gets_1800m_and_larger_nodes_keep_their_threads() -> None:
    assert kube.allocatable_millicpu(2) // 100 * 100 == 1800
    assert 3800 <= kube.allocatable_millicpu(4) < 4000
    assert 7800 <= kube.allocatable_millicpu(8) < 8000


def test_generic_cpu_skus_carry_no_cloud_labels() -> None:
    for sku in load_catalog().skus:
        if sku.kind == "cpu":
            assert set(sku.kubernetes.node_selector) == {"kubernetes.io/arch"}, sku.name


def test_gpu_engine_cache_is_an_emptydir_or_a_named_claim(gpu: Deployable) -> None:
    dep = kube.deployment(kube.workload(gpu, IMAGE, ServingOptions()), ServingOptions())
    kube.validate_k8s(dep)
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    _assert_restricted(pod, c)
    _assert_probes(c)
    cache = next(v for v in pod["volumes"] if v["name"] == "engine-cache")
    assert cache == {"name": "engine-cache", "emptyDir": {}}
    assert {"name": "engine-cache", "mountPath": "/var/cache/mlopt"} in c["volumeMounts"]
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600  # engine build time
    shared = kube.workload(gpu, IMAGE, ServingOptions(), kube.KubeOptions(engine_cache_claim="trt-engines"))
    dep = kube.deployment(shared, ServingOptions())
    kube.validate_k8s(dep)
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "engine-cache", "persistentVolumeClaim": {"claimName": "trt-engines"}} in pod["volumes"]
    assert pod["securityContext"]["fsGroup"] == RUN_AS  # the claim is writable by the non-root user


def test_bad_secret_or_claim_names_are_refused() -> None:
    with pytest.raises(BadInput, match="not a Kubernetes object name"):
        kube.KubeOptions(pull_secrets=("Reg_Cred",))
    with pytest.raises(BadInput, match="not a Kubernetes object name"):
        kube.KubeOptions(engine_cache_claim="-x")


# ------------------------------------------------------------------ KServe


def test_kserve_schema_is_kserves_own() -> None:
    schema = json.loads(kube.KSERVE_SCHEMA_FILE.read_text())
    assert "github.com/kserve/kserve" in schema["description"]
    predictor = schema["properties"]["spec"]["properties"]["predictor"]["properties"]
    assert {"containers", "nodeSelector", "tolerations", "securityContext", "imagePullSecrets", "volumes",
            "terminationGracePeriodSeconds", "minReplicas", "maxReplicas"} <= set(predictor)


@pytest.mark.parametrize("which", ["cpu", "gpu"])
def test_inference_service_is_a_raw_deployment_valid_for_kserves_crd(which: str, request: pytest.FixtureRequest) -> None:
    d = request.getfixturevalue(which)
    w = kube.workload(d, IMAGE, ServingOptions(), kube.KubeOptions(pull_secrets=("regcred",)))
    isvc = kube.inference_service(w, ServingOptions(max_replicas=3))
    kube.validate_kserve(isvc)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    p = isvc["spec"]["predictor"]
    c = p["containers"][0]
    _assert_restricted(p, c)
    _assert_probes(c)
    assert p["imagePullSecrets"] == [{"name": "regcred"}] and p["maxReplicas"] == 3
    assert c["readinessProbe"]["httpGet"]["port"] == 8000 and c["name"] == "kserve-container"
    for path, value in ((("spec", "predictor", "replicas"), 2),
                        (("spec", "predictor", "containers", 0, "securityContext", "runAsNonRot"), True),
                        (("spec", "predictor", "volumes", 0, "emptyDir", "size"), "1Gi")):
        bad = json.loads(json.dumps(isvc))
        node = bad
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        with pytest.raises(BadInput, match=path[-1]):  # the CRD's schema, strict, reaches into the pod spec
            kube.validate_kserve(bad)


def test_inference_service_without_selectors_keeps_to_what_knative_takes(cpu: Deployable) -> None:
    import dataclasses

    w = kube.workload(cpu, IMAGE, ServingOptions())
    w = dataclasses.replace(w, pod={k: v for k, v in w.pod.items() if k not in ("nodeSelector", "tolerations")})
    isvc = kube.inference_service(w, ServingOptions())
    kube.validate_kserve(isvc)
    assert "serving.kserve.io/deploymentMode" not in isvc["metadata"]["annotations"]
    c = isvc["spec"]["predictor"]["containers"][0]
    assert "startupProbe" not in c and "securityContext" not in isvc["spec"]["predictor"]
    _assert_restricted(isvc["spec"]["predictor"], c)  # the container's own context still restricts it


# ------------------------------------------------------------------ the CLI


def _record_images(manifest: Path, folder: Path) -> None:
    """images.json as `mlopt image build` writes it (no image needs building to export)."""
    m = read_manifest(manifest)
    write_record(folder, [BuiltImage(e.model, e.version, e.sku, e.chosen_backend, f"v{e.version}-{e.sku}",
                                     "sha256:" + "cd" * 32, e.artifact.key, "base", "sha256:" + "00" * 32, "builtin")
                          for e in m.entries if e.artifact])


@pytest.mark.parametrize("kind", ["k8s", "kserve"])
def test_export_cli_files_validate_and_carry_pull_secrets(digits_build: dict, tmp_path: Path, kind: str) -> None:
    manifest = digits_build["out"] / "manifest.json"
    _record_images(manifest, tmp_path / "images")
    res = runner.invoke(app, ["export", kind, str(manifest), "--out", str(tmp_path / "out"), "--images",
                              str(tmp_path / "images"), "--registry", REGISTRY, "--pull-secret", "regcred",
                              "--pull-secret", "mirror", "--grace-seconds", "45"])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "out").rglob("*.yaml"))
    assert files
    for f in files:
        doc = yaml.safe_load(f.read_text())
        if doc["kind"] == "InferenceService":
            kube.validate_kserve(doc)
            pod = doc["spec"]["predictor"]
        else:
            _kubernetes_validate(f)
            pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else None
        if pod is not None:
            assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
            assert pod["terminationGracePeriodSeconds"] == 45
            assert pod["containers"][0]["image"].startswith(REGISTRY + "@sha256:")


def test_export_cli_refuses_a_bad_pull_secret_and_writes_nothing(digits_build: dict, tmp_path: Path) -> None:
    manifest = digits_build["out"] / "manifest.json"
    _record_images(manifest, tmp_path / "images")
    res = runner.invoke(app, ["export", "k8s", str(manifest), "--out", str(tmp_path / "out"), "--images",
                              str(tmp_path / "images"), "--registry", REGISTRY, "--pull-secret", "Not_A_Name"])
    assert res.exit_code == 2 and "not a Kubernetes object name" in res.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ one-backend manifests


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_copied_repository(folder: Path, d: Deployable, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cp -r`` the model folder elsewhere: its config parses as Triton's ModelConfig, every model
    file is a regular file (no symlink) with the artifact's recorded digest, and the copy still runs
    the model the way its Triton backend would load it."""
    copy = tmp / "copied"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    c = triton.validate((copy / "config.pbtxt").read_text())
    assert c.backend == triton.runtime_of(d.backend).value
    assert [o.name for o in c.output] == d.model.outputs and all(list(o.dims) for o in c.output)
    files = d.artifact.meta["files"]
    wanted = triton.version_files(d)
    assert wanted
    for src in wanted:
        got = copy / "1" / src.name
        assert got.is_file() and not got.is_symlink()
        assert _sha256(got) == files[src.name]["sha256"]
    assert not [p for p in copy.rglob("*") if p.is_symlink()]
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    out = _run_copied(copy, c, x, monkeypatch)
    assert out.shape == (3, 10) and np.isfinite(out).all()


def _run_copied(copy: Path, c: object, x: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """One batch through the copied repository: OpenVINO reads ``default_model_filename``; the Python
    backend's model.py runs with a stand-in for the module Triton injects (triton_python_backend_utils)."""
    if c.backend == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(copy / "1" / c.default_model_filename), "CPU")
        return np.asarray(compiled({"x": x})[compiled.output(0)])
    for name in [m for m in sys.modules if m == "mlopt_entry" or m.startswith("mlopt_runtime")]:
        monkeypatch.delitem(sys.modules, name)  # the copy's own entry point and loaders, not a cached one
    model = triton_python_model(copy / "1" / "model.py", monkeypatch, "copied_triton_model")
    model.initialize({"model_repository": str(copy), "model_version": "1"})
    [out] = model.execute([{"x": x}])
    return out[c.output[0].name]


def test_one_backend_manifest_exports_a_triton_repository(only: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    res = runner.invoke(app, ["export", "triton", str(only), "--out", str(tmp_path / "triton")])
    assert res.exit_code == 0, res.output
    [d] = _deployables(only, only.parent.parent / "store")
    _check_copied_repository(tmp_path / "triton" / d.sku.name / d.model.name, d, tmp_path, monkeypatch)


def test_one_backend_manifest_builds_an_image_with_a_real_triton_repository(only: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    require_tools()
    base = make_base_layout(tmp_path / "base")
    res = runner.invoke(app, ["image", "build", str(only), "--out", str(tmp_path / "image"),
                              "--base-image", f"oci:{base}:base"])
    assert res.exit_code == 0, res.output
    [d] = _deployables(only, only.parent.parent / "store")
    context = next((tmp_path / "image" / "context").iterdir())
    assert "USER 65532:65532" in (context / "Dockerfile").read_text()
    assert not [p for p in context.rglob("*") if p.is_symlink()]
    bundle = umoci_unpack(tmp_path / "image" / "oci", f"v1-{d.sku.name}", tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["process"]["user"]["uid"] == RUN_AS
    _check_copied_repository(bundle / "opt/mlopt/serving/triton" / d.model.name, d, tmp_path, monkeypatch)


def test_a_failed_export_leaves_no_folder(only: Path, tmp_path: Path) -> None:
    """Without the model the builds were compiled from (a fresh store holding only the artifacts),
    a TVM-only manifest has no output shapes: exit 2, a message, and no output folder."""
    import shutil

    [d] = _deployables(only, only.parent.parent / "store")
    if d.backend != "tvm":
        pytest.skip("an OpenVINO IR carries its own output shapes")
    store = tmp_path / "store"
    shutil.copytree(d.artifact.path.parents[1] / "objects", store / "objects")
    res = runner.invoke(app, ["export", "triton", str(only), "--out", str(tmp_path / "triton"), "--store", str(store)])
    assert res.exit_code == 2 and "no ONNX model or OpenVINO IR" in res.output, res.output
    assert not (tmp_path / "triton").exists()
    res = runner.invoke(app, ["image", "build", str(only), "--out", str(tmp_path / "image"), "--store", str(store),
                              "--base-image", f"oci:{make_base_layout(tmp_path / 'base')}:base"])
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "image").exists()
