"""GPU SKUs built on this machine without a GPU: real sm_XX and gfxNNN code, checked from the bytes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import HOST, tiny_onnx
from mlopt.cli import app
from mlopt.core.errors import BackendUnavailable
from mlopt.targets import gpu_toolchain
from mlopt.targets.devcode import FATBIN_MAGIC, inspect_library, require_device_code

needs_nvcc = pytest.mark.skipif(gpu_toolchain.cuda_missing() is not None,
                                reason=f"{gpu_toolchain.cuda_missing()} (pip install 'mlopt[cuda]')")
needs_rocm = pytest.mark.skipif(gpu_toolchain.rocm_missing() is not None,
                                reason=f"{gpu_toolchain.rocm_missing()} (apt-get install lld-22 rocm-device-libs)")


def conv_onnx(path: Path) -> Path:
    """x[batch,3,16,16] -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[batch,5]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W", (8, 3, 3, 3)), ("B", (8,)), ("G", (5, 8)), ("C", (5,)))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def compile_for(tmp: Path, targets: list[str], backends: list[str], *extra: str) -> tuple[int, str, dict]:
    model = conv_onnx(tmp / "conv.onnx")
    args = ["compile", str(model), "--input", "x:batchx3x16x16", "--store", str(tmp / "store"),
            "--out", str(tmp / "out"), "--batch-sizes", "1", "--runs", "3", "--warmup", "1"]
    for t in targets:
        args += ["--target", t]
    for b in backends:
        args += ["--backend", b]
    res = CliRunner().invoke(app, args + list(extra))
    manifest = tmp / "out" / "manifest.json"
    return res.exit_code, res.output, json.loads(manifest.read_text()) if manifest.is_file() else {}


def candidate(manifest: dict, sku: str, backend: str) -> dict:
    entry = next(e for e in manifest["entries"] if e["sku"] == sku)
    return next(c for c in entry["candidates"] if c["backend"] == backend)


@needs_nvcc
def test_cuda_builds_hold_sass_for_each_skus_architecture(tmp_path: Path) -> None:
    code, output, m = compile_for(tmp_path, ["t4", "h100", "h200"], ["tvm"])
    assert code == 0, output
    for sku, arch in (("t4", "sm_75"), ("h100", "sm_90"), ("h200", "sm_90")):
        c = candidate(m, sku, "tvm")
        assert c["status"] == "built" and c["compiled"] == "cross" and c["measurement"] is None
        assert c["validation"]["status"] == "not-run"
        library = Path(c["artifact"]["path"]) / "model.so"
        codes = inspect_library(library)
        assert [(d.kind, d.arch) for d in codes if d.kind == "cubin"] and all(d.arch == arch for d in codes), codes
        assert c["details"]["device_code"][0] == {"kind": "cubin", "arch": arch, "bytes": codes[0].bytes}
    # h100 and h200 share an architecture, so they share one artifact
    assert candidate(m, "h100", "tvm")["artifact"]["key"] == candidate(m, "h200", "tvm")["artifact"]["key"]
    assert candidate(m, "t4", "tvm")["artifact"]["key"] != candidate(m, "h100", "tvm")["artifact"]["key"]


