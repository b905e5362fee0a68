"""Ingest: turn a model source (ONNX file, torch.export .pt2, PyTorch factory) into a ``Model``.

PyTorch sources are exported to ONNX and the export is checked numerically against the module.
ONNX files are checked (structure, signature). torch is imported only when a source needs it.
Reference runs and feeds live in ``feeds``, comparisons with the reference in ``validate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlopt.core.model import ONNX_TO_NUMPY, Model, file_digest, type_text
from mlopt.compiler.feeds import run_onnx
from mlopt.compiler.pt2_safety import check_pt2
from mlopt.compiler.validate import check_close
from mlopt.core.errors import ModelLoadError, UnsupportedType
from mlopt.core.callables import load_callable
from mlopt.core.spec import DTYPES, InputSpec
from mlopt.recipes.schema import ModelSource


def source_key(src: ModelSource) -> str:
    """A cache key for a source that needs no import: file contents, names, signature, versions."""
    h = hashlib.sha256(json.dumps(src.model_dump(mode="json"), sort_keys=True).encode())
    for path in _source_files(src):
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    if src.kind != "onnx":
        from importlib.metadata import version

        h.update(f"torch=={version('torch')}".encode())
    return h.hexdigest()


def _source_files(src: ModelSource) -> list[Path]:
    files = []
    if src.kind in ("onnx", "pt2"):
        files.append(Path(src.source))
    elif src.source.rpartition(":")[0].endswith(".py"):
        files.append(Path(src.source.rpartition(":")[0]))
    if src.checkpoint:
        files.append(Path(src.checkpoint))
    return files


# ---------------------------------------------------------------- ONNX


def read_onnx(path: Path, declared: list[InputSpec], name: str) -> Model:
    """Check an ONNX file and return its Model; ``declared`` inputs, if any, must match the file."""
    import onnx

    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist", hint="check model.source in the recipe")
    try:
        onnx.checker.check_model(str(path), full_check=False)
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValidationError, OSError ...
        raise ModelLoadError(
            f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            hint="the file may be truncated or corrupt; export it again",
        ) from None
    _check_opsets(proto, path)
    found = graph_inputs(proto)
    inputs = _match_signature(found, declared, path) if declared else found
    outputs = tuple(o.name for o in proto.graph.output)
    return Model(name=name, onnx_path=path, inputs=tuple(inputs), outputs=outputs, digest=file_digest(path))


# Domains whose operators ONNX Runtime registers besides ONNX's own (the default and ai.onnx.ml).
RUNTIME_DOMAINS = {"com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc", "ai.onnx.preview.training"}


def _check_opsets(proto: Any, path: Path) -> None:
    """Refuse an opset newer than the installed onnx knows, and an operator in a domain nothing registers
    (ONNX Runtime would fail later with several lines of C++ internals)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise ModelLoadError(f"{path.name} uses ONNX opset {op.version}; the newest this onnx {onnx.__version__} "
                                 f"knows is {newest}", hint="export the model again with a lower opset_version")
    known = {"", "ai.onnx", "ai.onnx.ml", *RUNTIME_DOMAINS, *(f.domain for f in proto.functions)}
    unknown = sorted({f"{n.domain}:{n.op_type}" for n in proto.graph.node if n.domain not in known})
    if unknown:
        raise ModelLoadError(f"{path.name} has operators in a domain no backend registers: {', '.join(unknown[:5])}",
                             hint="export the model with standard ONNX operators, or inline the custom ones")


def graph_inputs(proto: Any) -> list[InputSpec]:
    """The graph's real inputs (initializers excluded) as InputSpecs."""
    inits = {i.name for i in proto.graph.initializer}
    specs = []
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dtype = ONNX_TO_NUMPY.get(tt.elem_type) if inp.type.HasField("tensor_type") else None
        if dtype is None:
            raise UnsupportedType(
                f"input {inp.name!r} is {type_text(inp.type)}; mlopt compiles models whose inputs are tensors of "
                f"{', '.join(DTYPES)}", hint="make the input one of those in the model (a Cast node after it), "
                "or run the model with onnxruntime directly")
        dims: list[int | str] = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(_axis_name(d.dim_param, inp.name, k))
        specs.append(InputSpec(name=inp.name, shape=dims, dtype=dtype))
    return specs


def _axis_name(param: str, input_name: str, k: int) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in param).strip("_")
    if cleaned and not cleaned[0].isdigit():
        return cleaned
    return f"{''.join(c if c.isalnum() else '_' for c in input_name)}_dim{k}"


def _match_signature(found: list[InputSpec], declared: list[InputSpec], path: Path) -> list[InputSpec]:
    by_name = {f.name: f for f in found}
    if set(by_name) != {d.name for d in declared}:
        raise ModelLoadError(
            f"input signature does not match {path.name}: the model has inputs {sorted(by_name)}, "
            f"the recipe declares {[d.name for d in declared]}",
            hint="fix model.inputs (or --input) to name the model's inputs",
        )
    for d in declared:
        f = by_name[d.name]
        if len(f.shape) != len(d.shape):
            raise ModelLoadError(f"input {d.name!r}: the model has rank {len(f.shape)} {f.shape}, declared {d.shape}")
        for fd, dd in zip(f.shape, d.shape):
            if isinstance(fd, int) and isinstance(dd, int) and fd != dd:
                raise ModelLoadError(f"input {d.name!r}: the model's shape is {f.shape}, declared {d.shape}")
            if isinstance(fd, int) and isinstance(dd, str):
                raise ModelLoadError(
                    f"input {d.name!r}: axis {dd!r} is declared dynamic but the model fixes it to {fd}",
                    hint="export the model with that axis dynamic, or declare the fixed size",
                )
        if f.dtype != d.dtype:
            raise ModelLoadError(f"input {d.name!r}: the model takes {f.dtype}, declared {d.dtype}")
    return list(declared)


