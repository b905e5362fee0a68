"""The Open Inference Protocol (KServe v2) over gRPC: the ``inference.GRPCInferenceService`` of the
protocol's own proto, as tritonclient ships it compiled (``tritonclient.grpc.service_pb2``), on
grpcio. Requests are turned into the HTTP side's JSON header plus binary tail and checked by the same
``v2.decode``; they run on the same ``ServedModel`` batcher. Outputs are always answered as
``raw_output_contents`` (what tritonclient reads; NaN travels as is).
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from . import v2
from .batcher import Expired, QueueFull
from .served import ServedModel

CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
WORKERS = 64  # threads waiting on the batcher at once (each request holds one while it waits)


def _param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over one ``ServedModel``."""

    def __init__(self, model: ServedModel):
        self.model = model

    def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=self.model.error is None)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.model.ready)

    def ModelReady(self, request: Any, context: Any) -> Any:
        known = self._known(request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=known and self.model.ready)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        from .http_server import EXTENSIONS, SERVER_NAME

        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version="1", extensions=EXTENSIONS)

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._require(request.name, request.version, context)
        return json_format.ParseDict(self.model.metadata(), service_pb2.ModelMetadataResponse())

    def ModelConfig(self, request: Any, context: Any) -> Any:
        self._require(request.name, request.version, context)
        config = json_format.ParseDict(self.model.config(), model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=config)

    def ModelStatistics(self, request: Any, context: Any) -> Any:
        if request.name:
            self._require(request.name, request.version, context, loaded=False)
        return json_format.ParseDict({"model_stats": [self.model.statistics()]}, service_pb2.ModelStatisticsResponse())

    def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return json_format.ParseDict({"models": [self.model.state()]}, service_pb2.RepositoryIndexResponse())

    def ModelInfer(self, request: Any, context: Any) -> Any:
        m = self.model
        m.enter()
        try:
            self._require(request.model_name, request.model_version, context)
            return self._infer(request, context)
        finally:
            m.leave()

    def _infer(self, request: Any, context: Any) -> Any:
        m = self.model
        try:
            header, tail = _as_v2(request)
            req = v2.decode(header, memoryview(tail), m.signature)
            future = m.batcher.submit(req.inputs, req.batch, req.priority, req.timeout_us)
        except v2.ProtocolError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{e}; retry later")
        try:
            outputs = _result(future, req.timeout_us)
        except (Expired, futures.TimeoutError):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the request's timeout expired before it ran")
        except Exception as e:  # the runtime failed on a valid request
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        return _response(req, outputs, m)

    def _known(self, name: str, version: str) -> bool:
        return name == self.model.name and version in ("", self.model.version)

    def _require(self, name: str, version: str, context: Any, loaded: bool = True) -> None:
        m = self.model
        if name != m.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {m.name!r}")
        if version not in ("", m.version):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown version {version!r} of {m.name}; it has version {m.version}")
        if loaded and m.signature is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, m.error or f"model {m.name} is loading")


def _result(future: futures.Future, timeout_us: int | None) -> Any:
    """The outputs; past the timeout a request still queued is dropped, a running one is awaited."""
    try:
        return future.result(timeout=timeout_us / 1e6 if timeout_us else None)
    except futures.TimeoutError:
        if future.cancel():
            raise
        return future.result()


def _as_v2(request: Any) -> tuple[dict[str, Any], bytes]:
    """The request as the HTTP side's JSON header and binary tail."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise v2.ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for k, t in enumerate(request.inputs):
        tensor: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
        if raw:
            tensor["parameters"] = {"binary_data_size": len(raw[k])}
        else:
            field = CONTENTS.get(t.datatype)
            tensor["data"] = list(getattr(t.contents, field)) if field else []
        inputs.append(tensor)
    params = {k: _param(v) for k, v in request.parameters.items()}
    header = {"id": request.id, "inputs": inputs, "parameters": params}
    if request.outputs:
        header["outputs"] = [{"name": o.name} for o in request.outputs]
    return header, b"".join(raw)


def _response(req: v2.Request, outputs: dict[str, Any], m: ServedModel) -> Any:
    import numpy as np

    resp = service_pb2.ModelInferResponse(model_name=m.name, model_version=m.version, id=req.id)
    for name in req.outputs:
        arr = np.require(outputs[name], requirements="C")
        resp.outputs.add(name=name, datatype=v2.DTYPE_V2[str(arr.dtype)], shape=list(arr.shape))
        resp.raw_output_contents.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return resp


def make_server(model: ServedModel, host: str, port: int) -> tuple[Any, int]:
    """A started gRPC server for ``model`` and its port (0 picks a free one)."""
    limit = model.limits.max_body_bytes
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="mlopt-grpc"),
                         maximum_concurrent_rpcs=model.limits.max_concurrency,  # past it: RESOURCE_EXHAUSTED
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", 256 << 20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(model), server)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    server.start()
    return server, bound
