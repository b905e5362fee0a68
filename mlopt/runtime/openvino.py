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
    import numpy as np
    import openvino as ov

    entry = json.loads((folder / (meta.get("config") or CONFIG_FILE)).read_text())
    config = dict(entry.get("config") or {})
    if threads and "INFERENCE_NUM_THREADS" in config:
        config["INFERENCE_NUM_THREADS"] = threads  # the same thread count the other backends get
    device = meta.get("openvino_device") or entry["device"]
    compiled = ov.Core().compile_model(str(folder / entry["model"]), device, config)
    ports = output_ports(compiled.outputs, entry["outputs"])
    request = compiled.create_infer_request()
    names = entry["inputs"]

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        inputs = {n: np.ascontiguousarray(feed[n]) for n in names}
        res = request.infer(inputs, share_inputs=True, share_outputs=False)  # outputs copied: buffers are reused
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
