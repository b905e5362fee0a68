"""The Open Inference Protocol (KServe v2) over HTTP, on starlette (routing, requests) and uvicorn
(the asyncio HTTP/1.1 server: keep-alive, TCP_NODELAY, listen backlog, concurrency limit, graceful
shutdown). Inference runs on the ``ServedModel``'s batcher thread; this module only parses, checks
and answers.

GET  /v2/health/live, /v2/health/ready, /healthz      liveness; readiness (200 once loaded, 503 while
                                                        loading and once SIGTERM starts the drain)
GET  /v2                                              server metadata
GET  /v2/models/NAME[/versions/V]                     model metadata (inputs and outputs, datatype, shape)
GET  /v2/models/NAME[/versions/V]/ready               model readiness
GET  /v2/models/NAME[/versions/V]/config              the model's config (Triton's ModelConfig as JSON)
GET  /v2/models[/NAME[/versions/V]]/stats             statistics (Triton's statistics extension)
POST /v2/repository/index                             the repository index (one model)
POST /v2/models/NAME[/versions/V]/infer               inference (JSON or binary tensor data)
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import v2
from .batcher import Expired, QueueFull
from .served import ServedModel

SERVER_NAME = "mlopt"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "schedule_policy", "parameters"]
BACKLOG = 2048
OFFLOAD_BYTES = 256 << 10  # bodies above this are decoded and encoded off the event loop
RETRY_AFTER_S = "1"
DRAIN_BYTES = 4 << 20  # past the body limit, read and dropped before answering 413 (beyond it: close)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Api:
    """The route handlers of one served model."""

    def __init__(self, model: ServedModel):
        self.model = model

    # ------------------------------------------------------------ health and metadata
    async def live(self, request: Request) -> Response:
        m = self.model
        return JSONResponse({"live": m.error is None, **({"error": m.error} if m.error else {})},
                            status_code=500 if m.error else 200)

    async def ready(self, request: Request) -> Response:
        m = self.model
        body = {"ready": m.ready, **({"error": m.error} if m.error else {}), **({"draining": True} if m.draining else {})}
        return JSONResponse(body, status_code=200 if m.ready else 503)

    async def server(self, request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": "1", "extensions": EXTENSIONS})

    def _find(self, request: Request) -> Response | None:
        """404 for another model or version, 503 while loading, None where the model can answer."""
        name, version = request.path_params["name"], request.path_params.get("version")
        m = self.model
        if name != m.name:
            return _error(404, f"unknown model {name!r}; this server serves {m.name!r}")
        if version not in (None, "", m.version):
            return _error(404, f"unknown version {version!r} of {m.name}; it has version {m.version}")
        if m.signature is None:
            return _error(503, m.error or f"model {m.name} is loading")
        return None

    async def model_ready(self, request: Request) -> Response:
        missing = self._find(request)
        if missing is not None and missing.status_code == 404:
            return missing
        return JSONResponse({"name": self.model.name, "ready": self.model.ready}, status_code=200 if self.model.ready else 503)

    async def metadata(self, request: Request) -> Response:
        return self._find(request) or JSONResponse(self.model.metadata())

    async def config(self, request: Request) -> Response:
        return self._find(request) or JSONResponse(self.model.config())

    async def stats(self, request: Request) -> Response:
        if "name" in request.path_params:
            missing = self._find(request)
            if missing is not None and missing.status_code == 404:
                return missing
        return JSONResponse({"model_stats": [self.model.statistics()]})

    async def index(self, request: Request) -> Response:
        return JSONResponse([self.model.state()])

    # ------------------------------------------------------------ inference
    async def infer(self, request: Request) -> Response:
        m = self.model
        m.enter()
        try:
            return self._find(request) or await self._infer(request)
        finally:
            m.leave()

    async def _infer(self, request: Request) -> Response:
        m, limit = self.model, self.model.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit + DRAIN_BYTES):
            return _too_large(f"the body is {declared} bytes; this server takes at most {limit}", close=True)
        body, drained = await _read(request, limit)
        if body is None:
            return _too_large(f"the body is over this server's limit of {limit} bytes", close=not drained)
        try:
            req = await _maybe_offload(len(body), _decode, body, request.headers, m)
            future = m.batcher.submit(req.inputs, req.batch, req.priority, req.timeout_us)
        except v2.ProtocolError as e:
            return _error(e.status, str(e))
        except QueueFull as e:
            return _error(503, f"{e}; retry later", {"Retry-After": RETRY_AFTER_S})
        try:
            outputs = await _wait(future, req.timeout_us)
        except (Expired, asyncio.TimeoutError, TimeoutError):
            return _error(503, "the request's timeout expired before it ran", {"Retry-After": RETRY_AFTER_S})
        except Exception as e:  # the runtime failed on a valid request: report it, keep serving
            return _error(500, f"{type(e).__name__}: {e}")
        try:
            data, head = await _maybe_offload(len(body), v2.encode, req, outputs, m.name, m.version)
        except (ValueError, KeyError) as e:
            return _error(500, f"the model's outputs cannot be answered: {e}")
        if head is None:
            return Response(data, media_type="application/json")
        return Response(data, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(head)})


def _decode(body: bytes, headers: Any, m: ServedModel) -> v2.Request:
    header, tail = v2.split_body(body, headers.get(v2.HEADER_LENGTH))
    req = v2.decode(header, tail, m.signature)
    if not (header.get("parameters") or {}).get("priority"):
        req.priority = v2.priority_header(headers.get("x-priority")) or req.priority
    return req


async def _maybe_offload(size: int, fn: Any, *args: Any) -> Any:
    if size <= OFFLOAD_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _wait(future: Any, timeout_us: int | None) -> Any:
    wrapped = asyncio.wrap_future(future)
    if timeout_us is None:
        return await wrapped
    try:
        return await asyncio.wait_for(asyncio.shield(wrapped), timeout_us / 1e6)
    except asyncio.TimeoutError:
        if future.cancel():  # still queued: the batcher skips it
            raise
        return await wrapped  # already running (as Triton, the timeout bounds the wait in the queue)


async def _read(request: Request, limit: int) -> tuple[bytes | None, bool]:
    """The body (None past ``limit`` bytes: the rest is read and dropped up to ``DRAIN_BYTES``
    more), and whether it was read to its end."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + DRAIN_BYTES:
                return None, False
            if size <= limit:
                chunks.append(chunk)
    except ClientDisconnect:
        return b"", True
    return (b"".join(chunks) if size <= limit else None), True


