"""`mlopt doctor`: recorded outputs of nvidia-smi, amd-smi, rocm-smi, xpu-smi and sysfs trees for machines
we do not have (tests/fixtures/doctor), matched to catalog SKUs, checked, and driven through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from mlopt.cli import app
from mlopt.targets import detect, doctor
from mlopt.targets.catalog import load_catalog

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
runner = CliRunner()


def env(name: str) -> doctor.ReplayEnv:
    return doctor.replay_env(FIXTURES / name)


def run_doctor(monkeypatch: pytest.MonkeyPatch, fixture: str | Path | None, *args: str):
    if fixture is None:
        monkeypatch.delenv(doctor.REPLAY_VAR, raising=False)
    else:
        monkeypatch.setenv(doctor.REPLAY_VAR, str(FIXTURES / fixture if isinstance(fixture, str) else fixture))
    return runner.invoke(app, ["doctor", *args])


# ------------------------------------------------------------------ probes on recorded outputs


def test_nvidia_smi_h100_machine() -> None:
    gpus = detect.nvidia_smi_gpus(env("h100x8"))
    assert len(gpus) == 8
    assert gpus[0] == detect.GPU("nvidia", "NVIDIA H100 80GB HBM3", "sm_90", "580.82.07", 81559, "10de:2330",
                                 "nvidia-smi")


def test_nvidia_smi_t4_machine() -> None:
    (gpu,) = detect.detect_gpus(env("t4-driver-535"))
    assert (gpu.name, gpu.arch, gpu.driver, gpu.pci_id) == ("Tesla T4", "sm_75", "535.183.01", "10de:1eb8")


def test_amd_smi_rocm_smi_and_kfd_agree_on_the_mi300x_machine() -> None:
    e = env("mi300x")
    by_amd_smi, by_rocm_smi, by_kfd = detect.amd_smi_gpus(e), detect.rocm_smi_gpus(e), detect.kfd_gpus(e)
    assert len(by_amd_smi) == len(by_rocm_smi) == len(by_kfd) == 8  # the two KFD CPU nodes are skipped
    assert by_amd_smi[0] == detect.GPU("amd", "AMD Instinct MI300X", "gfx942", "6.12.12", 196592, "1002:74a1",
                                       "amd-smi")
    assert (by_rocm_smi[3].name, by_rocm_smi[3].arch, by_rocm_smi[3].driver, by_rocm_smi[3].pci_id) == (
        "AMD Instinct MI300X", "gfx942", "6.12.12", "1002:74a1")
    assert {(g.arch, g.driver, g.pci_id) for g in by_kfd} == {("gfx942", "6.12.12", "1002:74a1")}


def test_kfd_alone_still_matches_by_pci_id() -> None:
    """Without amd-smi or rocm-smi the KFD tree names no product, but its PCI id is in the catalog."""
    e = replace(env("mi300x"), run=lambda cmd: None)
    report = doctor.diagnose(load_catalog(), e)
    (m,) = report.matches
    assert m.gpu.source == "kfd" and len(m.indices) == 8 and m.skus == ("mi300x",)
    assert report.ok


def test_older_amd_smi_list_format() -> None:
    """ROCm 6.0-6.3 print a bare list with driver_name/driver_version and vram_size_mb."""
    text = json.dumps([{"gpu": 0, "asic": {"market_name": "AMD Instinct MI210", "vendor_id": "0x1002",
                                           "device_id": "0x740f", "target_graphics_version": "gfx90a"},
                        "driver": {"driver_name": "amdgpu", "driver_version": "6.7.0"},
                        "vram": {"vram_type": "HBM2E", "vram_size_mb": 65520}}])
    e = replace(env("cpu-only"), run=lambda cmd: text if list(cmd) == detect.AMD_SMI_STATIC else None)
    assert detect.amd_smi_gpus(e) == [detect.GPU("amd", "AMD Instinct MI210", "gfx90a", "6.7.0", 65520,
                                                 "1002:740f", "amd-smi")]


def test_xpu_smi_and_drm_on_the_max_1550_machine() -> None:
    e = env("max1550")
    by_xpu = detect.xpu_smi_gpus(e)
    assert [g.name for g in by_xpu] == ["Intel(R) Data Center GPU Max 1550"] * 4
    assert {g.pci_id for g in by_xpu} == {"8086:0bd5"}
    by_drm = detect.drm_intel_gpus(e)  # card0 (ASPEED, 0x1a03) is not an Intel GPU
    assert len(by_drm) == 4 and {g.pci_id for g in by_drm} == {"8086:0bd5"}


@pytest.mark.parametrize(("packed", "target"), [(90402, "gfx942"), (90010, "gfx90a"), (90008, "gfx908"),
                                                 (110501, "gfx1151"), (120001, "gfx1201")])
def test_gfx_target_version(packed: int, target: str) -> None:
    assert detect.gfx_name(packed) == target


@pytest.mark.parametrize(("found", "need", "ok"), [
    ("535.183.01", "580.65.06", False), ("580.65.06", "580.65.06", True), ("580.82.07", "580.65.06", True),
    ("6.12.12", "6.8.5", True), ("6.4.1-83", "6.2", True), ("12.2", "13.0", False), ("13.0", "13", True),
    ("1.17.44", "1.17", True), ("2024.2", "2025.0", False), ("N/A", "6.8.5", None), (None, "1.0", None),
])
def test_versions_compare_numerically(found: str | None, need: str, ok: bool | None) -> None:
    assert detect.version_at_least(found, need) is ok


def test_nvml_probe_with_a_fake_library() -> None:
    class NVMLError(Exception):
        pass

    fake = SimpleNamespace(
        NVMLError=NVMLError, nvmlShutdown=lambda: None, nvmlSystemGetDriverVersion=lambda: "580.95.05",
        nvmlSystemGetCudaDriverVersion=lambda: 13000, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=143771 * 2**20),
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(pciDeviceId=0x233510DE))
    e = replace(env("cpu-only"), nvml=lambda: fake)
    gpus = detect.detect_gpus(e)
    assert gpus == [detect.GPU("nvidia", "NVIDIA H200", "sm_90", "580.95.05", 143771, "10de:2335", "nvml")] * 2
    assert doctor.cuda_runtime(e).version == "13.0"
    assert [m.skus for m in doctor.diagnose(load_catalog(), e).matches] == [("h200",)]


# ------------------------------------------------------------------ matching and checks


@pytest.mark.parametrize(("fixture", "sku"), [("h100x8", "h100"), ("t4-driver-535", "t4"), ("mi300x", "mi300x"),
                                              ("max1550", "max-1550")])
def test_each_machine_matches_its_sku(fixture: str, sku: str) -> None:
    report = doctor.diagnose(load_catalog(), env(fixture))
    assert [m.skus for m in report.matches] == [(sku,)]


@pytest.mark.parametrize("fixture", ["h100x8", "mi300x", "max1550"])
def test_machines_that_meet_their_requirements(fixture: str) -> None:
    report = doctor.diagnose(load_catalog(), env(fixture))
    assert report.ok and report.checks and {c.status for c in report.checks} == {"ok"}


def test_t4_below_the_driver_minimum_fails_with_the_fix() -> None:
    report = doctor.diagnose(load_catalog(), env("t4-driver-535"))
    failed = {c.requirement: c for c in report.checks if c.status == "fail"}
    assert set(failed) == {"driver", "cuda runtime"}
    driver = failed["driver"]
    assert (driver.found, driver.need) == ("535.183.01", "580.65.06")
    assert "580.65.06 or newer" in driver.fix and "NVIDIA GPU Operator" in driver.fix
    assert "driver.version" in driver.fix
    with pytest.raises(doctor.BackendUnavailable) as e:
        doctor.raise_for(report)
    assert e.value.exit_code == 4 and "Tesla T4" in e.value.message and "535.183.01" in e.value.message


def test_an_unknown_gpu_is_reported_not_failed(tmp_path: Path) -> None:
    machine = _nvidia_machine(tmp_path, "NVIDIA GeForce RTX 4090, 580.82.07, 24564 MiB, 8.9, 0x268410DE")
    report = doctor.diagnose(load_catalog(), doctor.replay_env(machine))
    assert [m.skus for m in report.matches] == [()] and report.ok


def test_a_user_catalog_sku_matches_it(tmp_path: Path) -> None:
    machine = _nvidia_machine(tmp_path, "NVIDIA GeForce RTX 4090, 535.183.01, 24564 MiB, 8.9, 0x268410DE")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"skus": [{
        "name": "rtx-4090", "vendor": "nvidia", "kind": "gpu", "arch": "sm_89", "backends": ["tvm"],
        "requirements": {"driver": "580.65.06"}, "device": {"match": ["RTX 4090"]}}]}))
    report = doctor.diagnose(load_catalog(catalog), doctor.replay_env(machine))
    assert [m.skus for m in report.matches] == [("rtx-4090",)]
    (check,) = report.checks
    assert check.status == "fail" and "on Kubernetes" not in check.fix  # the SKU names no operator


def test_an_unreadable_driver_version_is_unknown_not_failed(tmp_path: Path) -> None:
    machine = _nvidia_machine(tmp_path, "NVIDIA H100 80GB HBM3, [N/A], 81559 MiB, 9.0, 0x233010DE")
    report = doctor.diagnose(load_catalog(), doctor.replay_env(machine))
    driver = next(c for c in report.checks if c.requirement == "driver")
    assert driver.status == "unknown" and "could not read the driver version" in driver.fix
    assert not any("driver" in problem for problem in report.problems)  # unknown is a warning, not exit 4


def test_no_gpu_lists_what_cross_compiling_needs() -> None:
    report = doctor.diagnose(load_catalog(), env("cpu-only"))
    assert not report.gpus and not report.checks and report.ok
    needs = {r["needs"]: r for r in report.cross_compile}
    assert set(needs) == {"nvcc", "ld.lld >= 17", "rocm-bitcode"}
    assert not any(r["present"] for r in needs.values())
    assert "nvidia-cuda-nvcc" in needs["nvcc"]["fix"] and "h100" in needs["nvcc"]["skus"]


def _nvidia_machine(tmp_path: Path, line: str) -> Path:
    (tmp_path / "query.csv").write_text(line + "\n")
    commands = {" ".join(detect.NVIDIA_SMI_QUERY): "query.csv"}
    (tmp_path / "machine.yaml").write_text(yaml.safe_dump({"commands": commands}))
    return tmp_path


# ------------------------------------------------------------------ the CLI


def test_cli_t4_driver_below_minimum_exits_4_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    res = run_doctor(monkeypatch, "t4-driver-535")
    assert res.exit_code == 4, res.output
    assert "Tesla T4" in res.output and "535.183.01" in res.output and "580.65.06" in res.output
    assert "NVIDIA GPU Operator" in res.output and "driver.version" in res.output


def test_cli_json_is_one_document(monkeypatch: pytest.MonkeyPatch) -> None:
    res = run_doctor(monkeypatch, "t4-driver-535", "--json")
    assert res.exit_code == 4
    doc = json.loads(res.stdout)
    assert {"gpus", "matches", "checks", "runtimes", "toolchains", "host", "ok", "problems", "fixes"} <= set(doc)
    assert doc["ok"] is False and doc["exit_code"] == 4
    assert doc["gpus"][0]["name"] == "Tesla T4" and doc["matches"][0]["skus"] == ["t4"]
    assert {c["status"] for c in doc["checks"]} == {"fail"}
    assert doc["runtimes"]["cuda"]["version"] == "12.2"


@pytest.mark.parametrize(("fixture", "sku"), [("h100x8", "h100"), ("mi300x", "mi300x"), ("max1550", "max-1550")])
def test_cli_passing_machines_exit_0(monkeypatch: pytest.MonkeyPatch, fixture: str, sku: str) -> None:
    res = run_doctor(monkeypatch, fixture, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["matches"][0]["skus"] == [sku]


def test_cli_sku_present_and_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    res = run_doctor(monkeypatch, "h100x8", "--sku", "h100")
    assert res.exit_code == 0 and "can serve h100" in res.output


def test_cli_sku_absent_exits_4(monkeypatch: pytest.MonkeyPatch) -> None:
    res = run_doctor(monkeypatch, "t4-driver-535", "--sku", "h100", "--json")
    assert res.exit_code == 4 and "no h100 GPU on this machine" in res.output and "Tesla T4" in res.output
    doc = json.loads(res.stdout)
    assert doc["checks"] == [] and doc["skus"]["t4"]["runs_here"] is False  # the T4's own checks still count


def test_cli_unknown_sku_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    res = run_doctor(monkeypatch, "h100x8", "--sku", "h10")
    assert res.exit_code == 2 and "unknown SKU" in res.output


def test_cli_unknown_gpu_points_at_catalog(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    machine = _nvidia_machine(tmp_path, "NVIDIA GeForce RTX 4090, 580.82.07, 24564 MiB, 8.9, 0x268410DE")
    res = run_doctor(monkeypatch, machine)
    assert res.exit_code == 0 and "not in the catalog" in res.output and "--catalog" in res.output


def test_cli_replay_folder_without_machine_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    res = run_doctor(monkeypatch, tmp_path)
    assert res.exit_code == 2 and "machine.yaml" in res.output


def test_cli_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probes on the machine running the tests (no GPU here: exit 0 and the cross-compile needs)."""
    has_gpu = bool(detect.detect_gpus())
    res = run_doctor(monkeypatch, None)
    assert res.exit_code in ((0, 4) if has_gpu else (0,)), res.output
    if not has_gpu:
        assert "no GPU found" in res.output and "cross-compiling for GPU SKUs needs" in res.output
    doc = json.loads(run_doctor(monkeypatch, None, "--json").stdout)
    assert doc["host"]["cores"] and "onnxruntime" in doc["runtimes"] and "nvcc" in doc["toolchains"]


