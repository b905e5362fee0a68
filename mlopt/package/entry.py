"""mlopt's in-image entry point: load one build and serve it with the Open Inference Protocol
(KServe v2, the protocol Triton and KServe speak) over HTTP, on uvicorn and starlette.

A thin CLI: the server, the protocol, the dynamic batcher and the model's lifecycle live in the
``mlopt_runtime`` package shipped beside this file (``mlopt.runtime``: ``http_server``, ``v2``,
``batcher``, ``served``), whose loaders import only numpy and their own runtime library.

    python3 entry.py [--serving /opt/mlopt/serving/serve.json] [--host 0.0.0.0] [--port 8000]
                     [--grpc-port 8001] [--check]

``--check`` loads the model, runs it once on zeros and exits (0 ok, 1 failure, 4 the build's runtime
library or device is missing here). A build whose code this CPU cannot run (``requires`` in
serve.json) is refused before anything loads: exit 4. SIGTERM turns readiness off, answers what is
in flight and exits 0 (see ``http_server.Server``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

try:  # in an image and a Triton repository, mlopt.runtime ships beside this file as mlopt_runtime
    import mlopt_runtime as runtime
    from mlopt_runtime import served
except ImportError:
    from mlopt import runtime
    from mlopt.runtime import served

isa = runtime.isa

SERVING = "/opt/mlopt/serving/serve.json"

Runner = runtime.Runner
ServedModel = served.ServedModel
load_runner = served.load_runner  # Triton's Python backend model runs builds through it


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _module(name: str) -> Any:
    """A module of the runtime package beside this file (imported only when serving: the Triton
    Python backend imports this file for ``load_runner`` without the HTTP and gRPC stacks)."""
    import importlib

    return importlib.import_module(f"{runtime.__name__}.{name}")


def make_server(model: ServedModel, host: str, port: int) -> Any:
    """The HTTP server for ``model``, bound now (``.port``; port 0 picks a free one)."""
    return _module("http_server").make_server(model, host, port)


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
    p.add_argument("--grpc-port", type=int, default=None, help="also serve KServe v2 gRPC on this port")
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
    grpc_server, grpc_port = (None, None) if args.grpc_port is None else \
        _module("grpc_server").make_server(model, args.host, args.grpc_port)
    model.start_loading()
    print(f"entry: serving {spec['model']} v{spec['version']} ({spec['backend']}) on {args.host}:{server.port}"
          + (f", gRPC on {grpc_port}" if grpc_server else ""), file=sys.stderr, flush=True)
    server.serve_forever()  # returns once SIGTERM's drain is done
    if grpc_server is not None:
        grpc_server.stop(grace=model.limits.grace_s).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
