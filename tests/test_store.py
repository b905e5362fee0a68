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
