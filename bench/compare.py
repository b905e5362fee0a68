"""Side-by-side benchmark on the examples, in one run, interleaved: mlopt against every anchor.

For each recipe: `mlopt compile` cold (fresh store) and cached (second run); then the anchors (torch eager,
torch.compile, ONNX Runtime defaults, ONNX Runtime fused + dynamic int8 for BERT-style models, OpenVINO
fp32 defaults, Olive auto-opt int8; bench/anchors.py) and every mlopt build measured here. Each contender
is scored with the recipe's own metric on its evaluation data (mlopt's scoring), then timed at each batch
size in interleaved blocks (each contender runs a block of calls in turn, round after round, with a pause
between blocks so one runtime's spinning threads do not slow the next). Prints medians, accuracy, and the
ratio of mlopt's chosen build to the fastest anchor inside the recipe's accuracy budget, with the goals
met or not; a compile that exits non-zero is a row with its exit code and reason. Writes bench/results.json.

    python bench/compare.py [--examples digits,efficientnet,minilm] [--rounds 15] [--block 5]
    python bench/compare.py --recipes examples/minilm/compress.yaml,... --torch-compile --anchors   # make bench-compress
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import anchors as A

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
CACHED_GOAL_S = 2.0
# issue 16's goals: mlopt's chosen build over the fastest anchor inside the accuracy budget, per batch size
GOALS = {"minilm": {8: 2.0, 1: 1.5}, "efficientnet": {8: 1.5}}


@dataclass(frozen=True)
class Compile:
    """One recipe's `mlopt compile`, cold and cached, and how the cold one ended."""

    cold_s: float
    cached_s: float
    exit_code: int
    reason: str


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, proc


def compile_times(recipe: Path, store: Path, out: Path) -> Compile:
    """Cold then cached compile; a non-zero exit is recorded with the CLI's last error line, not raised."""
    cmd = [sys.executable, "-m", "mlopt.cli", "compile", str(recipe), "--store", str(store), "--out", str(out)]
    cold, proc = timed(cmd)
    cached, _ = timed(cmd)
    return Compile(round(cold, 2), round(cached, 2), proc.returncode, _reason(proc) if proc.returncode else "")


def _reason(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip(" │|") for ln in proc.stderr.splitlines() if ln.strip(" │|")]
    errors = [ln for ln in lines if ln.lower().startswith(("error", "mlopt:"))] or lines or ["no output"]
    return " ".join(errors[-1].split())[:240]


def help_time() -> float:
    cmd = [sys.executable, "-m", "mlopt.cli", "--help"]
    return statistics.median(timed(cmd)[0] for _ in range(5))


# ---------------------------------------------------------------- contenders


def ingested_onnx(store: Path, digest: str | None) -> Path | None:
    """The ONNX file mlopt exported from the recipe's model (the store's ingest step): the manifest's, or
    where the compile failed before writing one, the store's only export."""
    folder = store / "cache" / "ingest"
    found = [p / "model.onnx" for p in (folder.iterdir() if folder.is_dir() else [])
             if digest is None or json.loads((p / "meta.json").read_text())["digest"] == digest]
    return found[0] if len(found) == 1 else None


def anchor_list(recipe: Any, onnx_file: Path, work: Path, args: argparse.Namespace) -> list[A.Anchor]:
    """Every anchor, in table order; those that cannot run here carry their reason."""
    from mlopt.compiler import ingest

    ins = [i.name for i in recipe.model.inputs]
    outs = _onnx_outputs(onnx_file)
    module = ingest.torch_loader(recipe.model)() if recipe.model.kind != "onnx" else None
    found = [A.torch_eager(module, ins, outs) if module is not None else A.not_run("torch eager", "an ONNX source")]
    if args.torch_compile:
        found.append(A.torch_compiled(module, ins, outs) if module is not None else
                     A.not_run("torch.compile", "an ONNX source"))
    found.append(A.ort_defaults(onnx_file, THREADS))
    if args.anchors:
        found += [A.ort_fused_int8(onnx_file, work / "ort-fused", THREADS), A.openvino_defaults(onnx_file, THREADS),
                  A.olive_auto_opt_int8(onnx_file, work, THREADS, print)]
    return found


