"""mlopt's in-image entry point: load one build and serve it over HTTP with the Open Inference
Protocol (KServe v2) JSON API, the protocol Triton and KServe speak.

It imports nothing from mlopt but its runtime loaders: the standard library, numpy and the
``mlopt_runtime`` package shipped beside it (``mlopt.runtime``, one loader per backend, each
importing its own library: onnxruntime, the TVM runtime, openvino, TensorRT or MIGraphX).

    python3 entry.py [--serving /opt/mlopt/serving/serve.json] [--host 0.0.0.0] [--port 8000] [--check]

GET  /healthz, /v2/health/ready   200 once the model is loaded (503 before; the readiness probe)
GET  /v2/health/live              200 unless loading failed
GET  /v2, /v2/models/NAME         server and model metadata
POST /v2/models/NAME/infer        {"inputs": [{"name", "shape", "datatype", "data"}]} -> {"outputs": [...]}

``--check`` loads the model, runs it once on zeros and exits (0 ok, 1 failure, 4 the build's runtime
library or device is missing here). A build whose code this CPU cannot run (``requires`` in
serve.json) is refused before anything loads: exit 4.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

try:  # in an image and a Triton repository, mlopt.runtime ships beside this file as mlopt_runtime
    import mlopt_runtime as runtime
except ImportError:
    from mlopt import runtime

isa = runtime.isa

SERVING = "/opt/mlopt/serving/serve.json"
V2_TYPES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT64": "int64", "INT32": "int32",
            "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
            "UINT64": "uint64", "BOOL": "bool"}
DTYPE_V2 = {v: k for k, v in V2_TYPES.items()}
MAX_BODY = 256 << 20

Runner = runtime.Runner


class RequestError(Exception):
    """A bad inference request (HTTP 400)."""


# ------------------------------------------------------------------ the build, through its runtime loader
def load_runner(spec: dict[str, Any], model_dir: Path | None = None) -> Runner:
    """The callable that runs the build named by a serve.json ``spec``: feed dict in, output dict out.
    The device (CPU, CUDA, ROCm) is the build's own; a missing one is ``runtime.Unavailable`` (exit 4)."""
    isa.require(spec.get("requires"), f"build of {spec.get('model')} v{spec.get('version')} for {spec.get('sku')}")
    return runtime.load(spec["loader"], Path(model_dir or spec["model_dir"]), spec, spec.get("threads"))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------ the model behind the server