@needs_nvcc
def test_cuda_build_loads_with_the_tvm_runtime_alone(tmp_path: Path) -> None:
    code, output, m = compile_for(tmp_path, ["a10g"], ["tvm"])
    assert code == 0, output
    art = Path(candidate(m, "a10g", "tvm")["artifact"]["path"])
    probe = ("import runpy, sys; sys.argv = ['run_tvm.py', '--load-only']; "
             f"runpy.run_path({str(art / 'run_tvm.py')!r}, run_name='__main__')")
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1",
           "LD_PRELOAD": str(gpu_toolchain._stub_path())}  # no driver here: the stand-in libcuda
    res = subprocess.run([sys.executable, "-c", f"import atexit; atexit.register(lambda: print('compiler mapped:', "
                          f"any('libtvm_compiler' in l for l in open('/proc/self/maps')))); {probe}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "loaded model.so for {'kind': 'cuda', 'arch': 'sm_86'}" in res.stdout
    assert "compiler mapped: False" in res.stdout  # the compiler library (hundreds of MB) stays out of images


def _check_in_image(tmp: Path, sku: str, preload: str | None = None) -> subprocess.CompletedProcess:
    """``entry.py --check`` on the SKU's TVM build, laid out as in an image: entry.py and the shipped
    mlopt_runtime package, serve.json as mlopt writes it, and no mlopt importable (a poisoned one)."""
    from mlopt import runtime
    from mlopt.manifest import read_manifest
    from mlopt.package import entry
    from mlopt.package.serving import ServingOptions, deployables, serve_spec
    from mlopt.store import Store
    from mlopt.targets.catalog import load_catalog

    [d], _ = deployables(read_manifest(tmp / "out" / "manifest.json"), Store(tmp / "store"), load_catalog(), (sku,))
    image = tmp / "image"
    (image / "poison" / "mlopt").mkdir(parents=True, exist_ok=True)
    (image / "poison" / "mlopt" / "__init__.py").write_text('raise ImportError("images have no mlopt")\n')
    (image / "entry.py").write_bytes(Path(entry.__file__).read_bytes())
    runtime.ship(image)
    (image / "serve.json").write_text(json.dumps(serve_spec(d, ServingOptions())))
    env = {"PATH": os.path.dirname(sys.executable), "PYTHONPATH": str(image / "poison"),
           **({"LD_PRELOAD": preload} if preload else {})}
    return subprocess.run([sys.executable, str(image / "entry.py"), "--serving", str(image / "serve.json"),
                           "--model-dir", str(d.artifact.path), "--check"], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=300)


@needs_nvcc
def test_cuda_build_in_the_image_entry_asks_for_the_gpu_and_exits_4(tmp_path: Path) -> None:
    """The image entry runs a TVM CUDA build on the CUDA device its metadata names, never on the CPU:
    without the driver its CUDA plugin does not load; with a driver and no GPU (the libcuda stand-in)
    it finds no CUDA device. Either way one line says why, exit 4, and nothing runs."""
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has an NVIDIA driver: the test is of a machine without a GPU")
    code, output, _ = compile_for(tmp_path, ["a10g"], ["tvm"])
    assert code == 0, output
    no_driver = _check_in_image(tmp_path, "a10g")
    assert no_driver.returncode == 4, no_driver.stderr[-2000:]
    assert no_driver.stdout == "" and len(no_driver.stderr.strip().splitlines()) == 1
    assert "CUDA runtime plugin does not load" in no_driver.stderr and "NVIDIA driver" in no_driver.stderr
    no_gpu = _check_in_image(tmp_path, "a10g", preload=str(gpu_toolchain._stub_path()))
    assert no_gpu.returncode == 4, no_gpu.stderr[-2000:]
    assert no_gpu.stdout == "" and "Traceback" not in no_gpu.stderr
    assert no_gpu.stderr.strip() == ("entry: loading conv failed: Unavailable: this build needs a cuda device "
                                     "({'kind': 'cuda', 'arch': 'sm_86'}); none is visible")


@needs_rocm
def test_rocm_build_in_the_image_entry_asks_for_the_gpu_and_exits_4(tmp_path: Path) -> None:
    if Path("/dev/kfd").exists():
        pytest.skip("this machine has an AMD GPU driver: the test is of a machine without a GPU")
    code, output, _ = compile_for(tmp_path, ["mi300x"], ["tvm"])
    assert code == 0, output
    res = _check_in_image(tmp_path, "mi300x")
    assert res.returncode == 4 and res.stdout == "", res.stderr[-2000:]
    assert res.stderr.strip() == ("entry: loading conv failed: Unavailable: this build needs a rocm device "
                                  "({'kind': 'rocm', 'mcpu': 'gfx942'}); none is visible")


@needs_rocm
def test_rocm_builds_hold_amdgpu_code_objects_for_each_gfx_target(tmp_path: Path) -> None:
    code, output, m = compile_for(tmp_path, ["mi300x", "mi210"], ["tvm"])
    assert code == 0, output
    assert "Cannot get maximum number of threads" not in output
    for sku, arch in (("mi300x", "gfx942"), ("mi210", "gfx90a")):
        c = candidate(m, sku, "tvm")
        assert c["compiled"] == "cross" and "ROCm" in c["reason"]
        codes = inspect_library(Path(c["artifact"]["path"]) / "model.so")
        assert {(d.kind, d.arch) for d in codes} == {("amdgpu-elf", arch)}


def test_onnxruntime_gpu_builds_carry_each_skus_execution_providers(tmp_path: Path) -> None:
    code, output, m = compile_for(tmp_path, ["h100", "t4", "mi300x", "max-1550", HOST], ["onnxruntime"])
    assert code == 0, output
    providers = {}
    for sku in ("h100", "t4", "mi300x", "max-1550"):
        c = candidate(m, sku, "onnxruntime")
        assert c["compiled"] == "cross" and c["measurement"] is None and c["validation"]["status"] == "not-run"
        providers[sku] = json.loads((Path(c["artifact"]["path"]) / "session.json").read_text())["providers"]
    trt = dict(providers["h100"])["TensorrtExecutionProvider"]
    assert [p for p, _ in providers["h100"]] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                 "CPUExecutionProvider"]
    assert trt["trt_fp16_enable"] is True and trt["trt_int8_enable"] is False and trt["trt_engine_cache_enable"]
    assert dict(providers["t4"])["CUDAExecutionProvider"]["use_tf32"] == 0  # Turing has no TF32
    assert dict(providers["mi300x"])["MIGraphXExecutionProvider"]["migraphx_fp16_enable"] is True
    assert dict(providers["max-1550"])["OpenVINOExecutionProvider"]["device_type"] == "GPU"
    cpu = candidate(m, HOST, "onnxruntime")
    assert cpu["compiled"] == "here" and cpu["measurement"]["batches"][0]["p50_ms"] > 0


def test_device_code_check_refuses_host_code_ptx_and_source(tmp_path: Path) -> None:
    code, output, m = compile_for(tmp_path, [HOST], ["tvm"])
    assert code == 0, output
    host_only = Path(candidate(m, HOST, "tvm")["artifact"]["path"]) / "model.so"
    with pytest.raises(BackendUnavailable, match="no cubin for sm_90.*host code only"):
        require_device_code(host_only, "sm_90")
    ptx = tmp_path / "ptx.so"
    entry = struct.pack("<HHIQ", 1, 0x0101, 64, 16) + b"\0" * 12 + struct.pack("<I", 90) + b"\0" * 28
    ptx.write_bytes(b"\x7fELF" + b"\0" * 60 + FATBIN_MAGIC + struct.pack("<HHQ", 1, 16, len(entry) + 16)
                    + entry + b".version 8.8\0\0\0\0")
    assert [(d.kind, d.arch) for d in inspect_library(ptx)] == [("ptx", "sm_90")]
    with pytest.raises(BackendUnavailable, match="found: ptx:sm_90"):
        require_device_code(ptx, "sm_90")
    source = tmp_path / "src.so"
    source.write_bytes(b"\x7fELF" + b"\0" * 60 + b'extern "C" __global__ void default_function_kernel() {}')
    with pytest.raises(BackendUnavailable, match="cuda-source"):
        require_device_code(source, "sm_90")


def test_a_sku_no_backend_can_build_for_fails_with_what_it_needs(tmp_path: Path) -> None:
    catalog = tmp_path / "fleet.yaml"
    catalog.write_text(yaml.safe_dump({"skus": [{
        "name": "edge-vulkan", "vendor": "generic", "kind": "gpu", "arch": "vulkan-1.3",
        "backends": ["tvm"], "tvm_target": {"kind": "vulkan"}}]}))
    code, output, _ = compile_for(tmp_path, ["edge-vulkan"], [], "--catalog", str(catalog))
    assert code == 4, output
    assert "edge-vulkan" in output and "no backend" in output.lower()


def test_catalog_typos_and_unknown_skus_are_clear(tmp_path: Path) -> None:
    catalog = tmp_path / "fleet.yaml"
    catalog.write_text(yaml.safe_dump({"skus": [{
        "name": "my-l4", "vendor": "nvidia", "kind": "gpu", "arch": "sm_89", "backend": ["tvm"]}]}))
    res = CliRunner().invoke(app, ["targets", "--catalog", str(catalog)])
    said = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 2 and "SKU 'my-l4': backend: unknown field" in said and "did you mean 'backends'" in said
    over = tmp_path / "prices.yaml"
    over.write_text(yaml.safe_dump({"overrides": {"h100": {"price": {"usd_per_hour": 2.5, "source": "our contract",
                                                                      "date": "2026-11"}}}}))
    res = CliRunner().invoke(app, ["targets", "show", "h100", "--catalog", str(over), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["price"]["usd_per_hour"] == 2.5
    res = CliRunner().invoke(app, ["targets", "show", "h10"])
    assert res.exit_code == 2 and "did you mean 'h100'" in " ".join(res.output.split())
    code, output, _ = compile_for(tmp_path, ["h1000"], ["tvm"])
    assert code == 2 and "unknown SKU 'h1000'" in output


def test_fleet_overrides_merge_nested_fields_and_bad_catalog_paths_are_exit_2(tmp_path: Path) -> None:
    from mlopt.targets.catalog import load_catalog

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"overrides": {"h100": {"requirements": {"driver": "590.0"}},
                                                   "cpu-x86-64-v4": {"requirements": {"driver": None}}}}))
    cat = load_catalog(fleet)
    assert cat.get("h100").requirements.driver == "590.0"
    assert cat.get("h100").requirements.runtimes == {"cuda": "13.0"}  # kept, not replaced
    assert "avx512f" in cat.get("cpu-x86-64-v4").requirements.cpu_flags
    res = CliRunner().invoke(app, ["targets", "--catalog", str(tmp_path)])
    assert res.exit_code == 2 and "cannot be read" in res.output