# ---------------------------------------------------------------- PyTorch


def torch_loader(src: ModelSource) -> Callable[[], Any]:
    """A function that builds the source's nn.Module (eval mode, checkpoint loaded)."""

    def load() -> Any:
        import torch

        if src.kind == "pt2":
            return _load_pt2(Path(src.source)).module()
        factory = load_callable(src.source, "model factory")
        try:
            module = factory()
        except Exception as e:
            raise ModelLoadError(f"model factory {src.source!r} raised {_cause(e)}",
                                 hint="run the factory on its own to fix it; --debug shows the traceback") from e
        if not isinstance(module, torch.nn.Module):
            raise ModelLoadError(f"model factory {src.source!r} returned {type(module).__name__}, not an nn.Module")
        if src.checkpoint:
            module.load_state_dict(_load_checkpoint(Path(src.checkpoint)))
        return module.eval()

    return load


def _load_pt2(path: Path) -> Any:
    """Load a torch.export archive once ``check_pt2`` found nothing in it that would run code."""
    import torch

    check_pt2(path)
    logging.getLogger("torch.export").setLevel(logging.ERROR)  # it logs a traceback before raising
    try:
        return torch.export.load(str(path))
    except Exception as e:
        raise ModelLoadError(
            f"{path} is not a loadable torch.export file ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
            hint="save it again with torch.export.save from the same torch version",
        ) from None


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            hint="save a plain state_dict (torch.save(model.state_dict(), ...)); pickled objects are refused",
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def export_torch(src: ModelSource, module: Any, out: Path, name: str, sample: dict[str, np.ndarray],
                 atol: float | None = None, torchscript: bool = False) -> Model:
    """Export ``module`` to ONNX at ``out`` and check it against the module on ``sample`` (within ``atol``,
    the recipe's ``export_atol`` unless a pass knows its module rounds differently from ONNX). ``torchscript``
    uses the TorchScript exporter: torch.export has no fake-tensor rule for fake_quantize ops, which the
    TorchScript exporter writes as QuantizeLinear/DequantizeLinear."""
    import torch

    args = tuple(torch.from_numpy(sample[i.name]) for i in src.inputs)
    ref = _reference_outputs(src, module, args)
    outputs = [f"output{k}" if len(ref) > 1 else "output" for k in range(len(ref))]
    if torchscript:
        _run_torchscript_exporter(src, module, args, out, outputs)
    else:
        _run_exporter(src, module, args, out, outputs)
    _strip_provenance(out)
    model = read_onnx(out, list(src.inputs), name)
    got = run_onnx(out, sample)
    check_close(dict(zip(outputs, [r.numpy() for r in ref])), got, atol or src.export_atol, 1e-3, "ONNX export")
    return model


def _reference_outputs(src: ModelSource, module: Any, args: tuple) -> list[Any]:
    """The module's outputs on the sample: a clear error when it cannot run on the declared signature."""
    import torch

    signature = ", ".join(f"{i.name}: {i.dtype}{list(i.shape)}" for i in src.inputs)
    try:
        with torch.no_grad():
            ref = _as_list(module(*args))
    except Exception as e:
        raise ModelLoadError(f"{src.source} fails on the declared inputs ({signature}): {_cause(e)}",
                             hint="declare the dtypes and shapes the module takes (model.inputs or --input)") from e
    bad = [type(r).__name__ for r in ref if not isinstance(r, torch.Tensor)]
    if bad:
        raise ModelLoadError(f"{src.source}: forward returned {', '.join(bad)}, not tensors",
                             hint="forward must return a tensor, or a tuple or dict of tensors")
    return ref


def _cause(e: BaseException) -> str:
    """A third-party exception summarised to one line: its type and the first line of its message."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _run_exporter(src: ModelSource, module: Any, args: tuple, out: Path, outputs: list[str]) -> None:
    import torch

    dims: dict[str, Any] = {}
    dynamic = tuple(
        {k: dims.setdefault(d, torch.export.Dim(d)) for k, d in i.dynamic_axes.items()} or None for i in src.inputs
    )
    names = [i.name for i in src.inputs]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(out), input_names=names, output_names=outputs, opset_version=src.opset,
                dynamo=True, dynamic_shapes=dynamic if any(dynamic) else None, external_data=False, verbose=False,
            )
    except Exception as e:
        raise ModelLoadError(
            f"exporting {src.source} to ONNX failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
            hint="check that the module runs on the declared input signature (names, shapes, dtypes)",
        ) from None


def _run_torchscript_exporter(src: ModelSource, module: Any, args: tuple, out: Path, outputs: list[str]) -> None:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(out), input_names=[i.name for i in src.inputs], output_names=outputs,
                              opset_version=max(13, min(src.opset, 17)), dynamo=False,
                              dynamic_axes={i.name: dict(i.dynamic_axes) for i in src.inputs if i.dynamic_axes})
    except Exception as e:
        raise ModelLoadError(f"exporting {src.source} to ONNX (TorchScript exporter) failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}") from None


def _strip_provenance(path: Path) -> None:
    """Drop what the exporter records about where the code lives (stack traces with absolute paths,
    the user module's path-derived name in namespaces): the model's digest, its version and every
    artifact key must not depend on the folder a checkout sits in. The computation is untouched."""
    import onnx

    proto = onnx.load(str(path))
    graphs = [proto.graph, *(f for f in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.save(proto, str(path))


def _as_list(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _as_list(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _as_list(o)]
    return [out]
