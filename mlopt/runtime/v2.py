"""The Open Inference Protocol (KServe v2) request and response, with the binary tensor data
extension, checked strictly against the served model's signature. Numpy and the standard library
only: the HTTP and gRPC front ends both decode into ``Request`` and encode ``Result``.

Binary data (Triton's extension): the body is a JSON header of ``Inference-Header-Content-Length``
bytes followed by the raw tensors of the inputs whose ``parameters.binary_data_size`` is set, in
input order. An output is answered in binary when it asks ``parameters.binary_data`` or, with no
outputs named, when the request asks ``parameters.binary_data_output``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

V2_TYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
            "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
            "FP32": "float32", "FP64": "float64"}
DTYPE_V2 = {v: k for k, v in V2_TYPES.items()}
_NP_V2 = {np.dtype(v): k for k, v in V2_TYPES.items()}  # by dtype object: str(dtype) is slow on the hot path
HEADER_LENGTH = "inference-header-content-length"
DEFAULT_PRIORITY = 10  # priority 0 or none; 1 is the highest level (as Triton: a lower number goes first)


class ProtocolError(Exception):
    """A request the protocol or the model's signature refuses (HTTP 400, gRPC INVALID_ARGUMENT)."""

    status = 400


class TooLarge(ProtocolError):
    """A request over the body or batch limit (HTTP 413)."""

    status = 413


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name
    shape: tuple[int, ...]  # -1: any size

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": DTYPE_V2[self.dtype], "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool  # every input's first axis is the batch axis
    max_request_batch: int  # the largest batch one request may carry (0: no batch axis)


@dataclass
class Request:
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    binary: set[str]  # outputs to answer as binary data
    id: str = ""
    priority: int = DEFAULT_PRIORITY
    timeout_us: int | None = None
    batch: int = 1


def signature_from_spec(spec: Mapping[str, Any], outputs: tuple[TensorSpec, ...], max_request_batch: int) -> Signature:
    """The inputs serve.json declares (named axes become -1) and the outputs the loaded model gave."""
    inputs = tuple(TensorSpec(i["name"], i["dtype"], tuple(d if isinstance(d, int) else -1 for d in i["shape"]))
                   for i in spec["inputs"])
    firsts = {i.shape[0] if i.shape else 0 for i in inputs}
    batched = firsts == {-1} and all(not isinstance(i["shape"][0], int) for i in spec["inputs"])
    return Signature(inputs, outputs, batched, max_request_batch if batched else 0)


