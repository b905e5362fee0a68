"""An ONNX model's graph inputs and outputs, read without loading its weights.

``onnx.load`` reads the whole file (weights included) into memory; serving configs need only the
graph's input and output declarations. This walks the protobuf wire format, seeks past every
other field (initializers, nodes) and parses just the ``ValueInfoProto`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mlopt.core.errors import ModelLoadError

_MODEL_GRAPH = 7
_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_INITIALIZER = 11, 12, 5
_LEN = 2


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str  # numpy name: float32, int64 ...
    shape: tuple[int | str | None, ...]  # int: fixed; str: a named dynamic axis; None: unknown


def graph_io(path: Path) -> tuple[list[TensorDecl], list[TensorDecl]]:
    """(inputs, outputs) of the ONNX model at ``path``; initializers are not counted as inputs."""
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        f.seek(0)
        for field, wire, start, length in _fields(f, end):
            if field == _MODEL_GRAPH and wire == _LEN:
                return _graph(f, start, start + length, path)
    raise ModelLoadError(f"{path} has no ONNX graph")


def _graph(f: BinaryIO, start: int, end: int, path: Path) -> tuple[list[TensorDecl], list[TensorDecl]]:
    from onnx import ValueInfoProto

    found: dict[int, list[TensorDecl]] = {_GRAPH_INPUT: [], _GRAPH_OUTPUT: []}
    weights: set[str] = set()
    f.seek(start)
    for field, wire, at, length in _fields(f, end):
        if wire != _LEN:
            continue
        if field in found:
            f.seek(at)
            found[field].append(_decl(ValueInfoProto.FromString(f.read(length))))
        elif field == _GRAPH_INITIALIZER:
            weights.add(_initializer_name(f, at, at + length))
    inputs = [d for d in found[_GRAPH_INPUT] if d.name not in weights]
    if not found[_GRAPH_OUTPUT]:
        raise ModelLoadError(f"{path}: the ONNX graph declares no outputs")
    return inputs, found[_GRAPH_OUTPUT]


def _initializer_name(f: BinaryIO, start: int, end: int) -> str:
    """TensorProto.name is field 8; read it without reading the raw data."""
    f.seek(start)
    for field, wire, at, length in _fields(f, end):
        if field == 8 and wire == _LEN:
            f.seek(at)
            return f.read(length).decode()
    return ""


def _decl(v: object) -> TensorDecl:
    from onnx import helper

    t = v.type.tensor_type  # type: ignore[attr-defined]
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "float32"
    return TensorDecl(v.name, dtype, dims)  # type: ignore[attr-defined]


def _fields(f: BinaryIO, end: int):  # type: ignore[no-untyped-def]
    """Yield (field number, wire type, value offset, value length) of each field up to ``end``,
    leaving the file positioned after the field (length-delimited values are skipped, not read)."""
    while f.tell() < end:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _varint(f)
            yield field, wire, f.tell(), 0
        elif wire == 1 or wire == 5:
            f.seek(8 if wire == 1 else 4, 1)
            yield field, wire, f.tell(), 0
        elif wire == _LEN:
            length = _varint(f)
            at = f.tell()
            yield field, wire, at, length
            f.seek(at + length)
        else:
            raise ModelLoadError(f"{getattr(f, 'name', 'model')}: not an ONNX protobuf (wire type {wire})")


def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise ModelLoadError(f"{getattr(f, 'name', 'model')}: truncated ONNX protobuf")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
