"""Check mlopt's cross-compiled NVIDIA builds on a real GPU, against torch on the same card.

Two steps, on two machines:

    # here (no GPU): compile EfficientNet-Lite0 for the SKUs, write a small folder to carry over
    python bench/gpu_check.py prepare --sku h200 --sku h100 --out gpu_bundle
    # on the GPU machine (needs numpy, apache-tvm, torch with CUDA; nothing from mlopt)
    python bench/gpu_check.py run --bundle gpu_bundle --out results

`prepare` puts in the folder: the sm_XX TVM builds mlopt made (runtime-only libraries), the model
as a torch.export program (model.pt2, for torch eager and torch.compile on the card), and inputs
with their CPU reference outputs (ONNX Runtime on the ONNX model mlopt compiled). `run` picks the
build for the card's compute capability (refusing to run another architecture's build), loads it
with the TVM runtime alone, checks its outputs against the CPU reference, and times it against
torch eager and torch.compile: medians of CUDA-event timings, interleaved, per batch size. It
writes results.json and results.md. Exit codes: 0 ok, 3 numerics mismatch, 4 no GPU / no build
for this card / a library missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "examples" / "efficientnet" / "recipe.yaml"
BATCHES = (1, 8)
ATOL, RTOL = 2e-3, 2e-3  # fp32 on the GPU vs the CPU: reductions run in another order


# ------------------------------------------------------------------ prepare (CPU machine, mlopt installed)
def prepare(skus: list[str], out: Path, store: Path | None) -> None:
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    manifest = _compile(skus, out, store)
    builds = {}
    for entry in manifest["entries"]:
        tvm = next(c for c in entry["candidates"] if c["backend"] == "tvm")
        if tvm["status"] != "built":
            sys.exit(f"{entry['sku']}: TVM build failed: {tvm['reason']}")
        arch = tvm["details"]["target"]["arch"]
        dest = out / f"tvm-{arch}"
        if not dest.exists():
            shutil.copytree(tvm["artifact"]["path"], dest)
        builds[arch] = {"folder": dest.name, "skus": builds.get(arch, {}).get("skus", []) + [entry["sku"]],
                        "artifact": tvm["artifact"]["key"], "device_code": tvm["details"]["device_code"]}
    rng = np.random.default_rng(0)
    feeds = {b: rng.standard_normal((b, 3, 224, 224)).astype(np.float32) for b in BATCHES}
    refs = _reference(feeds)
    np.savez(out / "reference.npz", **{f"input_b{b}": x for b, x in feeds.items()},
             **{f"output_b{b}": y for b, y in refs.items()})
    _export_torch(out / "model.pt2")
    (out / "bundle.json").write_text(json.dumps({"model": manifest["models"][0]["name"], "builds": builds,
                                                 "batches": list(BATCHES), "atol": ATOL, "rtol": RTOL}, indent=2))
    shutil.copy(__file__, out / "gpu_check.py")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"bundle {out}: {size / 1e6:.1f} MB, builds for {', '.join(builds)}")


def _compile(skus: list[str], out: Path, store: Path | None) -> dict:
    cmd = [sys.executable, "-c", "from mlopt.cli import main; main()", "compile", str(RECIPE), "--backend", "tvm", "--json",
           "--out", str(out / ".mlopt-out")]
    for sku in skus:
        cmd += ["--target", sku]
    if store:
        cmd += ["--store", str(store)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"mlopt compile failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def _reference(feeds: dict) -> dict:
    """CPU reference outputs: the original torch module, eager, on the CPU."""
    import torch

    sys.path.insert(0, str(RECIPE.parent))
    from model import efficientnet_lite0  # the example's factory

    module = efficientnet_lite0()
    with torch.no_grad():
        return {b: module(torch.from_numpy(x)).numpy() for b, x in feeds.items()}


def _export_torch(dest: Path) -> None:
    import torch

    sys.path.insert(0, str(RECIPE.parent))
    from model import efficientnet_lite0

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(efficientnet_lite0(), (torch.randn(2, 3, 224, 224),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(dest))


# ------------------------------------------------------------------ run (GPU machine, no mlopt)
def run(bundle: Path, out: Path, runs: int) -> int:
    import numpy as np

    info = json.loads((bundle / "bundle.json").read_text())
    arch = _gpu_arch()
    if arch is None:
        print("no NVIDIA GPU visible (nvidia-smi finds none): nothing to check here", file=sys.stderr)
        return 4
    if arch not in info["builds"]:
        print(f"this GPU is {arch}; the bundle has builds for {', '.join(info['builds'])} only", file=sys.stderr)
        return 4
    ref = dict(np.load(bundle / "reference.npz"))
    build = bundle / info["builds"][arch]["folder"]
    sys.path.insert(0, str(build))
    import mlopt_runtime  # shipped in the build: mlopt's runtime loaders, nothing else of mlopt

    refused = mlopt_runtime.isa.refusal(json.loads((build / "tvm_entry.json").read_text()).get("requires"),
                                        f"build {build.name}")
    if refused:  # never load host code this CPU cannot run
        print(refused, file=sys.stderr)
        return mlopt_runtime.isa.EXIT_CODE
    try:
        tvm_run = _tvm_runner(build)
    except mlopt_runtime.Unavailable as e:
        print(e, file=sys.stderr)
        return e.exit_code
    rows, worst = [], 0.0
    for b in info["batches"]:
        x = ref[f"input_b{b}"]
        got = tvm_run(x)
        diff = float(np.max(np.abs(got - ref[f"output_b{b}"])))
        worst = max(worst, diff)
        if not np.allclose(got, ref[f"output_b{b}"], atol=info["atol"], rtol=info["rtol"]):
            print(f"batch {b}: the {arch} build differs from the CPU reference by {diff:.3g}", file=sys.stderr)
            return 3
        rows.append({"batch": b, **_time_all(build, tvm_run, bundle / "model.pt2", x, runs)})
    result = {"gpu": _gpu_name(), "arch": arch, "max_abs_diff": worst, "runs": runs, "rows": rows,
              "versions": _versions(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _gpu_arch() -> str | None:
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"sm_{cap[0].replace('.', '')}" if cap else None


def _gpu_name() -> str:
    return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.splitlines()[0]


def _tvm_runner(build: Path):
    """The build's runtime loader, shipped in it (runtime only: TVM_USE_RUNTIME_LIB=1 is set before
    tvm is imported); its VM function is kept to time it on device tensors."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm
    from mlopt_runtime import tvm as loader

    entry = loader.read_entry(build)
    dev = loader.device(entry)  # the build's device (CUDA here), its plugin loaded; refused where absent
    fn = loader.vm(build, entry["library"], dev)[entry["function"]]

    def go(x, keep_on_device: bool = False):
        res = fn(tvm.runtime.tensor(x, dev))
        res = res if hasattr(res, "numpy") else res[0]
        if keep_on_device:
            dev.sync()
            return res
        return res.numpy()

    go.device = dev  # type: ignore[attr-defined]
    go.fn = fn  # type: ignore[attr-defined]
    return go


