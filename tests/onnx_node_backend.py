"""ONNX's backend node tests on mlopt's TVM backend: the adapter (``onnx.backend.base.Backend`` over
``TVMBackend.build`` -> ``export_library`` -> the runtime loader) and one test case run and classified.

Used by ``tests/test_tvm.py`` (a chosen subset, in this process) and ``bench/node_suite.py`` (every
non-expanded node test, one worker process at a time with a per-test timeout).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def host_sku() -> Any:
    """The catalog SKU this machine is (tests never assume a fixed CPU SKU)."""
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.detect import host_sku as detect

    return detect(load_catalog())


def backend() -> Any:
    """An ``onnx.backend.base.Backend`` class building each model with mlopt's TVM backend for the
    host SKU, untuned and single-threaded."""
    import onnx
    import onnx.backend.base

    from mlopt.compiler.ingest import read_onnx
    from mlopt.targets.backends import BuildRequest
    from mlopt.targets.tvm import TVMBackend

    sku = host_sku()

    class Rep(onnx.backend.base.BackendRep):
        def __init__(self, run: Any, names: list[str]):
            self._run, self._names = run, names

        def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
            feed = dict(zip(self._names, [np.asarray(x) for x in inputs]))
            return tuple(self._run(feed).values())

    class Backend(onnx.backend.base.Backend):
        @classmethod
        def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> Rep:
            super().prepare(model, device, **kwargs)
            work = Path(tempfile.mkdtemp(prefix="mlopt-node-"))
            onnx.save(model, str(work / "m.onnx"))
            m = read_onnx(work / "m.onnx", [], "t")
            req = BuildRequest(model=m, sku=sku, threads=1, tuning_trials=0, tuning_timeout_s=1,
                               tuning_dir=work, batch_axis="batch", dims={})
            tvm_backend = TVMBackend()
            (work / "a").mkdir()
            meta = {**tvm_backend.build(req, work / "a"), "requires": tvm_backend.requires(sku)}
            return Rep(tvm_backend.load(work / "a", meta, 1), [i.name for i in m.inputs])

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device == "CPU"

    return Backend


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One node test's result: ``status`` pass/fail, the failure's ``kind`` and a one-line ``reason``."""

    name: str
    op: str
    status: str
    kind: str = ""
    reason: str = ""


def op_of(case: Any) -> str:
    """The operator a node test exercises (its model's first node)."""
    nodes = case.model.graph.node
    return nodes[0].op_type if nodes else "(none)"


def run_case(case: Any, backend_cls: Any) -> Outcome:
    """Run one ``onnx.backend.test`` node TestCase (its model and data sets) and classify a failure."""
    from onnx.backend.test.runner import Runner, _normalize_tensor

    try:
        rep = backend_cls.prepare(case.model, "CPU")
        results = [(rep.run([_normalize_tensor(x) for x in inputs]), refs) for inputs, refs in case.data_sets]
    except Exception as e:  # classify everything: the suite reports, it does not stop
        return Outcome(case.name, op_of(case), "fail", *classify(e))
    try:
        for got, refs in results:
            Runner.assert_similar_outputs([_normalize_tensor(r) for r in refs], got, rtol=case.rtol,
                                          atol=case.atol, model_dir=None)
    except (AssertionError, TypeError, AttributeError) as e:  # the build ran and answered otherwise
        return Outcome(case.name, op_of(case), "fail", f"TVM result: wrong {_wrong_what(str(e))}", _assertion_line(e))
    return Outcome(case.name, op_of(case), "pass")


def classify(e: BaseException) -> tuple[str, str]:
    """Whose failure this is, from the exception's type and where it was raised."""
    from mlopt.core.errors import BackendUnavailable, MloptError, UnsupportedOperator

    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    line = f"{type(e).__name__}: {first}"
    if isinstance(e, UnsupportedOperator):
        return refine("TVM frontend: operator unsupported" if "cannot lower" in str(e) else
                      "TVM frontend: import failed", line), line
    if isinstance(e, BackendUnavailable):  # a stated refusal: the backend cannot express the model
        return f"refused: {type(e).__name__} (exit {e.exit_code})", line
    if isinstance(e, MloptError):  # the models are valid ONNX: refusing one at ingest is mlopt's failure
        return f"mlopt: {type(e).__name__} (exit {e.exit_code})", line
    origin = _origin(e)
    return f"{origin}: {type(e).__name__}", line


# TVM's frontend messages where an operator needs a constant (axes, sizes, k, pads, a shape) that the
# node test feeds as a runtime input
NEEDS_CONSTANT = re.compile(r"constant|[Dd]ynamic|'Var'|ir\.expr\.Var|new shape to be Shape")


def refine(kind: str, reason: str) -> str:
    """A failure's class made finer where its message tells the cause: a frontend import that needs a
    constant, ingest's one-line refusal of an operator domain nothing registers."""
    if kind == "TVM frontend: import failed" and NEEDS_CONSTANT.search(reason.split(" (use the ")[0]):  # not the hint
        return "TVM frontend: needs a constant where the test has a runtime input"
    if kind.startswith("mlopt: ModelLoadError") and "domain no backend registers" in reason:
        # ONNX's preview domain (FlexAttention): neither ONNX Runtime nor TVM has kernels for it
        return "refused: ModelLoadError, an operator domain no backend registers (exit 2)"
    return kind


def _wrong_what(text: str) -> str:
    if "incorrect shape" in text:
        return "shape"
    if "dtype(" in text:
        return "dtype"
    if "Mismatch" in text or "not equal to tolerance" in text.lower() or "Arrays are not equal" in text:
        return "numerics"
    return "number of outputs" if "Items are not equal" in text else "result"


def _assertion_line(e: Exception) -> str:
    text = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
    return " | ".join(text[:3])[:300]


def _origin(e: BaseException) -> str:
    """The package the exception's innermost frame belongs to (TVM's C++ errors come back through
    tvm_ffi, with no Python frame of their own)."""
    frames = traceback.extract_tb(e.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        for marker, name in (("/tvm_ffi/", "TVM"), ("/tvm/", "TVM"), ("/mlopt/", "mlopt"),
                             ("/onnxruntime/", "onnxruntime"), ("/onnx/", "onnx"), ("/numpy/", "numpy")):
            if marker in path:
                return name
    return "unknown"
