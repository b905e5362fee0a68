"""What `mlopt targets show` prints: a SKU's catalog facts and what each backend can do for it here."""

from __future__ import annotations

from typing import Any

from mlopt.errors import MloptError
from mlopt.targets.catalog import SKU


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
