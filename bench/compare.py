"""Side-by-side benchmark on the three examples, in one run, interleaved.

For each example: `mlopt compile` cold (fresh store) and cached (second run), then at batch 1 and 8
torch eager, ONNX Runtime with default settings, and every mlopt build measured here, timed in
interleaved blocks (each contender runs a block of calls in turn, round after round, with a pause
between blocks so one runtime's spinning threads do not slow the next). Prints medians and ratios
to torch eager; writes bench/results.json.

    python bench/compare.py [--examples digits,efficientnet,minilm] [--rounds 15] [--block 5]
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


def compile_times(example: str, store: Path, out: Path) -> tuple[float, float]:
    env = {**os.environ}
    cmd = [sys.executable, "-m", "mlopt.cli", "compile", str(ROOT / "examples" / example / "recipe.yaml"),
           "--store", str(store), "--out", str(out)]
    return timed(cmd, env), timed(cmd, env)


def help_time() -> float:
    cmd = [sys.executable, "-m", "mlopt.cli", "--help"]
    return statistics.median(timed(cmd, dict(os.environ)) for _ in range(5))


def contenders(example: str, store: Path, out: Path) -> tuple[dict, object]:
    """name -> runner(feed) for torch eager, ORT defaults and each mlopt build measured here."""
    import onnxruntime as ort
    import torch

    from mlopt.compiler import ingest
    from mlopt.compiler.pipeline import Run
    from mlopt.recipes import load_recipe
    from mlopt.store import Store
    from mlopt.targets.backends import get_backend

    torch.set_num_threads(THREADS)
    recipe = load_recipe(ROOT / "examples" / example / "recipe.yaml")
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
    runs = {"torch eager": torch_run, "ORT defaults": lambda feed: sess.run(None, feed)}
    st = Store(store)
    for entry in manifest["entries"]:
        for c in entry["candidates"]:
            if c.get("measurement"):
                art = st.get(c["artifact"]["key"])
                runs[f"mlopt {entry['sku']} {c['backend']}"] = get_backend(c["backend"]).load(art.path, art.meta, THREADS)
    run = Run(recipe, st, lambda _: None)
    run.inputs = tuple(ingest.read_onnx(onnx_file, [], "m").inputs) if not recipe.model.inputs else tuple(recipe.model.inputs)
    return runs, run


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
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=5)
    args = ap.parse_args()
    results = {"help_s": help_time(), "threads": THREADS, "examples": {}}
    print(f"mlopt --help: {results['help_s']:.3f} s (median of 5)")
    for ex in args.examples.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{ex}-"))
        cold, cached = compile_times(ex, tmp / "store", tmp / "out")
        runs, run = contenders(ex, tmp / "store", tmp / "out")
        res = {"compile_cold_s": round(cold, 2), "compile_cached_s": round(cached, 2), "batches": {}}
        for b in (1, 8):
            feed = run.sample_feed(b)
            res["batches"][b] = interleaved(runs, feed, args.rounds, args.block)
        results["examples"][ex] = res
        _print(ex, res)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2))


def _print(ex: str, res: dict) -> None:
    print(f"\n## {ex}: mlopt compile cold {res['compile_cold_s']:.1f} s, cached {res['compile_cached_s']:.2f} s")
    print("| contender | b1 ms | b8 ms | b1 vs torch | b8 vs torch |")
    print("|---|---|---|---|---|")
    b1, b8 = res["batches"][1], res["batches"][8]
    for name in b1:
        print(f"| {name} | {b1[name]:.3f} | {b8[name]:.3f} | {b1['torch eager'] / b1[name]:.2f}x | "
              f"{b8['torch eager'] / b8[name]:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    np.random.seed(0)
    main()
