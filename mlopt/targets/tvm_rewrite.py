"""Rewrites for TVM's ONNX frontend, which has no ``LSTM`` (nor ``If``): ``LSTM`` unrolled into standard operators.

With the sequence length fixed (the static, shape-folded graph ``tvm_onnx.static_onnx`` makes), an
``LSTM`` node is the same arithmetic as one input projection (``MatMul`` over the whole sequence)
and, per time step and direction, a recurrent ``MatMul``, the gate ``Sigmoid``/``Tanh`` and the
cell update (ONNX's LSTM definition: gates in the order i, o, f, c; optional biases, initial
states and peepholes; forward, reverse and bidirectional; ``layout`` 0 and 1; ``clip``). Every
operator it writes is one TVM lowers, so an OCR recogniser or speech model with an LSTM builds.

Not rewritten (the node stays, and the build names it): ``sequence_lens`` that is not a constant
equal to the sequence length, ``input_forget``, and activations other than the defaults. Weights
that are graph inputs rather than constants are sliced in the graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_ACTIVATIONS = ["Sigmoid", "Tanh", "Tanh"]
# operators TVM lacks that mlopt rewrites before TVM's frontend sees them: LSTM here; an If whose condition
# the fixed shapes decide is inlined by ONNX Runtime's constant folding (``tvm_onnx.static_onnx``)
REWRITTEN_OPS = frozenset({"LSTM", "If"})


class _Graph:
    """Accumulates the replacement nodes and constants of one LSTM, with names unique to it."""

    def __init__(self, prefix: str, opset: int):
        self.prefix, self.opset, self.nodes, self.inits, self.count = prefix, opset, [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def const(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out + ":node", **attrs))
        return out

    def unsqueeze(self, x: str, axes: list[int], hint: str) -> str:
        """Unsqueeze, its axes an input from opset 13 and an attribute before."""
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array(axes), "axes")], hint)
        return self.op("Unsqueeze", [x], hint, axes=axes)


def unroll_lstms(proto: Any) -> tuple[Any, int]:
    """``proto`` with every LSTM it can rewrite unrolled (needs static shapes: run shape inference on
    a graph whose dimensions are fixed); returns (model, how many were rewritten)."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    new_nodes, new_inits, done = [], [], 0
    for node in proto.graph.node:
        g = _Graph(node.name or f"lstm{done}", opset)
        if node.op_type == "LSTM" and node.domain in ("", "ai.onnx") and _unroll(node, shapes, consts, g):
            new_nodes.extend(g.nodes)
            new_inits.extend(g.inits)
            done += 1
        else:
            new_nodes.append(node)
    if not done:
        return proto, 0
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    return out, done


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unroll(node: Any, shapes: dict[str, list[int | None]], consts: dict[str, np.ndarray], g: _Graph) -> bool:
    """Write the unrolled form of ``node`` into ``g``; False (nothing written) where it cannot."""
    a = _attrs(node)
    ins = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, seq_lens, h0, c0, p = ins[:8]
    acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
    layout, hidden = int(a.get("layout", 0)), int(a.get("hidden_size", 0))
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = 2 if direction == "bidirectional" else 1
    if g.opset < 11 or a.get("input_forget", 0) or (acts and acts != DEFAULT_ACTIVATIONS * dirs):
        return False
    xs = shapes.get(x)
    if not xs or len(xs) != 3 or any(d is None for d in xs):
        return False
    seq, batch = (xs[0], xs[1]) if layout == 0 else (xs[1], xs[0])
    if seq_lens and not (seq_lens in consts and np.all(consts[seq_lens] == seq)):
        return False
    hidden = hidden or (consts[r].shape[-1] if r in consts else (shapes.get(r) or [None])[-1])
    if not hidden:
        return False
    clip = a.get("clip")
    if layout == 1:  # [batch, seq, input] -> [seq, batch, input]; states [batch, dirs, H] -> [dirs, batch, H]
        x = g.op("Transpose", [x], "x_seq_first", perm=[1, 0, 2])
        h0 = g.op("Transpose", [h0], "h0", perm=[1, 0, 2]) if h0 else ""
        c0 = g.op("Transpose", [c0], "c0", perm=[1, 0, 2]) if c0 else ""
    ys, yh, yc = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        y_d, h_d, c_d = _direction(g, x, consts, w, r, b, p, h0, c0, d, seq, batch, hidden, reverse, clip)
        ys.append(y_d)
        yh.append(h_d)
        yc.append(c_d)
    y = ys[0] if dirs == 1 else g.op("Concat", ys, "y", axis=1)  # [seq, dirs, batch, H]
    y_h = yh[0] if dirs == 1 else g.op("Concat", yh, "y_h", axis=0)  # [dirs, batch, H]
    y_c = yc[0] if dirs == 1 else g.op("Concat", yc, "y_c", axis=0)
    if layout == 1:
        y = g.op("Transpose", [y], "y", perm=[2, 0, 1, 3])  # [batch, seq, dirs, H]
        y_h = g.op("Transpose", [y_h], "y_h", perm=[1, 0, 2])
        y_c = g.op("Transpose", [y_c], "y_c", perm=[1, 0, 2])
    outs = list(node.output) + [""] * (3 - len(node.output))
    for produced, wanted in zip((y, y_h, y_c), outs):
        if wanted:
            g.op("Identity", [produced], "out")
            g.nodes[-1].output[0] = wanted
    return True


