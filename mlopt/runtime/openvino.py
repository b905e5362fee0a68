"""OpenVINO loader: the build's IR compiled on the device its ``ov_config.json`` names."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

from . import Runner, Unavailable

CONFIG_FILE = "ov_config.json"


def output_ports(outputs: Any, names: list[str]) -> dict[str, Any]:
    """ONNX output name -> OpenVINO output port, in the ONNX order."""
    ports = {}
    for name in names:
        port = next((o for o in outputs if name in o.get_names()), None)
        if port is None:
            found = sorted(n for o in outputs for n in o.get_names())
            raise Unavailable(f"OpenVINO lost the ONNX output name {name!r} (outputs are {found})")
        ports[name] = port
    return ports


def load(folder: Path, meta: Mapping[str, Any], threads: int | None = None) -> Runner:
    """The IR compiled on the build's device (``meta["openvino_device"]`` overrides it, as an image's
    serve.json may); ``threads`` replaces the CPU plugin's thread count."""
    import openvino as ov

    entry = json.loads((folder / (meta.get("config") or CONFIG_FILE)).read_text())
    config = dict(entry.get("config") or {})
    if threads and "INFERENCE_NUM_THREADS" in config:
        config["INFERENCE_NUM_THREADS"] = threads  # the same thread count the other backends get
    device = meta.get("openvino_device") or entry["device"]
    compiled = ov.Core().compile_model(str(folder / entry["model"]), device, config)
    return _runner(compiled, entry["inputs"], entry["outputs"])


def onnx_file(path: Path, device: str, config: Mapping[str, Any]) -> Runner:
    """An ONNX file compiled by OpenVINO as it is (its ONNX frontend reads QDQ graphs and runs them in
    int8): what the quantization search times a candidate with, without building an IR first."""
    import onnx
    import openvino as ov

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    compiled = ov.Core().compile_model(str(path), device, dict(config))
    return _runner(compiled, [i.name for i in graph.input if i.name not in inits], [o.name for o in graph.output])


def _runner(compiled: Any, inputs: list[str], outputs: list[str]) -> Runner:
    import numpy as np

    ports = output_ports(compiled.outputs, outputs)
    request = compiled.create_infer_request()

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        arrays = {n: np.require(feed[n], requirements="C") for n in inputs}  # 0-d stays 0-d
        res = request.infer(arrays, share_inputs=True, share_outputs=False)  # outputs copied: buffers are reused
        return {n: res[p] for n, p in ports.items()}

    return run


def main(folder: Path, argv: list[str]) -> int:
    """``run_openvino.py``: run the build in ``folder`` on an .npz of inputs, writing an .npz of outputs."""
    import numpy as np

    if len(argv) != 2:
        print("usage: run_openvino.py inputs.npz outputs.npz", file=sys.stderr)
        return 2
    try:
        run = load(folder, {})
    except Unavailable as e:
        print(f"run_openvino.py: {e}", file=sys.stderr)
        return e.exit_code
    with np.load(argv[0]) as data:
        feed = {k: data[k] for k in data.files}
    np.savez(argv[1], **run(feed))
    return 0