@pytest.mark.parametrize("sku", ["cpu-x86-64-v3", "cpu-aarch64-neoverse-v1"])
def test_cli_sku_for_a_cpu_sku_asks_whether_this_host_runs_it(monkeypatch: pytest.MonkeyPatch, sku: str) -> None:
    runs, why = detect.host_runs(load_catalog().get(sku))
    res = run_doctor(monkeypatch, "cpu-only", "--sku", sku)
    assert res.exit_code == (0 if runs else 4), res.output
    assert (f"can serve {sku}" if runs else why) in " ".join(res.output.split())


def test_skus_say_which_builds_run_here() -> None:
    t4 = doctor.diagnose(load_catalog(), env("t4-driver-535")).skus
    assert t4["t4"]["runs_here"] is False and "535.183.01 < 580.65.06" in t4["t4"]["reason"]
    assert t4["h100"] == {"runs_here": False, "reason": "no h100 GPU here (cross-compile only)"}
    assert doctor.diagnose(load_catalog(), env("h100x8")).skus["h100"] == {"runs_here": True, "reason": ""}


def test_rocm_version_from_a_versioned_folder_or_rocm_path(tmp_path: Path) -> None:
    (tmp_path / "root" / "opt" / "rocm-6.2.4" / ".info").mkdir(parents=True)
    (tmp_path / "root" / "opt" / "rocm-6.2.4" / ".info" / "version").write_text("6.2.4-120\n")
    (tmp_path / "machine.yaml").write_text("description: ROCm in a versioned folder\n")
    found = doctor.rocm_runtime(doctor.replay_env(tmp_path))
    assert (found.version, found.source) == ("6.2.4-120", "/opt/rocm-6.2.4/.info/version")
    (tmp_path / "machine.yaml").write_text("environ: {ROCM_PATH: /opt/rocm-6.2.4}\n")
    assert doctor.rocm_runtime(doctor.replay_env(tmp_path)).version == "6.2.4-120"
