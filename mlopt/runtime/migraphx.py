"""MIGraphX programs: compiled from the plan on the AMD GPU they serve from, one per batch size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import Runner
from .engine_plan import (EngineError, EngineUnreadable, batch_of, concrete_shapes, dynamic_dims, import_library,
                          input_dtypes)
from .gpus import Device, amd_device


class MIGraphXEngine:
    """MIGraphX: one compiled program per planned batch size (static shapes compile best)."""

    kind = "migraphx"
    needs = ("MIGraphX's Python module, which comes with ROCm, not PyPI: apt-get install migraphx, "
             "then PYTHONPATH=/opt/rocm/lib")
    gpu = "an AMD GPU (run the container with /dev/kfd and /dev/dri)"

    def __init__(self) -> None:
        self.mgx = import_library("migraphx", self.needs)
        # builds from source report "dev": the ROCm release tells such builds apart in the cache key
        self.version = f"{getattr(self.mgx, '__version__', 'unknown')}+rocm{rocm_version()}"

    def device(self) -> Device | None:
        return amd_device()

    def build(self, plan: dict[str, Any], model: Path, dest: Path, timing: Path) -> list[str]:
        """Parse, quantize to fp16 where planned, compile for the GPU and save, per batch size."""
        mgx, names = self.mgx, []
        for batch in plan["batches"]:
            if plan.get("ranges"):  # one program per batch that takes every size of the ranged axes
                dims = {n: [mgx.shape.dynamic_dimension(lo, hi, {opt}) for lo, hi, opt in d]
                        for n, d in dynamic_dims(plan, batch).items()}
                prog = mgx.parse_onnx(str(model), map_dyn_input_dims=dims)
            else:
                prog = mgx.parse_onnx(str(model), map_input_dims=concrete_shapes(plan, batch))
            if plan["precision"]["fp16"]:
                mgx.quantize_fp16(prog)
            # int8 needs no call: MIGraphX lowers the model's QuantizeLinear/DequantizeLinear itself
            prog.compile(mgx.get_target("gpu"), offload_copy=True)
            names.append(f"batch{batch}.mxr")
            mgx.save(prog, str(dest / names[-1]))
        return names

    def runner(self, plan: dict[str, Any], folder: Path) -> Runner:
        progs = {}
        for batch in plan["batches"]:
            try:
                progs[int(batch)] = self.mgx.load(str(folder / f"batch{batch}.mxr"))
            except RuntimeError as e:
                raise EngineUnreadable(f"MIGraphX cannot load batch{batch}.mxr: {e}") from None
        dtypes = input_dtypes(plan)

        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            batch = batch_of(plan, feed)
            if batch not in progs:
                raise EngineError(f"no MIGraphX program for batch {batch}; the plan compiled {sorted(progs)}")
            args = {n: self.mgx.argument(np.require(feed[n], dtype=t, requirements="C")) for n, t in dtypes.items()}
            outs = progs[batch].run(args)
            return {n: np.array(o) for n, o in zip(plan["outputs"], outs)}

        return run


def rocm_version() -> str:
    """The ROCm release this machine has (its .info/version file), or "unknown"."""
    info = Path(os.environ.get("ROCM_PATH", "/opt/rocm")) / ".info" / "version"
    return info.read_text().strip() if info.is_file() else "unknown"
