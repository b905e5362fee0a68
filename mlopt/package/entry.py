"""mlopt's in-image entry point: load one build and serve it over HTTP with the Open Inference
Protocol (KServe v2) JSON API, the protocol Triton and KServe speak.

It imports nothing from mlopt: the standard library, numpy and the build's runtime (onnxruntime,
the TVM runtime, openvino, or the engine entry shipped in a TensorRT/MIGraphX artifact).

    python3 entry.py [--serving /opt/mlopt/serving/serve.json] [--host 0.0.0.0] [--port 8000] [--check]

GET  /healthz, /v2/health/ready   200 once the model is loaded (503 before; the readiness probe)
GET  /v2/health/live              200 unless loading failed
GET  /v2, /v2/models/NAME         server and model metadata
POST /v2/models/NAME/infer        {"inputs": [{"name", "shape", "datatype", "data"}]} -> {"outputs": [...]}

``--check`` loads the model, runs it once on zeros and exits (0 ok, 1 failure). A build whose code
this CPU cannot run (``requires`` in serve.json) is refused before anything loads: exit 4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

try:  # in an image and a Triton repository, mlopt.runtime.isa ships beside this file as mlopt_isa.py
    import mlopt_isa as isa
except ImportError:
    from mlopt.runtime import isa

SERVING = "/opt/mlopt/serving/serve.json"
V2_TYPES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT64": "int64", "INT32": "int32",
            "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
            "UINT64": "uint64", "BOOL": "bool"}
DTYPE_V2 = {v: k for k, v in V2_TYPES.items()}
MAX_BODY = 256 << 20

Runner = Callable[[dict[str, Any]], dict[str, Any]]


class RequestError(Exception):
    """A bad inference request (HTTP 400)."""


# ------------------------------------------------------------------ loaders, one per backend
def _ort(spec: dict[str, Any], model_dir: Path) -> Runner:
    import onnxruntime as ort

    settings = _json(model_dir / "session.json") if (model_dir / "session.json").is_file() else {}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                            settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    opts.intra_op_num_threads = int(spec.get("threads") or settings.get("intra_op_num_threads") or 0)
    opts.inter_op_num_threads = int(settings.get("inter_op_num_threads", 1))
    opts.log_severity_level = 3
    wanted = settings.get("providers") or spec.get("providers") or ["CPUExecutionProvider"]
    providers = [p for p in wanted if p in ort.get_available_providers()]
    if not providers:
        raise RuntimeError(f"none of the execution providers {wanted} is in this onnxruntime build")
    sess = ort.InferenceSession(str(model_dir / (spec.get("entry") or "model.onnx")), opts, providers=providers)
    names = [o.name for o in sess.get_outputs()]
    return lambda feed: dict(zip(names, sess.run(names, feed)))


def _engine(spec: dict[str, Any], model_dir: Path) -> Runner:
    """TensorRT / MIGraphX: the artifact's own entry builds the engine on this GPU, with a cache."""
    path = model_dir / "engine_entry.py"
    module_spec = importlib.util.spec_from_file_location("mlopt_engine_entry", path)
    if module_spec is None or module_spec.loader is None:
        raise RuntimeError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    cache = spec.get("engine_cache")
    return module.open_runner(model_dir, Path(cache) if cache else None)


def _tvm(spec: dict[str, Any], model_dir: Path) -> Runner:
    import numpy as np
    import tvm
    from tvm import relax

    entry = _json(model_dir / "tvm_entry.json")
    vms: dict[str, Any] = {}

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        batch = feed[entry["inputs"][0]].shape[0]
        lib = entry["tuned"].get(str(batch), entry["library"])
        if lib not in vms:
            vms[lib] = relax.VirtualMachine(tvm.runtime.load_module(str(model_dir / lib)), tvm.cpu())
        out = vms[lib][entry["function"]](*[tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in entry["inputs"]])
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {n: o.numpy() for n, o in zip(entry["outputs"], outs)}

    return run


def _openvino(spec: dict[str, Any], model_dir: Path) -> Runner:
    import openvino as ov

    cfg = _json(model_dir / "ov_config.json")
    compiled = ov.Core().compile_model(str(model_dir / cfg["model"]), spec.get("openvino_device") or cfg["device"],
                                       cfg.get("config") or {})
    ports = {n: next(o for o in compiled.outputs if n in o.get_names()) for n in cfg["outputs"]}
    request = compiled.create_infer_request()

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        res = request.infer(feed)
        return {n: res[p] for n, p in ports.items()}

    return run


LOADERS: dict[str, Callable[[dict[str, Any], Path], Runner]] = {
    "onnxruntime": _ort, "tensorrt": _engine, "migraphx": _engine, "tvm": _tvm, "openvino": _openvino,
}


def load_runner(spec: dict[str, Any], model_dir: Path | None = None) -> Runner:
    """The callable that runs the build named by a serve.json ``spec``: feed dict in, output dict out."""
    backend = spec["backend"]
    isa.require(spec.get("requires"), f"build of {spec.get('model')} v{spec.get('version')} for {spec.get('sku')}")
    if backend not in LOADERS:
        raise RuntimeError(f"backend {backend!r} has no loader here; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[backend](spec, Path(model_dir or spec["model_dir"]))


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------ the model behind the server
class Model:
    """One loaded build; requests run one at a time (runtimes use their own threads)."""

    def __init__(self, spec: dict[str, Any], model_dir: Path | None = None):
        self.spec = spec
        self.model_dir = model_dir
        self.runner: Runner | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        try:
            self.runner = load_runner(self.spec, self.model_dir)
        except Exception as e:  # reported by /v2/health/live and the log; the pod restarts
            self.error = f"{type(e).__name__}: {e}"
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
    model: Model
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


def make_server(model: Model, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``model`` (port 0 picks a free port: see ``server.server_address``)."""
    handler = type("BoundHandler", (Handler,), {"model": model})
    return ThreadingHTTPServer((host, port), handler)


def _check(model: Model) -> int:
    import numpy as np

    model.load()
    if model.runner is None:
        return 1
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
    model = Model(spec, args.model_dir)
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
