"""Bad input: a one-line message, a distinct exit code, nothing written to the store."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from conftest import digits_recipe, tiny_onnx
from mlopt.cli import app

runner = CliRunner()


def _compile(*args: str) -> object:
    return runner.invoke(app, ["compile", *args])


def _store_empty(store: Path) -> bool:
    return not (store / "objects").exists() or not any((store / "objects").iterdir())


def _onnx_args(model: Path, tmp: Path, *extra: str) -> list[str]:
    return [str(model), "--store", str(tmp / "store"), "--out", str(tmp / "out"), "--runs", "3",
            "--warmup", "0", "--batch-sizes", "1", *extra]


def test_missing_model_file(tmp_path: Path) -> None:
    res = _compile(*_onnx_args(tmp_path / "nope.onnx", tmp_path))
    assert res.exit_code == 2 and "does not exist" in res.output
    assert _store_empty(tmp_path / "store")


def test_truncated_onnx(tmp_path: Path) -> None:
    good = tiny_onnx(tmp_path / "good.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    res = _compile(*_onnx_args(bad, tmp_path))
    assert res.exit_code == 2 and "not a valid ONNX model" in res.output
    assert _store_empty(tmp_path / "store")


def test_wrong_signature(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    res = _compile(*_onnx_args(model, tmp_path, "--input", "x:batchx5"))
    assert res.exit_code == 2 and "input 'x'" in res.output
    res = _compile(*_onnx_args(model, tmp_path, "--input", "pixels:batchx4"))
    assert res.exit_code == 2 and "does not match" in res.output
    assert _store_empty(tmp_path / "store")


def test_unknown_sku(tmp_path: Path) -> None:
    res = _compile(*_onnx_args(tiny_onnx(tmp_path / "m.onnx"), tmp_path, "--target", "tpu-v9"))
    assert res.exit_code == 2 and "unknown SKU 'tpu-v9'" in res.output and "cpu-x86-64-v4" in res.output
    assert _store_empty(tmp_path / "store")


def test_unknown_pass(tmp_path: Path) -> None:
    res = _compile(*_onnx_args(tiny_onnx(tmp_path / "m.onnx"), tmp_path, "--pass", "shrink"))
    assert res.exit_code == 2 and "graph-optimize" in res.output
    assert _store_empty(tmp_path / "store")


def test_unknown_backend(tmp_path: Path) -> None:
    res = _compile(*_onnx_args(tiny_onnx(tmp_path / "m.onnx"), tmp_path, "--backend", "tensorrtx"))
    assert res.exit_code == 2 and "unknown backend" in res.output


def test_recipe_typo(tmp_path: Path) -> None:
    recipe = digits_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("targets:", "target:"))
    res = _compile(str(recipe))
    assert res.exit_code == 2 and "unknown field 'target'" in res.output and "targets" in res.output
    assert _store_empty(tmp_path / "store")


def test_not_writable_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = _compile(*_onnx_args(tiny_onnx(tmp_path / "m.onnx"), tmp_path)[:1], "--store", str(blocker / "store"))
    assert res.exit_code == 2 and "not writable" in res.output


def test_bad_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(pickle.dumps({"w": Evil()}))
    recipe = digits_recipe(tmp_path)
    text = recipe.read_text().replace("model:\n", f"model:\n  checkpoint: {ckpt}\n", 1)
    recipe.write_text(text)
    res = _compile(str(recipe))
    assert res.exit_code == 2 and "cannot be loaded safely" in res.output
    assert not marker.exists()


def test_unsupported_operator_in_backend(tmp_path: Path) -> None:
    """An op TVM's ONNX frontend lacks fails the TVM candidate; restricted to TVM the build exits 4."""
    model = tiny_onnx(tmp_path / "m.onnx", op="Celu")
    res = _compile(*_onnx_args(model, tmp_path, "--backend", "tvm", "--target", "host"))
    assert res.exit_code == 4, res.output
    assert "tvm" in res.output and "Celu" in res.output
    assert _store_empty(tmp_path / "store")


def test_traceback_only_with_debug(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compile", str(tmp_path / "nope.onnx")])
    assert "Traceback" not in res.output and res.output.count("\n") <= 3
