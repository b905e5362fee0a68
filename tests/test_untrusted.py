"""Nothing untrusted runs: a .pt2 with a code-running pickle, or a garbage .pt2, exits 2 before torch loads it."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlopt.cli import app
from mlopt.compiler import pt2_safety
from mlopt.core.errors import ModelLoadError

runner = CliRunner()


def _real_pt2(path: Path) -> Path:
    """A small program saved by torch.export.save: raw weights and constants, a pickled sample input."""
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.relu(self.proj(x))

    torch.export.save(torch.export.export(M().eval(), (torch.randn(2, 4),)), str(path))
    return path


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a zip archive, letting ``change(name, data)`` return new bytes for a member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, change(name, zin.read(name)))
    return dst


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil())


def _evil_weight(name: str, data: bytes, marker: Path) -> bytes:
    """Mark the first weight as pickled and make its payload a code-running pickle."""
    if name.endswith("_weights_config.json"):
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()
    if name.endswith("/data/weights/weight_0"):
        return _evil_pickle(marker)
    return data


def _compile(model: Path, tmp: Path) -> object:
    return runner.invoke(app, ["compile", str(model), "--input", "x:batchx4", "--store", str(tmp / "store"),
                               "--out", str(tmp / "out"), "--runs", "3", "--warmup", "0", "--batch-sizes", "1"])


def test_real_pt2_passes_the_check(tmp_path: Path) -> None:
    pt2_safety.check_pt2(_real_pt2(tmp_path / "m.pt2"))


def test_pickled_weight_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _rewrite(_real_pt2(tmp_path / "m.pt2"), tmp_path / "evil.pt2", lambda n, d: _evil_weight(n, d, marker))
    res = _compile(evil, tmp_path)
    assert res.exit_code == 2, res.output
    assert "weights/weight_0" in res.output and "io.open" in res.output and "Traceback" not in res.output
    assert not marker.exists()


def test_sample_inputs_that_run_code_are_refused(tmp_path: Path) -> None:
    """torch retries sample inputs with weights_only=False, so they are scanned too (inside their torch.save zip)."""
    marker = tmp_path / "pwned"

    def change(name: str, data: bytes) -> bytes:
        if "/sample_inputs/" not in name:
            return data
        buf = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(buf, "w") as zout:
            for inner in zin.namelist():
                zout.writestr(inner, _evil_pickle(marker) if inner.endswith("data.pkl") else zin.read(inner))
        return buf.getvalue()

    evil = _rewrite(_real_pt2(tmp_path / "m.pt2"), tmp_path / "evil.pt2", change)
    res = _compile(evil, tmp_path)
    assert res.exit_code == 2 and "data.pkl" in res.output and "io.open" in res.output, res.output
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_garbage_or_truncated_pt2_is_one_line(tmp_path: Path, cut: float) -> None:
    good = _real_pt2(tmp_path / "m.pt2").read_bytes()
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(good[: int(len(good) * cut)])
    res = _compile(bad, tmp_path)
    assert res.exit_code == 2 and "not a readable .pt2 archive" in res.output, res.output
    assert "Traceback" not in res.output and res.output.strip().count("\n") <= 2


def test_not_a_zip_at_all(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"hello, not a model\n")
    with pytest.raises(ModelLoadError, match="not a readable .pt2 archive"):
        pt2_safety.check_pt2(bad)


def test_aotinductor_code_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "aoti.pt2"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/archive_format", "pt2")
        z.writestr("m/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelLoadError, match="AOTInductor compiled code"):
        pt2_safety.check_pt2(archive)


@pytest.mark.parametrize("payload, offender", [
    (pickle.dumps(print, protocol=2), "builtins.print"),          # GLOBAL with Python 2 names mapped
    (pickle.dumps(print, protocol=4), "builtins.print"),          # STACK_GLOBAL from memoized strings
    (b"(cos\nsystem\nS'true'\ntR.", "os.system"),                  # protocol 0, a REDUCE after the call
    (b"(ios\nsystem\nS'true'\no.", "os.system"),                   # INST
])
def test_scan_names_the_offending_global(payload: bytes, offender: str) -> None:
    with pytest.raises(ModelLoadError, match=offender):
        pt2_safety.scan_pickles(payload, "m.pt2:x")


def test_stack_global_from_an_unreadable_stack_is_refused() -> None:
    # 'os' 'system' then a POP: the two strings are not what STACK_GLOBAL takes, so refuse rather than guess
    payload = b"\x80\x04\x8c\x02os\x8c\x06system\x8c\x01x0\x93."
    with pytest.raises(ModelLoadError, match="cannot read"):
        pt2_safety.scan_pickles(payload, "m.pt2:x")


def test_plain_tensor_pickles_pass() -> None:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"w": torch.nn.Parameter(torch.ones(2)), "s": torch.Size([2]), "d": torch.float16,
                "layout": torch.strided, "set": {1}, "b": b"x"}, buf)
    pt2_safety.check_payload(buf.getvalue(), "m.pt2:x")
    pt2_safety.scan_pickles(pickle.dumps({"a": [1, 2.0, "s", (None, True)]}, protocol=5), "m.pt2:x")


# ---------------------------------------------------------------- names that become paths


def test_traversal_model_name_flag_exits_2_at_recipe_load(tmp_path: Path) -> None:
    from conftest import tiny_onnx

    model = tiny_onnx(tmp_path / "m.onnx")
    for name in ("../../x", "../../x y", "..", "a/b"):
        res = runner.invoke(app, ["compile", str(model), "--name", name, "--dry-run"])
        assert res.exit_code == 2 and "model.name" in res.output, (name, res.output)


def test_traversal_model_name_in_recipe_exits_2(tmp_path: Path) -> None:
    import yaml

    from conftest import digits_recipe

    recipe = digits_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["model"]["name"] = "../evil"
    recipe.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["compile", str(recipe), "--dry-run"])
    assert res.exit_code == 2 and "model.name '../evil'" in res.output, res.output
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("name, ok", [("resnet50-v1.5_int8", True), ("..", False), (".", False), ("../x", False),
                                      (".hidden", False), ("a" * 128, True), ("a" * 129, False), ("a b", False)])
def test_one_name_rule(name: str, ok: bool) -> None:
    from mlopt.core.util import is_safe_name

    assert is_safe_name(name) is ok


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "a" * 129])
def test_catalog_sku_names_follow_the_rule(name: str) -> None:
    from pydantic import ValidationError

    from mlopt.targets.catalog import SKU

    def name_errors(value: str, aliases: list[str]) -> list:
        try:
            SKU(name=value, aliases=aliases, vendor="generic", kind="cpu", arch="x86-64-v3")
        except ValidationError as e:
            return [err for err in e.errors() if err["loc"][0] in ("name", "aliases")]
        return []

    assert name_errors("cpu-ok", ["alias-ok"]) == []
    assert name_errors(name, []) and name_errors("cpu-ok", [name])


def test_inside_keeps_paths_in_their_folder(tmp_path: Path) -> None:
    from mlopt.core.errors import BadInput
    from mlopt.core.util import inside

    out = tmp_path / "out"
    out.mkdir()
    assert inside(out, "sku", "model", "1") == (out / "sku" / "model" / "1").resolve()
    for parts in [("..", "x"), ("../../etc/evil",), ("/etc/passwd",), ("a", "..", "..", "b")]:
        with pytest.raises(BadInput, match="outside"):
            inside(out, *parts)
    (out / "link").symlink_to(tmp_path)  # a symlink out of the folder does not get around it
    with pytest.raises(BadInput, match="outside"):
        inside(out, "link", "x")