def _onnx_outputs(onnx_file: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(onnx_file), load_external_data=False).graph.output]


def mlopt_builds(manifest: dict, store: Path) -> list[A.Anchor]:
    """Every mlopt build measured here; the one its SKU chose is flagged ``chosen``."""
    from mlopt.store import Store
    from mlopt.targets.backends import get_backend

    st, found = Store(store), []
    for entry in manifest["entries"]:
        for c in entry["candidates"]:
            if not c.get("measurement"):
                continue
            art = st.get(c["artifact"]["key"])
            runner = get_backend(c["backend"]).load(art.path, art.meta, THREADS)
            found.append(A.Anchor(f"mlopt {entry['sku']} {c['backend']}", runner, build_s=c.get("build_seconds"),
                                  details={"chosen": entry["chosen_backend"] == c["backend"],
                                           "validation": (c.get("validation") or {}).get("status")}))
    return found


# ---------------------------------------------------------------- accuracy and timing


def outputs_on(run: Any, runner: A.Runner) -> dict[str, np.ndarray]:
    from mlopt.compiler.data import concat_outputs

    return concat_outputs([runner(f) for f in run.evaluation.feeds])


def score_all(run: Any, found: list[A.Anchor]) -> tuple[float | None, dict[str, float]]:
    """The reference (the exported model in ONNX Runtime, as mlopt's reference step) and every contender's
    figure, all by mlopt's own metric on the recipe's evaluation data. A contender that fails here is
    dropped to not-run with its reason."""
    from mlopt.compiler.data import score

    ev = run.recipe.data.evaluation
    if ev is None:
        return None, {}
    ort_anchor = next(a for a in found if a.name == "ORT fp32 defaults")
    ref = outputs_on(run, ort_anchor.runner)
    figures = {}
    for a in found:
        if a.runner is None:
            continue
        try:
            figures[a.name] = score(ev, outputs_on(run, a.runner), run.evaluation.labels, ref)
        except Exception as e:  # one contender's broken outputs are its row, not the end of the bench
            a.runner, a.reason = None, f"scoring failed: {A.first_line(e)}"
    return score(ev, ref, run.evaluation.labels, ref), figures


def warm_up(found: list[A.Anchor], feed: dict) -> None:
    """Three calls each; a contender that fails on the benchmark feed drops to not-run with its reason."""
    for a in found:
        try:
            for _ in range(3 if a.runner is not None else 0):
                a.runner(feed)
        except Exception as e:  # e.g. a build with a fixed batch, fed another
            a.runner, a.reason = None, f"failed on the benchmark feed: {A.first_line(e)}"