def _time_all(build: Path, tvm_run, pt2: Path, x, runs: int) -> dict:
    """Medians of CUDA-event timings, the three contenders interleaved run by run."""
    import torch
    import tvm

    program = torch.export.load(str(pt2)).module().cuda().eval()
    compiled = torch.compile(program, mode="max-autotune-no-cudagraphs")
    xt = torch.from_numpy(x).cuda()
    xv = tvm.runtime.tensor(x, tvm_run.device)
    contenders = {
        "mlopt TVM build": lambda: tvm_run.fn(xv),
        "torch eager": lambda: program(xt),
        "torch.compile": lambda: compiled(xt),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.no_grad():
        for fn in contenders.values():  # warm up (torch.compile compiles here)
            for _ in range(5):
                fn()
        torch.cuda.synchronize()
        tvm_run.device.sync()
        for _ in range(runs):
            for name, fn in contenders.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()  # TVM launches on the default stream, as torch does here
                end.synchronize()
                tvm_run.device.sync()
                times[name].append(start.elapsed_time(end))
    return {f"{k} ms": round(statistics.median(v), 4) for k, v in times.items()}


def _versions() -> dict:
    import torch
    import tvm

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "tvm": tvm.__version__}


def _markdown(r: dict) -> str:
    lines = [f"GPU: {r['gpu']} ({r['arch']}); max |TVM - CPU reference| {r['max_abs_diff']:.2e}; "
             f"medians of {r['runs']} CUDA-event timings", "",
             "| batch | mlopt TVM build ms | torch eager ms | torch.compile ms |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['mlopt TVM build ms']} | {row['torch eager ms']} | "
                     f"{row['torch.compile ms']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="compile here and write the bundle")
    pp.add_argument("--sku", action="append", required=True)
    pp.add_argument("--out", type=Path, default=Path("gpu_bundle"))
    pp.add_argument("--store", type=Path)
    pr = sub.add_parser("run", help="on the GPU machine: check and time the bundle's build")
    pr.add_argument("--bundle", type=Path, default=HERE)
    pr.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_results")))
    pr.add_argument("--runs", type=int, default=50)
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare(a.sku, a.out, a.store)
        return 0
    return run(a.bundle, a.out, a.runs)


if __name__ == "__main__":
    sys.exit(main())
