"""The Model handed between stages: an ONNX file (the interchange form), its signature, and for
PyTorch sources the ``nn.Module`` that training passes need."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from mlopt.core.spec import InputSpec

ONNX_TO_NUMPY = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


def type_text(tp: Any) -> str:
    """An ONNX TypeProto as ONNX writes it: ``tensor(float8e4m3fn)``, ``seq(tensor(float))``, ``optional(...)``."""
    import onnx

    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(tp, kind).elem_type
        name = onnx.helper.tensor_dtype_to_string(elem).rpartition(".")[2].lower() if elem else "undefined"
        return f"{'sparse_' if kind.startswith('sparse') else ''}tensor({name})"
    if kind == "sequence_type":
        return f"seq({type_text(tp.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({type_text(tp.optional_type.elem_type)})"
    if kind == "map_type":
        key = onnx.helper.tensor_dtype_to_string(tp.map_type.key_type).rpartition(".")[2].lower()
        return f"map({key}, {type_text(tp.map_type.value_type)})"
    return kind or "an untyped value"


@dataclass(frozen=True)
class Model:
    """One model on its way through the pipeline."""

    name: str
    onnx_path: Path
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    digest: str
    # Builds the nn.Module this ONNX was exported from (PyTorch sources; training passes use it).
    # None once a pass makes the ONNX differ from any module (quantization).
    module_fn: Callable[[], Any] | None = None

    def derive(self, onnx_path: Path, module_fn: Callable[[], Any] | None = None, digest: str | None = None) -> "Model":
        """A new Model made from this one by a pass (keeps the signature). ``digest``: the file's, where a
        store step already verified its bytes against it (a cached pass), so it is not hashed again."""
        return replace(self, onnx_path=onnx_path, digest=digest or file_digest(onnx_path), module_fn=module_fn)

    @property
    def is_quantized(self) -> bool:
        """The graph carries integer quantization (QDQ, integer ops, or low-bit weights)."""
        return model_precision(self.onnx_path) not in FLOAT_PRECISIONS

    @property
    def precision(self) -> str:
        """What the graph computes in: see ``model_precision``."""
        return model_precision(self.onnx_path)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in onnx_files(self.onnx_path))


def onnx_files(path: Path) -> list[Path]:
    """The ONNX file and the external-data files beside it that it references."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    extra = set()
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                extra.add(path.parent / entry.value)
    return [path, *sorted(extra)]


def file_digest(path: Path) -> str:
    """sha256 over an ONNX file and its external data."""
    h = hashlib.sha256()
    for k, p in enumerate(onnx_files(path)):
        if k:  # external data is referenced by name; the main file's own name does not matter
            h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


FLOAT_PRECISIONS = ("float32", "float16", "bfloat16")
INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
            "DynamicQuantizeLinear"}
ONNX_FLOAT = {1: "float32", 10: "float16", 16: "bfloat16"}


def model_precision(path: Path) -> str:
    """The precision an ONNX graph computes in, from its operators and weights: ``int8`` (QDQ or
    integer ops), ``int4-weights`` / ``int8-weights`` (MatMulNBits), else the float type most of its
    float weights have (``float32``, ``float16``, ``bfloat16``). Every backend labels builds with it."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    if ops & INT8_OPS:
        return "int8"
    nbits = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    if nbits:
        return f"int{max(nbits)}-weights"
    counts: dict[str, int] = {}
    for init in graph.initializer:
        name = ONNX_FLOAT.get(init.data_type)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"
