"""Side-by-side benchmark on the three examples, in one run, interleaved.

For each example: `mlopt compile` cold (fresh store) and cached (second run), then at batch 1 and 8
torch eager, ONNX Runtime with default settings, and every mlopt build measured here, timed in
interleaved blocks (each contender runs a block of calls in turn, round after round, with a pause
between blocks so one runtime's spinning threads do not slow the next). Prints medians and ratios
to torch eager; writes bench/results.json.

    python bench/compare.py [--examples digits,efficientnet,minilm] [--rounds 15] [--block 5]
    python bench/compare.py --recipes examples/minilm/compress.yaml,... --torch-compile   # compression runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def compile_times(recipe: Path, store: Path, out: Path) -> tuple[float, float]:
    env = {**os.environ}
    cmd = [sys.executable, "-m", "mlopt.cli", "compile", str(recipe), "--store", str(store), "--out", str(out)]
    return timed(cmd, env), timed(cmd, env)


def help_time() -> float:
    cmd = [sys.executable, "-m", "mlopt.cli", "--help"]
    return statistics.median(timed(cmd, dict(os.environ)) for _ in range(5))


def contenders(recipe_path: Path, store: Path, out: Path, with_compile: bool) -> tuple[dict, object, dict]:
    """name -> runner(feed) for torch eager, ORT defaults and each mlopt build measured here."""
    import onnxruntime as ort
    import torch

    from mlopt.compiler import ingest
    from mlopt.compiler.pipeline import Run
    from mlopt.recipes import load_recipe
    from mlopt.store import Store
    from mlopt.targets.backends import get_backend

    torch.set_num_threads(THREADS)
    recipe = load_recipe(recipe_path)
    manifest = json.loads((out / "manifest.json").read_text())
    module = ingest.torch_loader(recipe.model)()
    names = [i.name for i in recipe.model.inputs]

    def torch_run(feed: dict) -> None:
        with torch.inference_mode():
            module(*[torch.from_numpy(feed[n]) for n in names])

    onnx_in = Path(manifest["store"]) / "cache" / "ingest"
    onnx_file = next(p / "model.onnx" for p in onnx_in.iterdir()
                     if json.loads((p / "meta.json").read_text())["digest"] == manifest["models"][0]["input_digest"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    runs = {"torch eager": torch_run}
    if with_compile:
        compiled = torch.compile(module)

        def compiled_run(feed: dict) -> None:
            with torch.inference_mode():
                compiled(*[torch.from_numpy(feed[n]) for n in names])

        runs["torch.compile"] = compiled_run
    runs["ORT fp32 defaults"] = lambda feed: sess.run(None, feed)
    st = Store(store)
    for entry in manifest["entries"]:
        for c in entry["candidates"]:
            if c.get("measurement"):
                art = st.get(c["artifact"]["key"])
                runs[f"mlopt {entry['sku']} {c['backend']}"] = get_backend(c["backend"]).load(art.path, art.meta, THREADS)
    inputs = tuple(ingest.read_onnx(onnx_file, [], "m").inputs) if not recipe.model.inputs else tuple(recipe.model.inputs)
    run = Run(recipe, st, lambda _: None, inputs=inputs)
    acc = {"reference": manifest["models"][0]["reference_accuracy"],
           "builds": {f"mlopt {e['sku']} {c['backend']}": c["measurement"]["accuracy"]
                      for e in manifest["entries"] for c in e["candidates"] if c.get("measurement")},
           "passes": [{k: p[k] for k in ("name", "status", "accuracy_before", "accuracy_after", "seconds")}
                      for p in manifest["models"][0]["passes"]]}
    return runs, run, acc


def interleaved(runs: dict, feed: dict, rounds: int, block: int) -> dict[str, float]:
    """Median latency (ms) per contender, timed in interleaved blocks."""
    for r in runs.values():  # warm-up
        for _ in range(3):
            r(feed)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, r in runs.items():
            time.sleep(0.05)
            for _ in range(block):
                t0 = time.perf_counter()
                r(feed)
                samples[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", default="digits,efficientnet,minilm")
    ap.add_argument("--recipes", default="", help="comma-separated recipe files (instead of --examples)")
    ap.add_argument("--torch-compile", action="store_true", help="add torch.compile as a contender")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args()
    recipes = [Path(r).resolve() for r in args.recipes.split(",") if r] or \
        [ROOT / "examples" / ex / "recipe.yaml" for ex in args.examples.split(",")]
    results = {"help_s": help_time(), "threads": THREADS, "recipes": {}}
    print(f"mlopt --help: {results['help_s']:.3f} s (median of 5)")
    for recipe in recipes:
        name = f"{recipe.parent.name}/{recipe.name}"
        tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        cold, cached = compile_times(recipe, tmp / "store", tmp / "out")
        runs, run, acc = contenders(recipe, tmp / "store", tmp / "out", args.torch_compile)
        res = {"compile_cold_s": round(cold, 2), "compile_cached_s": round(cached, 2), "accuracy": acc, "batches": {}}
        for b in run.recipe.benchmark.batch_sizes:
            res["batches"][b] = interleaved(runs, run.sample_feed(b), args.rounds, args.block)
        results["recipes"][name] = res
        _print(name, res)
    Path(args.results).write_text(json.dumps(results, indent=2))


def _print(name: str, res: dict) -> None:
    print(f"\n## {name}: mlopt compile cold {res['compile_cold_s']:.1f} s, cached {res['compile_cached_s']:.2f} s")
    ref = res["accuracy"]["reference"]
    if ref:
        print(f"reference {ref['metric']} {ref['value']:.4f}; builds: " + ", ".join(
            f"{k} {v['value']:.4f}" for k, v in res["accuracy"]["builds"].items() if v))
    sizes = list(res["batches"])
    print("| contender | " + " | ".join(f"b{b} ms" for b in sizes) + " | " +
          " | ".join(f"b{b} vs torch" for b in sizes) + " |")
    print("|---|" + "---|" * (2 * len(sizes)))
    first = res["batches"][sizes[0]]
    for contender in first:
        ms = [res["batches"][b][contender] for b in sizes]
        ratios = [res["batches"][b]["torch eager"] / res["batches"][b][contender] for b in sizes]
        print(f"| {contender} | " + " | ".join(f"{m:.3f}" for m in ms) + " | " +
              " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    np.random.seed(0)
    main()
