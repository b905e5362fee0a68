"""Types at the TVM backend's edges, as the ONNX node tests found them: element types and value kinds
mlopt refuses in one line with exit 4 (strings, float8, 4-bit, optionals, sequences), and the ones it
runs with the reference's numerics (an omitted optional input, Shape's int64 output, bfloat16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import HOST
from mlopt.cli import app

runner = CliRunner()


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list | None = None, opset: int = 21) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "t", inputs, outputs, inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _compile(model: Path, tmp: Path) -> object:
    return runner.invoke(app, ["compile", str(model), "--backend", "tvm", "--target", HOST, "--store",
                               str(tmp / "store"), "--out", str(tmp / "out"), "--runs", "2", "--warmup", "0",
                               "--batch-sizes", "1"])


def _one_line_exit_4(res: object, *words: str) -> None:
    assert res.exit_code == 4, res.output
    assert "Traceback" not in res.output and all(w in res.output for w in words), res.output


@pytest.mark.parametrize("elem, text", [("STRING", "tensor(string)"), ("FLOAT8E4M3FN", "tensor(float8e4m3fn)"),
                                        ("INT4", "tensor(int4)"), ("FLOAT4E2M1", "tensor(float4e2m1)")])
def test_an_input_of_an_element_type_mlopt_cannot_feed_is_refused_in_one_line(tmp_path: Path, elem: str,
                                                                              text: str) -> None:
    from onnx import TensorProto, helper

    t = getattr(TensorProto, elem)
    model = _save(tmp_path / "m.onnx", [helper.make_node("Identity", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", t, [2])], [helper.make_tensor_value_info("y", t, [2])])
    _one_line_exit_4(_compile(model, tmp_path), f"input 'x' is {text}", "float32")


def test_optional_and_sequence_inputs_are_refused_in_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    opt = helper.make_tensor_type_proto(TensorProto.FLOAT, [2])
    model = _save(tmp_path / "o.onnx", [helper.make_node("Identity", ["x"], ["y"])],
                  [helper.make_value_info("x", helper.make_optional_type_proto(opt))],
                  [helper.make_value_info("y", helper.make_optional_type_proto(opt))])
    _one_line_exit_4(_compile(model, tmp_path), "input 'x' is optional(tensor(float))")
    seq = _save(tmp_path / "s.onnx", [helper.make_node("SequenceLength", ["x"], ["n"])],
                [helper.make_value_info("x", helper.make_sequence_type_proto(opt))],
                [helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    _one_line_exit_4(_compile(seq, tmp_path / "2"), "input 'x' is seq(tensor(float))")


def test_a_string_output_is_refused_by_the_tvm_backend_in_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from mlopt.core.errors import UnsupportedType
    from mlopt.targets.tvm_onnx import check_outputs

    model = _save(tmp_path / "m.onnx", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                  [helper.make_tensor_value_info("y", TensorProto.STRING, [2])])
    import onnx

    with pytest.raises(UnsupportedType, match=r"output 'y' is tensor\(string\)") as e:
        check_outputs(onnx.load(str(model)))
    assert e.value.exit_code == 4 and "\n" not in str(e.value)


@pytest.fixture
def tvm_backend(monkeypatch: pytest.MonkeyPatch) -> object:
    """The node-test adapter over TVMBackend, compiling in this process."""
    import onnx_node_backend

    monkeypatch.setattr("mlopt.targets.tvm.ISOLATE_CPU_BUILDS", False)
    return onnx_node_backend.backend()


def test_an_omitted_optional_input_shape_output_and_bfloat16_run_with_the_references_numerics(
        tvm_backend: object) -> None:
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    x = np.array([[-2.0, 0.5, 3.0]], np.float32)
    clip = helper.make_graph(  # Clip's min omitted (""), max given as an initializer
        [helper.make_node("Clip", ["x", "", "hi"], ["y"]), helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16)], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [1, 3])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "hi")])
    model = helper.make_model(clip, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    y, s, b = tvm_backend.prepare(model).run([x])
    np.testing.assert_array_equal(y, [[-2.0, 0.5, 1.0]])
    assert s.dtype == np.int64 and s.tolist() == [1, 3]
    assert b.dtype == ml_dtypes.bfloat16 and b.astype(np.float32).tolist() == x.tolist()


def test_a_model_without_inputs_runs(tvm_backend: object) -> None:
    from onnx import TensorProto, helper, numpy_helper

    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph([helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(value))], "t",
                              [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    (y,) = tvm_backend.prepare(model).run([])
    np.testing.assert_array_equal(y, value)