def interleaved(runs: dict, feed: dict, rounds: int, block: int) -> dict[str, float]:
    """Median latency (ms) per contender, timed in interleaved blocks (after ``warm_up``)."""
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, r in runs.items():
            time.sleep(0.05)
            for _ in range(block):
                t0 = time.perf_counter()
                r(feed)
                samples[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


# ---------------------------------------------------------------- the verdict


def verdict(res: dict, max_drop: float, goals: dict[int, float]) -> dict:
    """mlopt's chosen build over the fastest anchor inside the accuracy budget, per batch size, and the goals."""
    rows, ref = res["contenders"], res["reference"]
    ok = {n: ref is None or (r.get("accuracy") is not None and ref - r["accuracy"] <= max_drop + 1e-12)
          for n, r in rows.items()}
    chosen = next((n for n, r in rows.items() if r.get("chosen")), None)
    anchors = [n for n, r in rows.items() if not n.startswith("mlopt ") and r.get("ms") and ok[n]]
    out: dict[str, Any] = {"chosen": chosen, "chosen_in_budget": bool(chosen and ok[chosen]), "ratios": {}, "goals": {}}
    for b in res["batches"]:
        fastest = min(anchors, key=lambda n: rows[n]["ms"][b], default=None)
        if chosen and fastest and rows[chosen].get("ms"):
            out["ratios"][b] = {"anchor": fastest, "ratio": rows[fastest]["ms"][b] / rows[chosen]["ms"][b]}
    for b, want in goals.items():
        got = out["ratios"].get(str(b)) or out["ratios"].get(b)
        out["goals"][f"b{b} >= {want}x"] = bool(got and out["chosen_in_budget"] and got["ratio"] >= want)
    out["goals"][f"cached rebuild < {CACHED_GOAL_S:.0f} s"] = res["compile"]["cached_s"] < CACHED_GOAL_S
    return out


def search_seconds(manifest: dict) -> float | None:
    """Wall time of the passes' searches (the quantize search's own clock, from the manifest's pass details)."""
    secs = [p["details"]["search"]["seconds"] for p in manifest["models"][0]["passes"]
            if isinstance(p.get("details"), dict) and isinstance(p["details"].get("search"), dict)]
    return round(sum(secs), 1) if secs else None


# ---------------------------------------------------------------- one recipe


def bench_recipe(recipe_path: Path, args: argparse.Namespace) -> dict:
    from mlopt.compiler.pipeline import Run
    from mlopt.recipes import load_recipe
    from mlopt.store import Store

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    comp = compile_times(recipe_path, tmp / "store", tmp / "out")
    print(f"[{recipe_path.parent.name}] compile exit {comp.exit_code}, cold {comp.cold_s} s, cached {comp.cached_s} s "
          f"in {tmp}", flush=True)
    res: dict[str, Any] = {"compile": comp.__dict__, "contenders": {}, "batches": []}
    manifest_file = tmp / "out" / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    recipe = load_recipe(recipe_path)
    onnx_file = ingested_onnx(tmp / "store", manifest["models"][0]["input_digest"] if manifest else None)
    if onnx_file is None:
        return res  # the compile failed before it exported the model: its exit code and reason are the result
    res["search_s"] = search_seconds(manifest) if manifest else None
    found = anchor_list(recipe, onnx_file, tmp, args) + (mlopt_builds(manifest, tmp / "store") if manifest else [])
    run = Run(recipe, Store(tmp / "store"), lambda _: None, inputs=model_inputs(recipe, onnx_file))
    res["reference"], figures = score_all(run, found)
    res["batches"] = [str(b) for b in run.batch_sizes]
    feeds = {b: run.sample_feed(int(b)) for b in res["batches"]}
    for feed in feeds.values():
        warm_up(found, feed)
    live = {a.name: a.runner for a in found if a.runner is not None}
    timings = {b: interleaved(live, feeds[b], args.rounds, args.block) for b in res["batches"]}
    for a in found:
        row = {"accuracy": figures.get(a.name), "build_s": a.build_s, "reason": a.reason, **a.details}
        row["ms"] = {b: timings[b][a.name] for b in res["batches"]} if a.name in live else None
        res["contenders"][a.name] = row
    goals = next((g for k, g in GOALS.items() if k in recipe_path.parent.name), {})
    res["verdict"] = verdict(res, recipe.accuracy.max_drop, goals)
    res["max_drop"] = recipe.accuracy.max_drop
    return res


def model_inputs(recipe: Any, onnx_file: Path) -> tuple:
    """The recipe's declared inputs, or (an ONNX source that declares none) the file's."""
    from mlopt.compiler import ingest

    return tuple(recipe.model.inputs) or tuple(ingest.read_onnx(onnx_file, [], "m").inputs)


# the vector extensions that decide int8 and fp32 speed on x86 (VNNI, AMX) and Arm (dot product, i8mm)
KEY_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def host_cpu() -> dict:
    """The CPU model, its key vector flags and its core count (the figures depend on all three)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info.splitlines()  # noqa: E731
                              if ln.startswith(key)), "")
    flags = set((field("flags") or field("Features")).split())
    return {"model": field("model name") or "unknown", "flags": [f for f in KEY_FLAGS if f in flags],
            "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", default="digits,efficientnet,minilm")
    ap.add_argument("--recipes", default="", help="comma-separated recipe files (instead of --examples)")
    ap.add_argument("--torch-compile", action="store_true", help="add torch.compile as a contender")
    ap.add_argument("--anchors", action="store_true",
                    help="add ORT fused + dynamic int8, OpenVINO fp32 defaults and Olive auto-opt int8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--workdir", default="", help="compile here instead of a fresh temporary folder "
                                                  "(a second run is then not cold)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args()
    recipes = [Path(r).resolve() for r in args.recipes.split(",") if r] or \
        [ROOT / "examples" / ex / "recipe.yaml" for ex in args.examples.split(",")]
    # Byte-compile mlopt first, as a wheel install does: an editable install under PYTHONDONTWRITEBYTECODE
    # (CI sandboxes set it) would otherwise time recompiling mlopt's sources in every cached rebuild.
    compileall.compile_dir(str(ROOT / "mlopt"), quiet=1)
    results = {"help_s": help_time(), "threads": THREADS, "cpu": host_cpu(), "recipes": {}}
    print(f"mlopt --help: {results['help_s']:.3f} s (median of 5); {results['cpu']['model']}, "
          f"{' '.join(results['cpu']['flags'])}")
    for recipe in recipes:
        name = f"{recipe.parent.name}/{recipe.name}"
        load = os.getloadavg()
        results["recipes"][name] = res = bench_recipe(recipe, args)
        res["load_before"] = load
        res["load_after"] = os.getloadavg()
        _print(name, res)
        Path(args.results).write_text(json.dumps(results, indent=2))


# ---------------------------------------------------------------- printing


def _print(name: str, res: dict) -> None:
    c = res["compile"]
    print(f"\n## {name}: mlopt compile cold {c['cold_s']:.1f} s, cached {c['cached_s']:.2f} s, "
          f"search {_num(res.get('search_s'), '.1f', ' s')}; load average {res['load_before'][0]:.1f} "
          f"before, {res['load_after'][0]:.1f} after")
    if c["exit_code"]:
        print(f"mlopt compile exited {c['exit_code']}: {c['reason']}")
    if not res["contenders"]:
        sys.stdout.flush()
        return
    sizes, ref = res["batches"], res.get("reference")
    print(f"reference {_num(ref, '.4f')}, budget: drop at most {res['max_drop']}")
    print("| contender | accuracy | in budget | " + " | ".join(f"b{b} ms" for b in sizes) + " | build s | note |")
    print("|---|---|---|" + "---|" * len(sizes) + "---|---|")
    for n, r in res["contenders"].items():
        inb = "" if r["accuracy"] is None or ref is None else ("yes" if ref - r["accuracy"] <= res["max_drop"] else "no")
        ms = [_num(r["ms"][b], ".3f") if r["ms"] else "-" for b in sizes]
        note = r["reason"] or ("chosen" if r.get("chosen") else "") or _fused(r)
        print(f"| {n} | {_num(r['accuracy'], '.4f')} | {inb} | " + " | ".join(ms) +
              f" | {_num(r['build_s'], '.1f')} | {note} |")
    if c["exit_code"]:
        print("| mlopt compile | - | - | " + " | ".join("-" for _ in sizes) + f" | - | exit {c['exit_code']}: {c['reason']} |")
    _print_verdict(res["verdict"])
    sys.stdout.flush()


def _print_verdict(v: dict) -> None:
    if v["chosen"] is None:
        print("mlopt chose no build here: no ratio")
    for b, r in v["ratios"].items():
        print(f"b{b}: mlopt ({v['chosen']}) is {r['ratio']:.2f}x the fastest anchor in budget ({r['anchor']})"
              + ("" if v["chosen_in_budget"] else " (but mlopt's build is outside the budget)"))
    for goal, met in v["goals"].items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")


def _fused(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in r.get("fused_ops", {}).items())


def _num(x: float | None, fmt: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{unit}"


if __name__ == "__main__":
    np.random.seed(0)
    main()