def _too_large(message: str, close: bool) -> Response:
    # a body read to its end leaves the connection usable; one that was not must not be parsed as the
    # next request, so the connection closes (after a body drained up to DRAIN_BYTES, so that closing
    # with unread data, which resets the connection, does not lose this answer for a modest overflow)
    return _error(413, message, {"Connection": "close"} if close else None)


def build_app(model: ServedModel) -> Starlette:
    """The starlette application serving ``model``."""
    api = Api(model)
    routes = [Route("/v2/health/live", api.live), Route("/v2/health/ready", api.ready), Route("/healthz", api.ready),
              Route("/v2", api.server), Route("/v2/repository/index", api.index, methods=["POST"]),
              Route("/v2/models/stats", api.stats)]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [Route(base, api.metadata), Route(f"{base}/ready", api.model_ready), Route(f"{base}/config", api.config),
                   Route(f"{base}/stats", api.stats), Route(f"{base}/infer", api.infer, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    return _error(status, f"no route {request.method} {request.url.path}")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket with a real backlog (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def make_server(model: ServedModel, host: str, port: int) -> Server:
    """A uvicorn server for ``model``, bound now (see ``.port``); ``serve_forever`` runs it."""
    lim = model.limits
    config = uvicorn.Config(build_app(model), log_level="warning", access_log=False, lifespan="off",
                            backlog=BACKLOG, timeout_keep_alive=lim.keep_alive_s, limit_concurrency=lim.max_concurrency,
                            timeout_graceful_shutdown=lim.grace_s, server_header=False)
    return Server(config, model, listen(host, port))


class Server(uvicorn.Server):
    """uvicorn's server with mlopt's drain: the first SIGTERM (or SIGINT) turns readiness off and
    keeps serving until every in-flight and queued request is answered (at most ``grace_s``), then
    exits 0; a second signal stops at once."""

    def __init__(self, config: Any, model: ServedModel, sock: socket.socket):
        super().__init__(config)
        self.model, self.sock = model, sock
        self.drain_until: float | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def serve_forever(self) -> None:
        self.run(sockets=[self.sock])

    def stop(self) -> None:
        """Stop from another thread (tests, embedding): no drain."""
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain_until is not None:
            self.should_exit = self.force_exit = True
            return
        self.model.draining = True
        self.drain_until = time.monotonic() + self.model.limits.grace_s
        print(f"entry: {signal.Signals(sig).name}: readiness off, draining {self.model.inflight} request(s)",
              file=sys.stderr, flush=True)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self.drain_until is not None and (self.model.drained or time.monotonic() > self.drain_until)
