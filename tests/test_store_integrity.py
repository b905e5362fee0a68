"""The store never uses damaged bytes: cached steps and artifacts carry digests, are checked on every
read, and a damaged entry is removed and made again (with a log line) or reported by verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlopt.core.errors import StoreError
from mlopt.store import STEP_FILES, STEP_META, Store


def _store(tmp_path: Path) -> tuple[Store, list[str]]:
    logged: list[str] = []
    return Store(tmp_path / "store", log=logged.append), logged


def _step(store: Store, calls: list[int]) -> tuple[Path, dict, bool]:
    def produce(work: Path) -> dict:
        calls.append(1)
        (work / "model.onnx").write_bytes(b"weights" * 100)
        return {"digest": "abc", "n": len(calls)}
    return store.cached_step("pass", "k" * 64, produce)


def test_cached_step_records_digests_and_replays(tmp_path: Path) -> None:
    store, logged = _store(tmp_path)
    calls: list[int] = []
    folder, meta, hit = _step(store, calls)
    assert not hit and meta == {"digest": "abc", "n": 1}
    recorded = json.loads((folder / STEP_FILES).read_text())
    assert set(recorded) == {"model.onnx", STEP_META}
    assert _step(store, calls)[1:] == (meta, True) and len(calls) == 1 and logged == []
    assert store.verify_step(folder) == []


@pytest.mark.parametrize("damage", ["flip-byte", "truncate-meta", "remove-file", "extra-file", "remove-record"])
def test_damaged_cached_step_is_made_again_and_logged(tmp_path: Path, damage: str) -> None:
    store, logged = _store(tmp_path)
    calls: list[int] = []
    folder, _, _ = _step(store, calls)
    model = folder / "model.onnx"
    if damage == "flip-byte":
        data = bytearray(model.read_bytes())
        data[10] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "truncate-meta":
        (folder / STEP_META).write_text('{"digest": "ab')
    elif damage == "remove-file":
        model.unlink()
    elif damage == "extra-file":
        (folder / "planted.py").write_text("import os")
    else:
        (folder / STEP_FILES).unlink()
    assert store.verify_step(folder) != []
    folder2, meta, hit = _step(store, calls)
    assert not hit and meta["n"] == 2 and len(calls) == 2  # made again, not used
    assert store.verify_step(folder2) == [] and model.read_bytes() == b"weights" * 100
    assert len(logged) == 1 and "is damaged" in logged[0] and "making it again" in logged[0]


def test_gc_damaged_removes_damaged_steps_only(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    good = store.cached_step("measure", "g" * 64, lambda w: {"ok": 1})[0]
    bad = store.cached_step("pass", "b" * 64, lambda w: (w / "x.bin").write_bytes(b"1") and {"ok": 2})[0]
    (bad / "x.bin").write_bytes(b"2")
    assert store.gc()["steps"] == 0 and bad.exists()  # plain gc leaves the cache alone
    removed = store.gc(damaged=True)
    assert removed["steps"] == 1 and not bad.exists() and good.exists()


def _put(store: Store, key: str, payload: bytes) -> None:
    with store.staging() as tmp:
        files = tmp / "a"
        files.mkdir()
        (files / "model.bin").write_bytes(payload)
        store.put(key, files, {"sku": "s", "backend": "b", "precision": "float32"})


def test_damaged_artifact_is_removed_for_a_rebuild_not_reused(tmp_path: Path) -> None:
    store, logged = _store(tmp_path)
    key = "a" * 64
    _put(store, key, b"good")
    assert store.reusable(key) is not None and logged == []
    (store.root / "objects" / key / "model.bin").write_bytes(b"evil")
    assert store.reusable(key) is None  # the caller builds it again under the same key
    assert not (store.root / "objects" / key).exists()
    assert "artifact aaaaaaaaaaaa is damaged" in logged[0] and "building it again" in logged[0]
    _put(store, key, b"good")
    assert store.verify(store.get(key)) == []


def test_truncated_artifact_json_is_reported_not_a_crash(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    _put(store, "c" * 64, b"x")
    (store.root / "objects" / ("c" * 64) / "artifact.json").write_text('{"files": {')
    arts = store.artifacts()
    assert [a.key for a in arts] == ["c" * 64]
    assert store.verify(arts[0]) == ["artifact.json: unreadable (JSONDecodeError)"]
    with pytest.raises(StoreError, match="damaged"):
        store.checked("c" * 64)
    assert store.reusable("c" * 64) is None


def test_existing_store_must_exist_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StoreError, match="does not exist") as e:
        Store.existing(missing)
    assert e.value.exit_code == 2 and not missing.exists()
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not an mlopt store"):
        Store.existing(tmp_path / "plain")
    Store(tmp_path / "real")
    assert Store.existing(tmp_path / "real").root == (tmp_path / "real").absolute()


HOLDER = """
import sys, time
from mlopt.store import Store
store = Store(sys.argv[1])
with store.holding("m", int(sys.argv[2])):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_version_records_whether_its_compile_finished(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    v1 = store.version_for("m", "v1", {})
    with store.holding("m", v1):
        assert store.models()["m"]["versions"][0]["complete"] is False
    assert store.models()["m"]["versions"][0]["complete"] is True
    v2 = store.version_for("m", "v2", {})
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root), str(v2)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert proc.stdout.readline().strip() == "holding"
        os.kill(proc.pid, signal.SIGKILL)  # a compile killed midway
    finally:
        proc.wait()
    complete = {v["version"]: v["complete"] for v in store.models()["m"]["versions"]}
    assert complete == {v1: True, v2: False}


