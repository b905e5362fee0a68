"""What `mlopt targets show` prints: a SKU's catalog facts and what each backend can do for it here."""

from __future__ import annotations

from typing import Any

from mlopt.core.errors import MloptError, UnknownName
from mlopt.targets.catalog import SKU, Catalog


def sku_rows(sku: SKU) -> list[tuple[str, str]]:
    """(field, value) pairs for one SKU, in reading order."""
    peak = sku.peak
    rates = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in (peak.model_dump(exclude={"source"}).items() if peak else [])
                      if v) or "-"
    price = (f"{sku.price.usd_per_hour:g} USD/h ({sku.price.source}, {sku.price.date})" if sku.price
             else f"none ({sku.price_note or 'not in the catalog'})")
    req = sku.requirements
    k8s = sku.kubernetes
    return [
        ("aliases", ", ".join(sku.aliases) or "-"),
        ("vendor / kind", f"{sku.vendor} {sku.kind}"),
        ("architecture", f"{sku.arch} (host {sku.machine})"),
        ("memory", f"{sku.memory_gb:g} GB" if sku.memory_gb else "-"),
        ("bandwidth", f"{sku.memory_bandwidth_gbps:g} GB/s" if sku.memory_bandwidth_gbps else "-"),
        ("peak (dense)", rates + (f"  [{peak.source}]" if peak and peak.source else "")),
        ("precisions", ", ".join(sku.dtypes)),
        ("price", price),
        ("driver minimum", req.driver or "-"),
        ("runtimes", ", ".join(f"{k} >= {v}" for k, v in req.runtimes.items()) or "-"),
        ("cpu flags", ", ".join(req.cpu_flags) or "-"),
        ("base image", sku.base_image or "-"),
        ("kubernetes", f"resource {k8s.resource or '-'}; node selector "
                       + (", ".join(f"{k}={v}" for k, v in k8s.node_selector.items()) or "-")),
        ("driver management", k8s.operator or "-"),
        ("ray accelerator", f"accelerator_type:{sku.ray_accelerator}" if sku.ray_accelerator else "-"),
        ("backends (in order)", ", ".join(sku.backends)),
        ("TVM target", str(sku.tvm_target) if sku.tvm_target else "-"),
        ("ONNX Runtime providers", ", ".join(sku.onnxruntime_providers)),
        ("device match", ", ".join(sku.device.match) or "-"),
    ]


def availability_rows(sku: SKU) -> list[dict[str, Any]]:
    """For each of the SKU's backends: can it build here (here / cross / on-device / no), and why."""
    from mlopt.targets import detect
    from mlopt.targets.backends import get_backend

    runs, _ = detect.host_runs(sku)
    rows = []
    for name in sku.backends:
        try:
            a = get_backend(name).availability(sku, runs)
            rows.append({"backend": name, "build": a.build, "run": a.run, "reason": a.reason})
        except (MloptError, ImportError) as e:
            rows.append({"backend": name, "build": "no", "run": False, "reason": str(e)})
    return rows


def here_rows(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """Per SKU: does this machine run its code (validate and measure it here) or only cross-compile for
    it, and why; ``host`` marks the SKU the target 'host' resolves to."""
    from mlopt.targets import detect

    try:
        host = detect.host_sku(catalog).name
    except UnknownName:
        host = None
    rows = {}
    for sku in catalog.skus:
        runs, why = detect.host_runs(sku)
        rows[sku.name] = {"runs": runs, "host": sku.name == host, "reason": why, "short": _short(sku, runs)}
    return rows


def _short(sku: SKU, runs: bool) -> str:
    from mlopt.runtime import isa

    if runs:
        return ""
    if sku.needs_gpu:
        return "no such GPU here"
    lack = isa.missing(sku.requires)
    return f"{sku.machine} code" if lack and lack[0].startswith("machine:") else f"lacks {', '.join(lack)}"


def catalog_table(catalog: Catalog, here: dict[str, dict[str, Any]]) -> Any:
    """The catalog as a rich table, with what this machine does for each SKU."""
    from rich.table import Table

    t = Table(title="SKU catalog")
    for col in ("name", "kind", "vendor", "arch", "memory GB", "fp16 TFLOPS", "$/hour", "backends", "this machine"):
        t.add_column(col)
    for s in catalog.skus:
        fp16 = s.peak.fp16_tflops if s.peak else None
        h = here[s.name]
        state = ("runs (host)" if h["host"] else "runs") if h["runs"] else f"cross-compiles: {h['short']}"
        t.add_row(s.name, s.kind, s.vendor, s.arch, f"{s.memory_gb:g}" if s.memory_gb else "-",
                  f"{fp16:g}" if fp16 else "-", f"{s.price.usd_per_hour:g}" if s.price else "-",
                  ", ".join(s.backends), state)
    return t
