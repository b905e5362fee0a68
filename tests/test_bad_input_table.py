"""Issue 14: each kind of bad input exits with its own code and one short line, never a traceback,
and leaves nothing in the store. One row per case; each builds its input in ``tmp_path``."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
from typer.testing import CliRunner

from conftest import tiny_onnx, write_recipe
from mlopt.cli import app

runner = CliRunner()
FAST = ["--target", "host", "--backend", "onnxruntime", "--batch-sizes", "1", "--runs", "3", "--warmup", "0"]


def _onnx(tmp: Path, opset: int = 17, domain: str = "") -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu" if not domain else "Frobnicate", ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path = tmp / "m.onnx"
    onnx.save(model, str(path))
    return path


def _torch(tmp: Path, body: str) -> str:
    (tmp / "net.py").write_text("import torch\n\n" + body)
    return f"{tmp / 'net.py'}:make"


NET = ("class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
       "        self.l = torch.nn.Linear(4, 3)\n    def forward(self, x):\n        return {ret}\n\n"
       "def make():\n    return Net()\n")


def _data_file(tmp: Path, body: str) -> str:
    (tmp / "data.py").write_text("import numpy as np\n\n" + body)
    return str(tmp / "data.py")


GOOD_DATA = ("def batches():\n    rng = np.random.default_rng(0)\n    for _ in range(2):\n"
             "        yield {'x': rng.standard_normal((4, 4)).astype('float32'), 'labels': np.zeros(4, 'int64')}\n")


def _eval(tmp: Path, data_body: str, metric: str = "top1-agreement", fn: str = "batches") -> list[str]:
    src = _data_file(tmp, data_body)
    return [str(tiny_onnx(tmp / "m.onnx")), "--eval-data", f"{src}:{fn}", "--metric",
            metric if ":" in metric or metric in ("accuracy", "top1-agreement") else f"{src}:{metric}"]


def _eval_npz(tmp: Path) -> list[str]:
    import numpy as np

    x = np.zeros((4, 4), np.float32)
    x[2, 1] = np.nan
    np.savez(tmp / "eval.npz", x=x)
    return [str(tiny_onnx(tmp / "m.onnx")), "--eval-data", str(tmp / "eval.npz")]


def _calib(tmp: Path, data_body: str) -> list[str]:
    return [str(tiny_onnx(tmp / "m.onnx")), "--calib-data", f"{_data_file(tmp, data_body)}:batches",
            "--pass", "quantize"]


def _recipe_bytes(tmp: Path, data: bytes) -> list[str]:
    (tmp / "r.yaml").write_bytes(data)
    return [str(tmp / "r.yaml")]


def _recipe_huge_batch(tmp: Path) -> list[str]:
    write_recipe(tmp / "r.yaml", {"schema_version": 1, "name": "huge", "model": {"source": str(tiny_onnx(tmp / "m.onnx"))},
                                  "targets": ["host"], "backends": ["onnxruntime"],
                                  "benchmark": {"batch_sizes": [100000000000], "runs": 3, "warmup": 0}})
    return [str(tmp / "r.yaml")]


def _checkpoint_wrong_keys(tmp: Path) -> list[str]:
    import torch

    torch.save({"not.a.layer": torch.zeros(3)}, tmp / "w.pt")
    body = NET.format(ret="self.l(x)").replace(
        "def make():\n    return Net()\n",
        f"def make():\n    net = Net()\n    net.load_state_dict(torch.load({str(tmp / 'w.pt')!r}))\n    return net\n")
    return [_torch(tmp, body), "--input", "x:batchx4"]


def _two_dynamic_axes(tmp: Path) -> list[str]:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp / "seq.onnx"))
    return [str(tmp / "seq.onnx")]


def _store_index(tmp: Path, text: str) -> list[str]:
    (tmp / "store").mkdir()
    (tmp / "store" / "index.json").write_text(text)
    return [str(tiny_onnx(tmp / "m.onnx"))]


def _recipe(tmp: Path, data: dict) -> list[str]:
    write_recipe(tmp / "r.yaml", {"name": "r", "model": {"source": str(tiny_onnx(tmp / "m.onnx")),
                                                          "inputs": [{"name": "x", "shape": ["batch", 4]}]}, **data})
    return [str(tmp / "r.yaml")]


# (id, argv builder, expected exit code, a phrase the output must contain)
COMPILE_CASES: list[tuple[str, Callable[[Path], list[str]], int, str]] = [
    ("onnx-opset-99", lambda t: [str(_onnx(t, opset=99))], 2, "opset"),
    ("onnx-unknown-domain", lambda t: [str(_onnx(t, domain="com.example"))], 2, "com.example"),
    ("torch-factory-raises", lambda t: [_torch(t, "def make():\n    raise RuntimeError('no weights here')\n"),
                                        "--input", "x:batchx4"], 2, "no weights here"),
    ("torch-forward-none", lambda t: [_torch(t, NET.format(ret="None")), "--input", "x:batchx4"], 2, "None"),
    ("torch-int64-input", lambda t: [_torch(t, NET.format(ret="self.l(x)")), "--input", "x:batchx4:int64"], 2, "int64"),
    ("recipe-binary", lambda t: _recipe_bytes(t, bytes(range(256)) * 4), 2, "UTF-8"),
    ("recipe-latin1", lambda t: _recipe_bytes(t, "name: caf\xe9\n".encode("latin-1")), 2, "UTF-8"),
    ("recipe-not-mapping", lambda t: _recipe_bytes(t, b"- just\n- a list\n"), 2, "mapping"),
    ("data-raises-midway", lambda t: _eval(t, "def batches():\n    yield {'x': np.zeros((4, 4), 'float32')}\n"
                                              "    raise OSError('disk went away')\n"), 2, "disk went away"),
    ("data-returns-none", lambda t: _eval(t, "def batches():\n    return None\n"), 2, "None"),
    ("data-yields-strings", lambda t: _eval(t, "def batches():\n    yield 'x'\n"), 2, "str"),
    ("data-strings-in-arrays", lambda t: _eval(t, "def batches():\n    yield {'x': [['a'] * 4] * 4}\n"), 2, "x"),
    ("data-labels-wrong-length", lambda t: _eval(t, "def batches():\n    yield {'x': np.zeros((4, 4), 'float32'), "
                                                    "'labels': np.zeros(3, 'int64')}\n", "accuracy"), 2, "labels"),
    ("metric-raises", lambda t: _eval(t, GOOD_DATA + "\ndef m(o, l):\n    raise ValueError('bad metric')\n", "m"),
     2, "bad metric"),
    ("metric-returns-string", lambda t: _eval(t, GOOD_DATA + "\ndef m(o, l):\n    return 'high'\n", "m"), 2, "str"),
    ("metric-returns-nan", lambda t: _eval(t, GOOD_DATA + "\ndef m(o, l):\n    return float('nan')\n", "m"),
     3, "metric returned NaN"),
    ("eval-data-nan", lambda t: _eval(t, "def batches():\n    yield {'x': np.full((4, 4), np.nan, 'float32')}\n"),
     2, "bad data"),
    ("calib-data-inf", lambda t: _calib(t, "def batches():\n    yield {'x': np.full((4, 4), np.inf, 'float32')}\n"),
     2, "bad data"),
    ("eval-npz-nan", lambda t: _eval_npz(t), 2, "bad data"),
    ("batch-size-too-big", _recipe_huge_batch, 2, "memory"),
    ("torch-checkpoint-wrong-keys", _checkpoint_wrong_keys, 2, "state_dict"),
    ("extra-dynamic-axis-without-dims", _two_dynamic_axes, 2, "benchmark.dims"),
    ("store-index-wrong-shape", lambda t: _store_index(t, "[1, 2, 3]"), 2, "not an mlopt store index"),
    ("store-index-not-json", lambda t: _store_index(t, "{models"), 2, "corrupt"),
    ("onnx-garbage-bytes", lambda t: [str((t / "g.onnx").write_bytes(b"\x08\x01garbage") and t / "g.onnx")], 2, "onnx"),
    ("onnx-missing-file", lambda t: [str(t / "absent.onnx")], 2, "absent.onnx"),
    ("input-name-not-in-graph", lambda t: [str(tiny_onnx(t / "m.onnx")), "--input", "nope:batchx4"], 2, "nope"),
    ("unknown-target", lambda t: [str(tiny_onnx(t / "m.onnx")), "--target", "h1000"], 2, "h1000"),
    ("unknown-backend", lambda t: _recipe(t, {"backends": ["tensorflow"]}), 2, "tensorflow"),
    ("unknown-pass", lambda t: _recipe(t, {"passes": [{"kind": "sparsify"}]}), 2, "sparsify"),
    ("recipe-unknown-key", lambda t: _recipe(t, {"benchmarks": {}}), 2, "benchmarks"),
    ("batch-size-zero", lambda t: _recipe(t, {"benchmark": {"batch_sizes": [0]}}), 2, "batch"),
    ("name-path-traversal", lambda t: _recipe(t, {"model": {"source": str(tiny_onnx(t / "m.onnx")), "name": "../x",
                                                            "inputs": [{"name": "x", "shape": ["batch", 4]}]}}),
     2, "name"),
]


def _check(res: object, code: int, phrase: str, store: Path) -> None:
    out = res.output  # type: ignore[attr-defined]
    assert res.exit_code == code, out  # type: ignore[attr-defined]
    # progress lines ("[stage] ingest") come first; the failure itself is at most 3 lines
    lines = out.strip().splitlines()
    tail = lines[next((k for k, l in enumerate(lines) if l.startswith(("error:", "interrupted"))), 0):]
    assert "Traceback" not in out and 0 < len(tail) <= 3, out
    assert phrase.lower() in out.lower(), out
    assert not (store / "objects").exists() or not any((store / "objects").iterdir())


@pytest.mark.parametrize("case,argv,code,phrase", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_bad_input(tmp_path: Path, case: str, argv: Callable[[Path], list[str]], code: int, phrase: str) -> None:
    args = argv(tmp_path)
    common = ["--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    res = runner.invoke(app, ["compile", *args, *common, *([] if args[0].endswith(".yaml") else FAST)])
    _check(res, code, phrase, tmp_path / "store")


def _garbage(tmp: Path) -> Path:
    (tmp / "g.json").write_bytes(b"\x00\xff garbage")
    return tmp / "g.json"


READERS = [
    ("manifest-show", lambda p, t: ["manifest", "show", str(p)]),
    ("image-build", lambda p, t: ["image", "build", str(p), "--out", str(t / "img")]),
    ("export-triton", lambda p, t: ["export", "triton", str(p), "--out", str(t / "tr")]),
]


@pytest.mark.parametrize("kind", ["garbage", "folder"])
@pytest.mark.parametrize("name,argv", READERS, ids=[r[0] for r in READERS])
def test_manifest_readers_refuse_bad_files(tmp_path: Path, name: str, argv: Callable, kind: str) -> None:
    path = _garbage(tmp_path) if kind == "garbage" else tmp_path
    res = runner.invoke(app, argv(path, tmp_path))
    _check(res, 2, "manifest", tmp_path / "store")


def test_ctrl_c_exits_130(tmp_path: Path) -> None:
    with mock.patch("mlopt.compiler.ingest.read_onnx", side_effect=KeyboardInterrupt):
        res = runner.invoke(app, ["compile", str(tiny_onnx(tmp_path / "m.onnx")), "--store", str(tmp_path / "store"),
                                  "--out", str(tmp_path / "out"), *FAST])
    _check(res, 130, "interrupted", tmp_path / "store")


def test_disk_full_names_path_and_free_space(tmp_path: Path) -> None:
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "store" / "x"))
    with mock.patch("mlopt.compiler.ingest.read_onnx", side_effect=full):
        res = runner.invoke(app, ["compile", str(tiny_onnx(tmp_path / "m.onnx")), "--store", str(tmp_path / "store"),
                                  "--out", str(tmp_path / "out"), *FAST])
    _check(res, 2, "free", tmp_path / "store")
    assert str(tmp_path / "store") in res.output.replace("\n", "")


def _disk_full(tmp: Path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(tmp / "store" / "tmp" / "model.onnx"))


@pytest.mark.parametrize("where", ["mlopt.targets.ort.OrtBackend.build", "mlopt.store.Store._check_writable"])
def test_disk_full_in_a_build_or_the_store_stops_with_exit_2(tmp_path: Path, where: str) -> None:
    with mock.patch(where, side_effect=_disk_full(tmp_path)):
        res = runner.invoke(app, ["compile", str(tiny_onnx(tmp_path / "m.onnx")), "--store", str(tmp_path / "store"),
                                  "--out", str(tmp_path / "out"), *FAST])
    _check(res, 2, "MiB free", tmp_path / "store")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_bytes(b"\xff\xfe")
    res = runner.invoke(app, ["--debug", "compile", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and "Traceback" in res.output


def test_onnx_runtime_errors_are_summarised_to_their_cause() -> None:
    from mlopt.targets.ort import ort_cause

    raw = ("[ONNXRuntimeError] : 1 : FAIL : Load model from /tmp/x/m.onnx failed:/onnxruntime_src/onnxruntime/core/"
           "graph/model_load_utils.h:46 void onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::"
           "unordered_map<std::string, int>&, bool) ONNX Runtime only *guarantees* support for models stamped with "
           "official released onnx opset versions. Opset 99 is under development")
    assert ort_cause(Exception(raw)).startswith("ONNX Runtime only *guarantees*")
    raw = ("[ONNXRuntimeError] : 1 : FAIL : Load model from /tmp/x/m.onnx failed:Fatal error: "
           "com.example:Frobnicate(-1) is not a registered function/op")
    assert ort_cause(Exception(raw)) == "com.example:Frobnicate(-1) is not a registered function/op"