def test_a_matching_gpu_here_makes_its_sku_runnable(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlopt.targets import detect
    from mlopt.targets.catalog import load_catalog

    cat = load_catalog()
    monkeypatch.setattr(detect, "_gpus_here", lambda: (detect.GPU("nvidia", "NVIDIA H100 80GB HBM3", "sm_90"),))
    assert detect.host_runs(cat.get("h100")) == (True, "")
    assert detect.host_runs(cat.get("h200"))[0] is False  # same arch, another product
    assert detect.host_runs(cat.get("a10g"))[0] is False
    monkeypatch.setattr(detect, "_gpus_here", lambda: ())
    assert detect.host_runs(cat.get("h100"))[0] is False


def test_truncated_or_stray_magic_bytes_do_not_crash_the_check(tmp_path: Path) -> None:
    odd = tmp_path / "odd.so"
    odd.write_bytes(b"\x7fELF" + b"\0" * 40 + FATBIN_MAGIC + b"\x01\x00\x10" + b"\x7fELF\x02")
    assert inspect_library(odd) == []
    with pytest.raises(BackendUnavailable):
        require_device_code(odd, "gfx942")


def test_precision_labels_follow_the_model(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mlopt.core.model import model_precision

    assert model_precision(tiny_onnx(tmp_path / "f32.onnx")) == "float32"
    w = numpy_helper.from_array(np.ones((4, 3), np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "h",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f16.onnx"))
    assert model_precision(tmp_path / "f16.onnx") == "float16"
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(tiny_onnx(tmp_path / "src.onnx")), str(tmp_path / "dyn.onnx"))
    assert model_precision(tmp_path / "dyn.onnx") == "int8"  # MatMulInteger, no QuantizeLinear