def test_gc_never_removes_a_version_a_running_compile_holds(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    _put(store, "h" * 64, b"held")
    v = store.version_for("m", "v1", {})
    store.link("m", v, "h" * 64)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root), str(v)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert proc.stdout.readline().strip() == "holding"
        removed = store.gc(keep_last=0)
        assert removed["versions"] == 0 and removed["held"] == 1
        assert store.get("h" * 64) is not None and store.models()["m"]["versions"][0]["version"] == v
    finally:
        proc.kill()
        proc.wait()
    removed = store.gc(keep_last=0)  # released: now it goes
    assert removed["versions"] == 1 and store.get("h" * 64) is None


# ------------------------------------------------------------------ through the real CLI

FAST = ["--target", "host", "--backend", "onnxruntime", "--batch-sizes", "1", "--runs", "3", "--warmup", "0"]


def _compile(tmp_path: Path, store: Path) -> tuple[int, str, dict]:
    from typer.testing import CliRunner

    from conftest import tiny_onnx
    from mlopt.cli import app

    model = tmp_path / "m.onnx"
    if not model.exists():
        tiny_onnx(model)
    res = CliRunner().invoke(app, ["compile", str(model), *FAST, "--store", str(store), "--out", str(tmp_path / "out")])
    return res.exit_code, res.output, json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_manifest_is_strict_json_checked_before_it_is_written(tmp_path: Path) -> None:
    from mlopt.core.errors import MloptError
    from mlopt.manifest import Manifest, write_manifest

    code, out, data = _compile(tmp_path, tmp_path / "store")
    assert code == 0, out
    data["entries"][0]["measurement"]["batches"][0]["p50_ms"] = float("nan")
    target = tmp_path / "nan.json"
    with pytest.raises(MloptError, match=r"non-finite number at entries\.0\.measurement\.batches\.0\.p50_ms"):
        write_manifest(Manifest.model_validate(data), target)
    assert not target.exists()


def test_corrupted_cache_and_artifact_are_rebuilt_by_the_next_compile(tmp_path: Path) -> None:
    store = tmp_path / "store"
    code, out, first = _compile(tmp_path, store)
    assert code == 0, out
    entry = first["entries"][0]
    # one flipped byte in the chosen build and in the cached ingest model
    art = store / "objects" / entry["artifact"]["key"]
    lib = next(p for p in sorted(art.iterdir()) if p.name != "artifact.json" and p.is_file())
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    steps = [p for p in (store / "cache").glob("*/*") if (p / "files.json").is_file()]
    assert steps
    (steps[0] / "meta.json").write_text("{")  # a truncated cached record
    code, out, second = _compile(tmp_path, store)
    assert code == 0, out
    assert "is damaged" in out and "building it again" in out and "making it again" in out
    again = second["entries"][0]
    # the same backend, rebuilt under the same key with the same bytes: never silently another backend
    assert again["chosen_backend"] == entry["chosen_backend"]
    assert again["artifact"]["key"] == entry["artifact"]["key"]
    assert again["artifact"]["content_digest"] == entry["artifact"]["content_digest"]
    st = Store(store)
    assert all(st.verify(a) == [] for a in st.artifacts()) and all(st.verify_step(s) == [] for s in st.steps())


def test_store_commands_refuse_a_store_that_does_not_exist(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlopt.cli import app

    missing = tmp_path / "no" / "such" / "dir"
    for argv in (["artifacts", "verify"], ["artifacts", "list"], ["artifacts", "gc"]):
        res = CliRunner().invoke(app, [*argv, "--store", str(missing)])
        assert res.exit_code == 2 and "does not exist" in res.output, res.output
    assert not missing.exists() and not (tmp_path / "no").exists()


def test_verify_reports_damaged_cached_steps_and_gc_repairs_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlopt.cli import app

    store = tmp_path / "store"
    code, out, _ = _compile(tmp_path, store)
    assert code == 0, out
    args = ["--store", str(store)]
    res = CliRunner().invoke(app, ["artifacts", "verify", *args])
    assert res.exit_code == 0 and "cached steps:" in res.output and ", 0 damaged" in res.output, res.output
    step = Store(store).steps()[0]
    (step / STEP_META).write_text("{")
    res = CliRunner().invoke(app, ["artifacts", "verify", *args])
    assert res.exit_code == 2 and "DAMAGED" in res.output and "cached steps:" in res.output and "1 damaged" in res.output
    res = CliRunner().invoke(app, ["artifacts", "gc", "--damaged", *args])
    assert res.exit_code == 0 and "1 steps" in res.output, res.output
    assert CliRunner().invoke(app, ["artifacts", "verify", *args]).exit_code == 0


def test_a_compile_marks_its_version_complete(tmp_path: Path) -> None:
    code, out, manifest = _compile(tmp_path, tmp_path / "store")
    assert code == 0, out
    versions = Store(tmp_path / "store").models()["m"]["versions"]
    assert [(v["version"], v["complete"]) for v in versions] == [(manifest["models"][0]["version"], True)]
