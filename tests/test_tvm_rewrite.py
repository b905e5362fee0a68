"""LSTM unrolled for TVM: the same numbers as ONNX Runtime's LSTM kernel, then a real TVM build."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import HOST
from mlopt.targets.tvm_rewrite import unroll_lstms


def lstm_model(direction: str = "forward", layout: int = 0, states: bool = False, peep: bool = False,
               clip: float | None = None, seq: int = 5, batch: int = 3, inp: int = 4, hidden: int = 6,
               opset: int = 14) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.standard_normal((dirs, 4 * hidden, inp)).astype("float32") * 0.5, "W"),
             numpy_helper.from_array(rng.standard_normal((dirs, 4 * hidden, hidden)).astype("float32") * 0.5, "R"),
             numpy_helper.from_array(rng.standard_normal((dirs, 8 * hidden)).astype("float32") * 0.1, "B")]
    x_shape = [seq, batch, inp] if layout == 0 else [batch, seq, inp]
    st_shape = [dirs, batch, hidden] if layout == 0 else [batch, dirs, hidden]
    graph_in = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B", "", "", ""]
    if states:
        graph_in += [helper.make_tensor_value_info(n, TensorProto.FLOAT, st_shape) for n in ("h0", "c0")]
        names[5:7] = ["h0", "c0"]
    if peep:
        inits.append(numpy_helper.from_array(rng.standard_normal((dirs, 3 * hidden)).astype("float32") * 0.3, "P"))
        names.append("P")
    attrs = {"hidden_size": hidden, "direction": direction, **({"layout": layout} if layout else {})}
    if clip is not None:
        attrs["clip"] = clip
    node = helper.make_node("LSTM", names, ["Y", "Y_h", "Y_c"], name="lstm", **attrs)
    relu = helper.make_node("Relu", ["Y"], ["out"])
    y_shape = [seq, dirs, batch, hidden] if layout == 0 else [batch, seq, dirs, hidden]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, y_shape),
            *[helper.make_tensor_value_info(n, TensorProto.FLOAT, st_shape) for n in ("Y_h", "Y_c")]]
    g = helper.make_graph([node, relu], "g", graph_in, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    """ONNX Runtime's outputs; its LSTM kernel has no layout 1, for which ONNX's reference evaluator runs."""
    import onnxruntime as ort

    if any(a.name == "layout" and a.i == 1 for n in proto.graph.node if n.op_type == "LSTM" for a in n.attribute):
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(proto).run(None, feed)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def feed_for(proto: onnx.ModelProto) -> dict:
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype("float32")
            for i in proto.graph.input}


@pytest.mark.parametrize("direction,layout,states,peep,clip", [
    *[(d, lay, s, False, None) for d, lay, s in itertools.product(
        ["forward", "reverse", "bidirectional"], [0, 1], [False, True])],
    ("bidirectional", 0, True, True, None), ("forward", 0, False, True, 0.7), ("forward", 1, True, True, None), ("reverse", 0, True, False, 0.5)])
def test_unrolled_lstm_matches_onnx_runtime(direction: str, layout: int, states: bool, peep: bool,
                                            clip: float | None) -> None:
    proto = lstm_model(direction, layout, states, peep, clip)
    unrolled, n = unroll_lstms(proto)
    assert n == 1 and not any(node.op_type == "LSTM" for node in unrolled.graph.node)
    onnx.checker.check_model(unrolled, full_check=True)
    feed = feed_for(proto)
    for want, got in zip(run(proto, feed), run(unrolled, feed)):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weights_fed_as_inputs_are_sliced_in_the_graph() -> None:
    proto = lstm_model("bidirectional", states=True, peep=True)
    for init in list(proto.graph.initializer):  # W, R, B, P become graph inputs, as in ONNX's node tests
        proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    del proto.graph.initializer[:]
    unrolled, n = unroll_lstms(proto)
    assert n == 1
    feed = {**{k: v for k, v in feed_for(proto).items() if k not in weights}, **weights}
    for want, got in zip(run(proto, feed), run(unrolled, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_opset_12_model_gets_attribute_axes() -> None:
    proto = lstm_model("bidirectional", opset=12)
    unrolled, n = unroll_lstms(proto)
    assert n == 1
    onnx.checker.check_model(unrolled, full_check=True)
    feed = feed_for(proto)
    for want, got in zip(run(proto, feed), run(unrolled, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_what_it_cannot_rewrite_stays_an_lstm() -> None:
    proto = lstm_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "seq"  # the sequence length is not fixed
    same, n = unroll_lstms(proto)
    assert n == 0 and [x.op_type for x in same.graph.node] == ["LSTM", "Relu"]
    proto = lstm_model()
    proto.graph.node[0].attribute.append(helper.make_attribute("input_forget", 1))
    assert unroll_lstms(proto)[1] == 0


def test_an_lstm_model_builds_and_runs_with_tvm(tmp_path: Path) -> None:
    """A model with a dynamic batch on axis 1 and an LSTM: TVM builds it (a static library for batch 1), a
    batch of 3 runs in slices cut and joined on each tensor's own batch axis, and its outputs match ONNX
    Runtime's on the original model."""
    from mlopt.compiler.ingest import read_onnx
    from mlopt.targets.backends import BuildRequest
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.tvm import TVMBackend

    proto = lstm_model("bidirectional", seq=4, batch=2, states=True)
    for i in proto.graph.input:  # X [seq, batch, input], states [dirs, batch, hidden]
        i.type.tensor_type.shape.dim[1].dim_param = "batch"
    onnx.save(proto, str(tmp_path / "m.onnx"))
    model = read_onnx(tmp_path / "m.onnx", [], "lstm")
    sku = load_catalog().get(HOST)
    req = BuildRequest(model=model, sku=sku, threads=1, tuning_trials=0, tuning_timeout_s=1, tuning_dir=tmp_path,
                       batch_axis="batch", dims={}, batch_sizes=(1,))
    backend = TVMBackend()
    (tmp_path / "a").mkdir()
    meta = {**backend.build(req, tmp_path / "a"), "requires": backend.requires(sku)}
    runner = backend.load(tmp_path / "a", meta, 1)
    rng = np.random.default_rng(2)
    feed = {"X": rng.standard_normal((4, 3, 4)).astype("float32"),
            "h0": rng.standard_normal((2, 3, 6)).astype("float32"), "c0": rng.standard_normal((2, 3, 6)).astype("float32")}
    got = list(runner(feed).values())
    assert "1 LSTM unrolled over the fixed sequence length" in meta["details"]["shapes"]
    entry = json.loads((tmp_path / "a" / meta["entry"]).read_text())
    assert entry["batch_axes"] == {"X": 1, "h0": 1, "c0": 1}
    assert entry["output_batch_axes"] == {"out": 2, "Y_h": 1, "Y_c": 1}
    for want, have in zip(run(proto, feed), got):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5)