class ServedModel:
    """One loaded build; requests run one at a time (runtimes use their own threads)."""

    def __init__(self, spec: dict[str, Any], model_dir: Path | None = None):
        self.spec = spec
        self.model_dir = model_dir
        self.runner: Runner | None = None
        self.error: str | None = None
        self.exit_code = 0  # of a failed load: 4 where the runtime library or device is missing
        self._lock = threading.Lock()

    def load(self) -> None:
        try:
            self.runner = load_runner(self.spec, self.model_dir)
        except Exception as e:  # reported by /v2/health/live and the log; the pod restarts
            self.error = f"{type(e).__name__}: {e}"
            self.exit_code = getattr(e, "exit_code", 1)
            print(f"entry: loading {self.spec['model']} failed: {self.error}", file=sys.stderr, flush=True)

    def metadata(self) -> dict[str, Any]:
        s = self.spec
        return {"name": s["model"], "versions": [str(s["version"])], "platform": s["backend"],
                "inputs": [{"name": i["name"], "datatype": DTYPE_V2.get(i["dtype"], i["dtype"]),
                            "shape": [d if isinstance(d, int) else -1 for d in i["shape"]]} for i in s["inputs"]],
                "outputs": [{"name": n} for n in s["outputs"]]}

    def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run an Open Inference Protocol request."""
        if self.runner is None:
            raise RequestError("the model is not loaded yet")
        feed = _feed(request, self.spec)
        with self._lock:
            out = self.runner(feed)
        wanted = [o["name"] for o in request.get("outputs") or []] or list(self.spec["outputs"])
        missing = [n for n in wanted if n not in out]
        if missing:
            raise RequestError(f"unknown output {missing[0]!r}; outputs: {', '.join(self.spec['outputs'])}")
        return {"model_name": self.spec["model"], "model_version": str(self.spec["version"]),
                "id": request.get("id", ""), "outputs": [_tensor(n, out[n]) for n in wanted]}


def _feed(request: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    declared = {i["name"]: i for i in spec["inputs"]}
    given = {t.get("name"): t for t in request.get("inputs") or []}
    if set(given) != set(declared):
        raise RequestError(f"inputs must be {sorted(declared)}, got {sorted(k for k in given if k)}")
    feed = {}
    for name, t in given.items():
        dtype = V2_TYPES.get(t.get("datatype", ""), declared[name]["dtype"])
        try:
            feed[name] = np.asarray(t["data"], dtype=dtype).reshape(t["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(f"input {name!r}: {e}") from None
        if feed[name].dtype != np.dtype(declared[name]["dtype"]):
            raise RequestError(f"input {name!r} must be {DTYPE_V2.get(declared[name]['dtype'])}, not {t.get('datatype')}")
    return feed


def _tensor(name: str, value: Any) -> dict[str, Any]:
    import numpy as np

    arr = np.asarray(value)
    return {"name": name, "shape": list(arr.shape), "datatype": DTYPE_V2.get(str(arr.dtype), str(arr.dtype)),
            "data": arr.reshape(-1).tolist()}


# ------------------------------------------------------------------ HTTP
class Handler(BaseHTTPRequestHandler):
    model: ServedModel
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: probes call every few seconds
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        m, name = self.model, self.model.spec["model"]
        ready = m.runner is not None
        if self.path in ("/healthz", "/v2/health/ready", f"/v2/models/{name}/ready"):
            self._reply(200 if ready else 503, {"ready": ready, **({"error": m.error} if m.error else {})})
        elif self.path == "/v2/health/live":
            self._reply(500 if m.error else 200, {"live": m.error is None})
        elif self.path == "/v2":
            self._reply(200, {"name": "mlopt-entry", "version": "1", "extensions": []})
        elif self.path in (f"/v2/models/{name}", f"/v2/models/{name}/versions/{m.spec['version']}"):
            self._reply(200, m.metadata())
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        name = self.model.spec["model"]
        if self.path not in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{self.model.spec['version']}/infer"):
            self._reply(404, {"error": f"no route {self.path}; POST /v2/models/{name}/infer"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, {"error": f"request over {MAX_BODY} bytes"})
            return
        try:
            self._reply(200, self.model.infer(json.loads(self.rfile.read(length) or b"{}")))
        except (RequestError, ValueError) as e:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # the runtime failed on valid input: report it, keep serving
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})


def make_server(model: ServedModel, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``model`` (port 0 picks a free port: see ``server.server_address``)."""
    handler = type("BoundHandler", (Handler,), {"model": model})
    return ThreadingHTTPServer((host, port), handler)


def _check(model: ServedModel) -> int:
    import numpy as np

    model.load()
    if model.runner is None:
        return model.exit_code
    feed = {i["name"]: np.zeros([d if isinstance(d, int) else 1 for d in i["shape"]], dtype=i["dtype"])
            for i in model.spec["inputs"]}
    out = model.runner(feed)
    print(json.dumps({n: list(np.asarray(v).shape) for n, v in out.items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="entry.py", description=__doc__.splitlines()[0])
    p.add_argument("--serving", type=Path, default=Path(SERVING), help="serve.json written by mlopt")
    p.add_argument("--model-dir", type=Path, default=None, help="the artifact folder (default: serve.json's)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--check", action="store_true", help="load, run once on zeros, exit")
    args = p.parse_args(argv)
    spec = _json(args.serving)
    refused = isa.refusal(spec.get("requires"), f"build of {spec.get('model')} v{spec.get('version')} for {spec.get('sku')}")
    if refused:  # before anything loads: code for another CPU would die of SIGILL
        print(f"entry: {refused}", file=sys.stderr, flush=True)
        return isa.EXIT_CODE
    model = ServedModel(spec, args.model_dir)
    if args.check:
        return _check(model)
    server = make_server(model, args.host, args.port if args.port is not None else int(spec.get("port", 8000)))
    threading.Thread(target=model.load, daemon=True).start()
    print(f"entry: serving {spec['model']} v{spec['version']} ({spec['backend']}) on "
          f"{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