def _direction(g: _Graph, x: str, consts: dict[str, np.ndarray], w: str, r: str, b: str, p: str, h0: str,
               c0: str, d: int, seq: int, batch: int, hidden: int, reverse: bool,
               clip: float | None) -> tuple[str, str, str]:
    """One direction over the whole sequence: (Y [seq, 1, batch, H], Y_h [1, batch, H], Y_c [1, batch, H])."""
    wt, rt = _weight(g, consts, w, d), _weight(g, consts, r, d)  # [I, 4H], [H, 4H]
    proj = g.op("Add", [g.op("MatMul", [x, wt]), _bias(g, consts, b, d, hidden)], "xw") if b else \
        g.op("MatMul", [x, wt], "xw")
    zeros = np.zeros((batch, hidden), np.float32)
    h = g.op("Gather", [h0, g.const(np.array(d), "dir")], axis=0) if h0 else g.const(zeros, "h0")
    c = g.op("Gather", [c0, g.const(np.array(d), "dir")], axis=0) if c0 else g.const(zeros, "c0")
    peep = [_part(g, consts, p, d, k, hidden) for k in range(3)] if p else None  # i, o, f
    r_name = rt
    steps: dict[int, str] = {}
    for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
        xt = g.op("Gather", [proj, g.const(np.array(t), "t")], axis=0)  # [batch, 4H]
        gates = g.op("Add", [xt, g.op("MatMul", [h, r_name])])
        gi, go, gf, gc = (g.op("Slice", [gates, g.const(np.array([k * hidden]), "s"),
                                         g.const(np.array([(k + 1) * hidden]), "e"), g.const(np.array([1]), "ax")])
                          for k in range(4))
        if peep is not None:
            gi = g.op("Add", [gi, g.op("Mul", [c, peep[0]])])
            gf = g.op("Add", [gf, g.op("Mul", [c, peep[2]])])
        gi, gf, gc = (_clip(g, v, clip) for v in (gi, gf, gc))
        i, f, cand = g.op("Sigmoid", [gi]), g.op("Sigmoid", [gf]), g.op("Tanh", [gc])
        c = g.op("Add", [g.op("Mul", [f, c]), g.op("Mul", [i, cand])], "c")
        if peep is not None:
            go = g.op("Add", [go, g.op("Mul", [c, peep[1]])])
        h = g.op("Mul", [g.op("Sigmoid", [_clip(g, go, clip)]), g.op("Tanh", [c])], "h")
        steps[t] = h
    y = g.op("Concat", [g.unsqueeze(steps[t], [0, 1], "y_t") for t in range(seq)], "y", axis=0)
    return y, g.unsqueeze(h, [0], "y_h"), g.unsqueeze(c, [0], "y_c")


def _weight(g: _Graph, consts: dict[str, np.ndarray], name: str, d: int) -> str:
    """Direction ``d`` of W or R ([dirs, 4H, n]) transposed to [n, 4H]: a constant where the weights are,
    else Gather + Transpose in the graph."""
    if name in consts:
        return g.const(consts[name][d].T.astype(np.float32), "w")
    return g.op("Transpose", [g.op("Gather", [name, g.const(np.array(d), "dir")], axis=0)], "wt", perm=[1, 0])


def _part(g: _Graph, consts: dict[str, np.ndarray], name: str, d: int, k: int, size: int) -> str:
    """Part ``k`` (of ``size`` values) of direction ``d`` of a [dirs, n x size] tensor (B, P)."""
    if name in consts:
        return g.const(consts[name][d][k * size:(k + 1) * size].astype(np.float32), "part")
    row = g.op("Gather", [name, g.const(np.array(d), "dir")], axis=0)
    return g.op("Slice", [row, g.const(np.array([k * size]), "s"), g.const(np.array([(k + 1) * size]), "e"),
                          g.const(np.array([0]), "ax")], "part")


def _bias(g: _Graph, consts: dict[str, np.ndarray], b: str, d: int, hidden: int) -> str:
    """Wb + Rb of direction ``d`` ([4H])."""
    if b in consts:
        return g.const((consts[b][d][: 4 * hidden] + consts[b][d][4 * hidden:]).astype(np.float32), "b")
    return g.op("Add", [_part(g, consts, b, d, 0, 4 * hidden), _part(g, consts, b, d, 1, 4 * hidden)], "b")


def _clip(g: _Graph, x: str, clip: float | None) -> str:
    """ONNX's ``clip``: bounds the input of each activation to [-clip, clip]."""
    if clip is None:
        return x
    return g.op("Clip", [x, g.const(np.array(-clip, np.float32), "lo"), g.const(np.array(clip, np.float32), "hi")])
