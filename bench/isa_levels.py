"""What a build for a lower x86-64 level costs on this machine: one recipe built for every level this
host runs (TVM compiles for each SKU's own mcpu; ONNX Runtime and OpenVINO pick kernels at run time),
then every build timed interleaved, run by run, in one process. Medians of p50 per round.

    python bench/isa_levels.py [--recipe examples/digits/recipe.yaml] [--rounds 15] [--out bench/results-isa.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["cpu-x86-64-v2", "cpu-x86-64-v3", "cpu-x86-64-v4"]


def _compile(recipe: Path, skus: list[str], store: Path) -> dict:
    args = [sys.executable, "-m", "mlopt.cli", "compile", str(recipe), "--target", ",".join(skus), "--batch-sizes",
            "1,8", "--runs", "3", "--warmup", "1", "--store", str(store), "--out", str(store.parent / "out"), "--json"]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"compile failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _runners(manifest: dict, store: Path) -> dict:
    from mlopt.store import Store
    from mlopt.targets.backends import get_backend

    st, out = Store(store), {}
    for e in manifest["entries"]:
        for c in e["candidates"]:
            if c["status"] == "built" and c["compiled"] == "here":
                art = st.get(c["artifact"]["key"])
                out[f"{e['sku']} {c['backend']}"] = get_backend(c["backend"]).load(art.path, art.meta, 2)
    return out


def _interleaved(runners: dict, feed: dict, rounds: int, per_round: int) -> dict:
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run(feed)
            t = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                run(feed)
                t.append((time.perf_counter() - t0) * 1000)
            samples[name].append(statistics.median(t))
    return {k: round(statistics.median(v), 4) for k, v in samples.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=ROOT / "examples" / "digits" / "recipe.yaml")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results-isa.json")
    a = p.parse_args()
    from mlopt.targets import detect
    from mlopt.targets.catalog import load_catalog

    cat = load_catalog()
    skus = [s for s in LEVELS if detect.host_runs(cat.get(s))[0]]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        manifest = _compile(a.recipe, skus, store)
        runners = _runners(manifest, store)
        inputs = manifest["models"][0]["inputs"]
        results = {}
        for batch in (1, 8):
            rng = np.random.default_rng(0)
            feed = {i["name"]: rng.standard_normal([batch if isinstance(d, str) else d for d in i["shape"]])
                    .astype(i["dtype"]) for i in inputs}
            results[f"b{batch}"] = _interleaved(runners, feed, a.rounds, 20)
    report = {"host": detect.host(), "skus": skus, "p50_ms": results}
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    for batch, row in results.items():
        print(batch, "  ".join(f"{k}: {v:.3f} ms" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
