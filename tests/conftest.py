"""Shared fixtures: small models built in code, a fast benchmark plan, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FAST_BENCH = {"batch_sizes": [1, 4], "warmup": 1, "runs": 5, "max_seconds": 2.0, "threads": 1}


def host_sku_name() -> str:
    """The SKU the target 'host' is on this machine (MLOPT_CPU_FLAGS included): tests never assume one."""
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.detect import host_sku

    return host_sku(load_catalog()).name


HOST = host_sku_name()
X86_V4 = "cpu-x86-64-v4"
ARM = "cpu-aarch64-neoverse-v1"
# A SKU of this machine's kind that this machine does not run under MLOPT_CPU_FLAGS=x86-64-v2
# (the documented override): the refusal path is tested on every x86-64 machine.
BELOW_V3 = "x86-64-v2"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def digits_recipe(tmp: Path, **changes) -> Path:
    """The digits example recipe, copied with a fast benchmark plan and folders under ``tmp``."""
    data = yaml.safe_load((EXAMPLES / "digits" / "recipe.yaml").read_text())
    data["model"]["source"] = str(EXAMPLES / "digits" / "model.py:trained")
    for k in ("calibration", "evaluation"):
        src = data["data"][k]["source"]
        data["data"][k]["source"] = str(EXAMPLES / "digits" / src)
    data["benchmark"] = dict(FAST_BENCH)
    data["output"] = str(tmp / "out")
    data["store"] = str(tmp / "store")
    data.update(changes)
    return write_recipe(tmp / "recipe.yaml", data)


def tiny_onnx(path: Path, batch: str | int = "batch", op: str = "Relu", seed: int = 0) -> Path:
    """x[batch,4] -> MatMul(W) + b -> op -> y, built with onnx.helper (no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
             helper.make_node(op, ["a"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real compile of the digits example (ONNX Runtime + TVM, x86 and aarch64), shared by tests."""
    from typer.testing import CliRunner

    from mlopt.cli import app

    tmp = tmp_path_factory.mktemp("digits")
    recipe = digits_recipe(tmp)
    result = CliRunner().invoke(app, ["compile", str(recipe)])
    return {"tmp": tmp, "recipe": recipe, "result": result, "store": tmp / "store", "out": tmp / "out"}


@pytest.fixture(autouse=True)
def _no_user_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never touch the user's ~/.cache store."""
    monkeypatch.setenv("MLOPT_STORE", str(tmp_path / "default-store"))


def triton_python_model(model_py: Path, monkeypatch: pytest.MonkeyPatch, module_name: str = "triton_model"):
    """The ``TritonPythonModel`` of a repository's ``model.py``, loaded with a minimal stand-in for the
    ``triton_python_backend_utils`` module Triton injects (requests are dicts of arrays)."""
    import importlib.util
    import sys
    import types

    pb = types.ModuleType("triton_python_backend_utils")
    pb.get_input_tensor_by_name = lambda req, name: types.SimpleNamespace(as_numpy=lambda: req[name])
    pb.Tensor = lambda name, value: (name, value)
    pb.InferenceResponse = lambda output_tensors: dict(output_tensors)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.syspath_prepend(str(model_py.parent))
    spec = importlib.util.spec_from_file_location(module_name, model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()
