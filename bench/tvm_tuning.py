"""TVM untuned vs MetaSchedule-tuned vs ONNX Runtime vs OpenVINO, on the host CPU, in one interleaved run.

For each recipe: two `mlopt compile` runs on the host SKU that differ only in `tuning.trials` (0, then
--trials), sharing one store (so the ONNX Runtime and OpenVINO builds are made once), then every build
loaded and timed in interleaved blocks (as bench/compare.py does) at each of the recipe's batch sizes.
Prints a table of medians and ratios to ONNX Runtime, and the tuning's own cost (seconds, trials that
built and ran); writes bench/results-tvm-tuning.json.

    python bench/tvm_tuning.py RECIPE.yaml [RECIPE.yaml ...] [--trials 64] [--rounds 10] [--block 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import THREADS, interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def variant(recipe: Path, trials: int, work: Path) -> Path:
    """The recipe on the host SKU only, CPU backends ONNX Runtime, OpenVINO and TVM, with ``trials``."""
    doc = yaml.safe_load(recipe.read_text())
    doc.update(targets=["host"], backends={"cpu": ["onnxruntime", "openvino", "tvm"]},
               tuning={**doc.get("tuning", {}), "trials": trials}, output=str(work / f"out-{trials}"),
               store=str(work / "store"))
    doc["name"] = f"{doc['name']}-t{trials}"
    for key in ("calibration", "evaluation"):  # paths stay relative to the recipe's own folder
        if (doc.get("data") or {}).get(key):
            doc["data"][key]["source"] = _absolute(doc["data"][key]["source"], recipe.parent)
    doc["model"]["source"] = _absolute(doc["model"]["source"], recipe.parent)
    out = work / f"{recipe.stem}-t{trials}.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def _absolute(source: str, base: Path) -> str:
    """``file`` or ``file.py:name`` made absolute against the recipe's folder."""
    file, sep, name = source.partition(":")
    return source if Path(file).is_absolute() else str(base / file) + sep + name


def compile_recipe(path: Path) -> tuple[int, float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "mlopt.cli", "compile", str(path)], capture_output=True, text=True,
                         cwd=path.parent, env=dict(os.environ))
    seconds = time.perf_counter() - t0
    out = Path(yaml.safe_load(path.read_text())["output"]) / "manifest.json"
    if not out.exists():
        raise SystemExit(f"{path.name}: exit {res.returncode}, no manifest\n{res.stderr[-2000:]}")
    return res.returncode, seconds, json.loads(out.read_text())


def host_builds(manifest: dict, label: str) -> dict[str, dict]:
    entry = next(e for e in manifest["entries"] if e.get("requested_as") == "host")
    return {f"{c['backend']}{label if c['backend'] == 'tvm' else ''}": c for c in entry["candidates"]}


def runners(builds: dict[str, dict], store: Path) -> dict:
    from mlopt.store import Store
    from mlopt.targets.backends import get_backend

    st, out = Store(store), {}
    for name, c in builds.items():
        if c.get("measurement"):
            art = st.get(c["artifact"]["key"])
            out[name] = get_backend(c["backend"]).load(art.path, art.meta, THREADS)
    return out


def one(recipe: Path, trials: int, rounds: int, block: int) -> dict:
    from mlopt.compiler import ingest
    from mlopt.compiler.pipeline import Run
    from mlopt.recipes import load_recipe
    from mlopt.store import Store

    work = Path(tempfile.mkdtemp(prefix="tvm-tuning-"))
    untuned, tuned = variant(recipe, 0, work), variant(recipe, trials, work)
    rc0, s0, m0 = compile_recipe(untuned)
    rc1, s1, m1 = compile_recipe(tuned)
    builds = {**host_builds(m0, " untuned"), **{k: v for k, v in host_builds(m1, f" tuned {trials}").items()
                                               if k.startswith("tvm")}}
    tuning = (builds.get(f"tvm tuned {trials}") or {}).get("details", {}).get("tuning", {})
    run_of = runners(builds, work / "store")
    r = load_recipe(untuned)
    inputs = tuple(r.model.inputs) or tuple(ingest.read_onnx(Path(r.model.source), [], "m").inputs)
    run = Run(r, Store(work / "store"), lambda _: None, inputs=inputs)
    res = {"recipe": str(recipe), "exit_codes": [rc0, rc1], "compile_s": {"untuned": round(s0, 1),
           "tuned": round(s1, 1)}, "tuning": tuning, "sku": m0["entries"][0]["sku"],
           "not_measured": {k: (v.get("reason") or v.get("status")) for k, v in builds.items() if k not in run_of},
           "accuracy": {k: (v.get("measurement") or {}).get("accuracy") for k, v in builds.items()},
           "batches": {}}
    for b in r.benchmark.batch_sizes:
        res["batches"][b] = interleaved(run_of, run.sample_feed(b), rounds, block)
    return res


def show(name: str, res: dict) -> None:
    t = res["tuning"]
    print(f"\n## {name} on {res['sku']} (exit {res['exit_codes']}); compile untuned {res['compile_s']['untuned']} s, "
          f"tuned {res['compile_s']['tuned']} s")
    for b in t.get("batches", []):
        print(f"  tuning b{b.get('batch_size')}: {b.get('tasks')} tasks, {b.get('trials_ok')} trials ran, "
              f"{b.get('trials_failed')} failed, {b.get('seconds')} s")
    for k, why in res["not_measured"].items():
        print(f"  {k}: not measured ({str(why)[:120]})")
    sizes = list(res["batches"])
    print("| build | " + " | ".join(f"b{b} ms" for b in sizes) + " | " + " | ".join(f"b{b} vs ORT" for b in sizes) + " |")
    print("|---|" + "---|" * (2 * len(sizes)))
    for k in res["batches"][sizes[0]]:
        ms = [res["batches"][b][k] for b in sizes]
        ratio = [res["batches"][b]["onnxruntime"] / res["batches"][b][k] for b in sizes]
        print(f"| {k} | " + " | ".join(f"{m:.3f}" for m in ms) + " | " + " | ".join(f"{x:.2f}x" for x in ratio) + " |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results-tvm-tuning.json"))
    args = ap.parse_args()
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    out = {"threads": THREADS, "trials": args.trials, "machine": platform.processor() or platform.machine(),
           "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4"))),
           "load_before": os.getloadavg(), "recipes": {}}
    for recipe in args.recipes:
        path = Path(recipe).resolve()
        out["recipes"][path.stem] = res = one(path, args.trials, args.rounds, args.block)
        show(path.stem, res)
    out["load_after"] = os.getloadavg()
    Path(args.results).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
