from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlopt.core.errors import StoreError
from mlopt.store import Store


def _put(store: Store, key: str, payload: bytes) -> None:
    with store.staging() as tmp:
        files = tmp / "a"
        files.mkdir()
        (files / "model.bin").write_bytes(payload)
        store.put(key, files, {"sku": "s", "backend": "b", "precision": "float32"})


def test_put_get_verify_and_detect_damage(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _put(store, "k" * 64, b"hello")
    art = store.checked("k" * 64)
    assert art is not None and store.verify(art) == []
    (art.path / "model.bin").write_bytes(b"HELLO")
    assert store.verify(art) == ["model.bin: sha256 differs from the recorded digest"]
    with pytest.raises(StoreError, match="damaged"):
        store.checked("k" * 64)


def test_versions_are_per_model_and_stable(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.version_for("m", "a", {}) == 1
    assert store.version_for("m", "b", {}) == 2
    assert store.version_for("m", "a", {}) == 1
    assert store.version_for("other", "a", {}) == 1


def _claim(root: str, key: str, q: "mp.Queue") -> None:
    q.put(Store(root).version_for("m", key, {}))


def test_concurrent_versions_do_not_collide(tmp_path: Path) -> None:
    q: mp.Queue = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_claim, args=(str(tmp_path), f"key{i}", q)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert sorted(q.get() for _ in procs) == [1, 2, 3, 4, 5, 6]


KILLED_WRITER = """
import sys, time
from mlopt.store import Store
store = Store(sys.argv[1])
with store.staging() as tmp:
    files = tmp / "a"; files.mkdir()
    with open(files / "model.bin", "wb") as f:
        f.write(b"x" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)   # killed here, half way through an artifact
    store.put("d" * 64, files, {"sku": "s", "backend": "b", "precision": "float32"})
"""


def test_killed_build_leaves_store_valid(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _put(store, "c" * 64, b"complete")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.get("d" * 64) is None  # nothing half-written is visible
    assert [a.key for a in store.artifacts()] == ["c" * 64]
    assert all(store.verify(a) == [] for a in store.artifacts())
    assert any((tmp_path / "tmp").iterdir())  # the dead writer's staging folder ...
    store.link("m", store.version_for("m", "v", {}), "c" * 64)
    assert store.gc()["tmp"] == 1  # ... is collected, the complete artifact kept
    assert not any((tmp_path / "tmp").iterdir()) and store.get("c" * 64) is not None


def test_gc_removes_unreferenced_and_old_versions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for i, key in enumerate(["a" * 64, "b" * 64, "e" * 64]):
        _put(store, key, str(i).encode())
    store.link("m", store.version_for("m", "v1", {}), "a" * 64)
    store.link("m", store.version_for("m", "v2", {}), "b" * 64)
    removed = store.gc()
    assert removed["objects"] == 1 and store.get("e" * 64) is None
    removed = store.gc(keep_last=1)
    assert removed["versions"] == 1 and store.get("a" * 64) is None and store.get("b" * 64) is not None


def test_not_writable_store_is_bad_input(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "store").write_text("a file, not a folder")
    with pytest.raises(StoreError, match="not writable"):
        Store(ro / "store")


# artifact.json files as mlopt wrote them before BuildMeta existed (digits example; the engine plan of a
# TensorRT build, whose build here is a plan for the device): every key a backend or the compiler wrote
_TODAY = {
    "build_seconds": 0.006, "content_digest": "6" * 64, "created": "2026-12-02T17:14:55Z", "key": "c" * 64,
    "model": "digits-cnn", "model_digest": "b" * 64, "outputs": ["output"], "precision": "float32",
    "signature": [{"dtype": "float32", "name": "x", "shape": ["batch", 1, 8, 8]}], "sku": "cpu-x86-64-v4",
    "files": {"model.onnx": {"bytes": 245073, "sha256": "c" * 64}},
}
_BACKENDS = {
    "onnxruntime": {"backend": "onnxruntime", "details": {"providers": ["CPUExecutionProvider"]},
                    "entry": "model.onnx", "format": "onnx", "requires": {}, "session": "session.json",
                    "toolchain": {"onnxruntime": "1.32.0"},
                    "validation": {"atol": 0.0001, "max_abs_diff": 1.9e-06, "rtol": 0.001, "status": "passed"}},
    "tvm": {"backend": "tvm", "details": {"target": {"kind": "llvm", "mcpu": "neoverse-v1"}, "tuning_trials": 0},
            "entry": "tvm_entry.json", "format": "tvm-relax-vm",
            "requires": {"cpu_flags": ["fp", "asimd", "sve"], "machine": "aarch64"},
            "toolchain": {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"},
            "validation": {"reason": "cross-compiled for aarch64; run it on a cpu-aarch64-neoverse-v1 machine",
                           "status": "not-run"}},
    "openvino": {"backend": "openvino", "config": "ov_config.json", "entry": "model.xml", "format": "openvino-ir",
                 "details": {"compress_to_fp16": False, "device": "CPU", "qdq_nodes": 0}, "requires": {},
                 "toolchain": {"openvino": "2026.4.1"},
                 "validation": {"atol": 0.4, "max_abs_diff": 0.01, "rtol": 0.001, "status": "passed",
                                "reason": "int8 build: atol 0.05 x max|reference| (8)"}},
    "tensorrt": {"backend": "tensorrt", "entry": "engine_entry.py", "plan": "engine_plan.json",
                 "format": "tensorrt-plan", "details": {"compiled": "on-device", "engine": "tensorrt"},
                 "requires": {}, "toolchain": {"tensorrt": "absent"},
                 "validation": {"reason": "no NVIDIA GPU here", "status": "not-run"}},
}


@pytest.mark.parametrize("backend", sorted(_BACKENDS))
def test_an_artifact_json_of_todays_shape_is_a_build_meta(backend: str) -> None:
    from mlopt.core.artifact import BuildMeta, dump

    data = {**_TODAY, **_BACKENDS[backend]}
    meta = BuildMeta.model_validate(data)
    assert meta.backend == backend and meta.validation.status == data["validation"]["status"]
    assert meta.size_bytes == 245073 and meta.signature[0].shape == ["batch", 1, 8, 8]
    assert dump(meta) == data  # written back, it is the same document: no key added, none lost


def test_a_build_meta_refuses_a_key_no_backend_writes() -> None:
    from pydantic import ValidationError

    from mlopt.core.artifact import BuildMeta

    with pytest.raises(ValidationError, match="surprise"):
        BuildMeta.model_validate({**_TODAY, **_BACKENDS["onnxruntime"], "surprise": 1})


def test_put_writes_a_build_info_as_the_same_artifact_json(tmp_path: Path) -> None:
    """What the compiler hands the store is typed; the artifact.json and its reading are as before."""
    from mlopt.core.artifact import BuildInfo

    store = Store(tmp_path)
    info = {k: v for k, v in {**_TODAY, **_BACKENDS["tvm"]}.items()
            if k not in ("key", "files", "content_digest", "created")}
    with store.staging() as tmp:
        files = tmp / "a"
        files.mkdir()
        (files / "tvm_entry.json").write_text("{}")
        art = store.put("t" * 64, files, BuildInfo.model_validate(info))
    assert {k: v for k, v in art.meta.items() if k not in ("key", "files", "content_digest", "created")} == info
    assert store.checked("t" * 64).build.validation.reason.startswith("cross-compiled")