# ------------------------------------------------------------------ decoding
def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary tail of a request body."""
    n = len(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} is outside the {len(body)}-byte body")
    try:
        header = json.loads(bytes(body[:n]) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    return header, memoryview(body)[n:]


def decode(header: dict[str, Any], binary: memoryview, sig: Signature) -> Request:
    """A checked request: every declared input once, datatypes, ranks, sizes and batch as the signature says."""
    tensors = header.get("inputs")
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise ProtocolError("'inputs' must be a list of tensor objects")
    names = [t.get("name") for t in tensors]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ProtocolError(f"input {dup!r} is given more than once")
    declared = {i.name: i for i in sig.inputs}
    if set(names) != set(declared):
        raise ProtocolError(f"inputs must be {sorted(declared)}, got {sorted(str(n) for n in names)}")
    inputs, offset = {}, 0
    for t in tensors:
        inputs[t["name"]], offset = _tensor(t, declared[t["name"]], binary, offset)
    if offset != len(binary):
        raise ProtocolError(f"the binary data is {len(binary)} bytes; the inputs' binary_data_size add up to {offset}")
    params = _params(header)
    outputs, binary_out = _outputs(header, sig, params)
    return Request(inputs, outputs, binary_out, id=str(header.get("id", "")), priority=_priority(params.get("priority")),
                   timeout_us=_timeout(params.get("timeout")), batch=_batch(inputs, sig))


def _params(obj: dict[str, Any]) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    return params


def _tensor(t: dict[str, Any], decl: TensorSpec, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    name, datatype, shape = t["name"], t.get("datatype"), t.get("shape")
    if datatype not in V2_TYPES:
        known = ", ".join(V2_TYPES)
        hint = f" (datatypes are upper case: {str(datatype).upper()})" if str(datatype).upper() in V2_TYPES else ""
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}{hint}; known: {known}")
    if V2_TYPES[datatype] != decl.dtype:
        raise ProtocolError(f"input {name!r} must be {DTYPE_V2[decl.dtype]}, not {datatype}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of integers")
    _check_shape(name, shape, decl)
    count = math.prod(shape)
    size = _params(t).get("binary_data_size")
    if size is not None:
        arr, offset = _binary(name, size, count, decl, binary, offset)
    elif "data" in t:
        arr = _json_data(name, t["data"], count, decl)
    else:
        raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return arr.reshape(shape), offset


def _check_shape(name: str, shape: list[int], decl: TensorSpec) -> None:
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {shape} has a negative dimension")
    if len(shape) != len(decl.shape):
        raise ProtocolError(f"input {name!r}: shape {shape} has rank {len(shape)}; the model takes {list(decl.shape)}")
    for got, want in zip(shape, decl.shape):
        if want != -1 and got != want:
            raise ProtocolError(f"input {name!r}: shape {shape} does not match the model's {list(decl.shape)}")


def _binary(name: str, size: Any, count: int, decl: TensorSpec, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    itemsize = np.dtype(decl.dtype).itemsize
    if not isinstance(size, int) or size != count * itemsize:
        raise ProtocolError(f"input {name!r}: binary_data_size {size} is not {count} elements x {itemsize} bytes")
    if offset + size > len(binary):
        raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
    arr = np.frombuffer(binary[offset:offset + size], dtype=np.dtype(decl.dtype).newbyteorder("<")).astype(decl.dtype)
    return arr, offset + size


def _json_data(name: str, data: Any, count: int, decl: TensorSpec) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: 'data' must be a list")
    try:
        arr = np.asarray(data, dtype=decl.dtype).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"input {name!r}: 'data' is not {DTYPE_V2[decl.dtype]}: {e}") from None
    if arr.size != count:
        raise ProtocolError(f"input {name!r}: {arr.size} elements for shape with {count}")
    return arr


def _batch(inputs: dict[str, np.ndarray], sig: Signature) -> int:
    if not sig.batched:
        return 1
    sizes = {a.shape[0] for a in inputs.values()}
    if len(sizes) != 1:
        raise ProtocolError(f"the inputs' batch sizes differ: {sorted(sizes)}")
    (n,) = sizes
    if n == 0:
        raise ProtocolError("batch size 0: send at least one sample")
    if n > sig.max_request_batch:
        raise TooLarge(f"batch size {n} is above this server's limit of {sig.max_request_batch} per request")
    return n


def _outputs(header: dict[str, Any], sig: Signature, params: dict[str, Any]) -> tuple[list[str], set[str]]:
    known = [o.name for o in sig.outputs]
    asked = header.get("outputs")
    if asked is None:
        return known, set(known) if params.get("binary_data_output") else set()
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise ProtocolError("'outputs' must be a list of objects")
    names, binary = [], set()
    for o in asked:
        if o.get("name") not in known:
            raise ProtocolError(f"unknown output {o.get('name')!r}; outputs: {', '.join(known)}")
        if o["name"] in names:
            raise ProtocolError(f"output {o['name']!r} is asked more than once")
        names.append(o["name"])
        if _params(o).get("binary_data", params.get("binary_data_output", False)):
            binary.add(o["name"])
    return names, binary


def _priority(value: Any) -> int:
    if value is None or value == 0:
        return DEFAULT_PRIORITY
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"parameters.priority must be a non-negative integer (1 is the highest), not {value!r}")
    return value


def _timeout(value: Any) -> int | None:
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"parameters.timeout must be a non-negative integer of microseconds, not {value!r}")
    return value


def priority_header(value: str | None) -> int | None:
    """The ``X-Priority`` header's level, used where the body sets none."""
    if value is None:
        return None
    try:
        return _priority(int(value))
    except ValueError:
        raise ProtocolError(f"X-Priority {value!r} is not an integer") from None


# ------------------------------------------------------------------ encoding
def encode(req: Request, outputs: Mapping[str, np.ndarray], model: str, version: str) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it.

    JSON has no NaN or infinity: an output holding one is answered as binary data, as the
    protocol's JSON cannot carry it (the client reads it with ``as_numpy`` either way)."""
    tensors, blobs = [], []
    for name in req.outputs:
        arr = np.require(outputs[name], requirements="C")
        t = {"name": name, "datatype": _NP_V2.get(arr.dtype) or str(arr.dtype).upper(), "shape": list(arr.shape)}
        as_binary = name in req.binary or (arr.dtype.kind == "f" and not np.isfinite(arr).all())
        if as_binary:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    head = json.dumps({"model_name": model, "model_version": version, "id": req.id, "outputs": tensors},
                      allow_nan=False).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def zeros(sig: Signature, batch: int = 1) -> dict[str, np.ndarray]:
    """A feed of zeros (``batch`` samples where the model has a batch axis; other free axes 1)."""
    def dims(shape: tuple[int, ...]) -> list[int]:
        return [batch if (k == 0 and sig.batched) else (1 if d == -1 else d) for k, d in enumerate(shape)]
    return {i.name: np.zeros(dims(i.shape), dtype=i.dtype) for i in sig.inputs}
