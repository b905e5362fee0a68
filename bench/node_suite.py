"""Every non-expanded ONNX backend node test on mlopt's TVM backend, host SKU: pass rate, failures by
class (whose failure: mlopt's, TVM's frontend or lowering, wrong numerics, a stated refusal), per-op table.

Each test builds a one-node model with ``TVMBackend.build`` (untuned, in the worker's process:
``ISOLATE_CPU_BUILDS = False``, as tests/test_tvm.py does), loads it with the runtime loader and
compares with ONNX's reference outputs and tolerances. One worker process runs the tests one after
another; a test past ``--timeout`` seconds, or one that kills the worker, is recorded and the
worker restarted.

Failure classes (tests/onnx_node_backend.py): ``mlopt: ...`` is mlopt's own failure on a valid model
(the count that must be zero); ``refused: ...`` is a stated one-line refusal with its exit code (a type
mlopt cannot feed or TVM cannot return); ``TVM frontend: ...`` is TVM's ONNX importer (an operator it
lacks, one that needs a constant where the test feeds a runtime input, other import errors);
``TVM: ...`` an error raised inside TVM's lowering or runtime; ``TVM result: wrong ...`` a build that
ran and answered otherwise than ONNX's reference (shape, dtype, numerics, number of outputs).

    nice -n 10 python bench/node_suite.py --label after          # writes bench/results-node-suite.json
    python bench/node_suite.py --label before --code /tmp/main   # mlopt imported from another checkout
    python bench/node_suite.py -k '^test_(reshape|shape)' --label try --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results-node-suite.json"


def _paths(code: Path) -> None:
    sys.path[:0] = [str(code), str(ROOT / "tests")]


def node_cases(pattern: str | None) -> list[Any]:
    """The non-expanded node TestCases (onnx generates their models and data in memory)."""
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in load_model_tests(kind="node") if "_expanded" not in c.name]
    return sorted((c for c in cases if not pattern or re.search(pattern, c.name)), key=lambda c: c.name)


# ---------------------------------------------------------------- worker


def worker(conn: Any, code: str, log: str) -> None:
    """Run the case files sent on ``conn``, answering each with an Outcome as a dict."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # TVM's and the build's chatter goes to the log, not the summary
    _paths(Path(code))
    warnings.simplefilter("ignore")
    import onnx_node_backend as nb

    import mlopt.targets.tvm

    mlopt.targets.tvm.ISOLATE_CPU_BUILDS = False
    backend = nb.backend()
    scratch = Path(tempfile.mkdtemp(prefix="mlopt-node-suite-"))
    tempfile.tempdir = str(scratch)
    conn.send("ready")  # the per-test timeout starts after the imports
    while True:
        path = conn.recv()
        if path is None:
            return
        with open(path, "rb") as f:
            case = pickle.load(f)
        print(f"== {case.name}", flush=True)
        t0 = time.perf_counter()
        out = nb.run_case(case, backend)
        conn.send({**out.__dict__, "seconds": round(time.perf_counter() - t0, 2)})
        for child in scratch.iterdir():
            shutil.rmtree(child, ignore_errors=True)


class Pool:
    """One worker process at a time, restarted after a timeout or a crash."""

    def __init__(self, code: Path, log: Path):
        self.ctx, self.code, self.log, self.proc, self.conn = multiprocessing.get_context("spawn"), code, log, None, None

    def run(self, name: str, op: str, path: Path, timeout: float) -> dict[str, Any]:
        if self.proc is None:
            self.conn, child = self.ctx.Pipe()
            self.proc = self.ctx.Process(target=worker, args=(child, str(self.code), str(self.log)), daemon=True)
            self.proc.start()
            child.close()  # the worker's end: its death is then EOF here, not a silent wait
            if not self.conn.poll(600) or self.conn.recv() != "ready":
                raise SystemExit(f"the worker did not start; see {self.log}")
        t0 = time.perf_counter()
        self.conn.send(str(path))
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
            kind, reason = "timeout", f"no result in {timeout:g} s (build or run)"
        except (EOFError, ConnectionResetError):
            self.proc.join(5)
            kind, reason = "crash", f"the worker died (exit code {self.proc.exitcode})"
        self.stop()
        return {"name": name, "op": op, "status": "fail", "kind": kind, "reason": reason,
                "seconds": round(time.perf_counter() - t0, 2)}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = self.conn = None


# ---------------------------------------------------------------- report


def cpu_flags() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", text, re.M) or re.search("()", "")).group(1).split())
    keep = sorted(f for f in flags if re.match(r"(avx|fma|sse4|f16c|amx|bmi)", f))
    return {"model": model.group(1) if model else "", "flags": keep, "cores": os.cpu_count()}


def summarise(results: list[dict[str, Any]], wall: float, code: Path) -> dict[str, Any]:
    import onnx

    from mlopt.core.util import package_version

    import onnx_node_backend as nb

    results = [{**r, "kind": nb.refine(r["kind"], r["reason"])} if r["status"] != "pass" else r for r in results]
    passed = sum(r["status"] == "pass" for r in results)
    by_kind = collections.Counter(r["kind"] for r in results if r["status"] != "pass")
    per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        per_op[r["op"]][r["status"]] += 1
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code": str(code), "onnx": onnx.__version__, "apache-tvm": package_version("apache-tvm"),
        "sku": nb.host_sku().name, "cpu": cpu_flags(), "wall_s": round(wall, 1),
        "total": len(results), "pass": passed, "fail": len(results) - passed,
        "pass_rate": round(passed / max(len(results), 1), 4),
        "fail_by_class": dict(by_kind.most_common()),
        "mlopt_side": sum(n for k, n in by_kind.items() if k.startswith("mlopt:")),
        "stated_refusals": sum(n for k, n in by_kind.items() if k.startswith("refused:")),
        "per_op": {op: {"pass": c["pass"], "total": sum(c.values())} for op, c in sorted(per_op.items())},
        "failures": [{k: r[k] for k in ("name", "op", "kind", "reason")} for r in results if r["status"] != "pass"],
    }


def write(out: Path, label: str, summary: dict[str, Any]) -> None:
    """Add (or replace) the run ``label`` in ``out``, keeping the other runs (before/after)."""
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("about", __doc__.strip().splitlines()[0])
    doc.setdefault("runs", {})[label] = summary
    out.write_text(compact_json(doc) + "\n")


def compact_json(doc: Any) -> str:
    """Indented JSON with each innermost object (a per-op row, a failure) on one line."""
    text = json.dumps(doc, indent=1)
    return re.sub(r"\{\n\s*([^{}\[\]]*?)\n\s*\}",
                  lambda m: "{" + " ".join(line.strip() for line in m.group(1).splitlines()) + "}", text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="the run's name in the results (before, after, ...)")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose mlopt package is imported")
    ap.add_argument("-k", dest="pattern", help="only tests whose name matches this regex")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per test (build and run)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    _paths(args.code.resolve())
    import onnx_node_backend as nb

    cases = node_cases(args.pattern)
    work = Path(tempfile.mkdtemp(prefix="node-suite-"))
    log = args.out.with_suffix(".log") if args.out != OUT else work / "worker.log"
    pool, results, t0 = Pool(args.code.resolve(), log), [], time.perf_counter()
    print(f"{len(cases)} node tests; worker log {log}", flush=True)
    crashes = 0
    try:
        for k, case in enumerate(cases):
            path = work / f"{k}.pkl"
            path.write_bytes(pickle.dumps(case))
            results.append(pool.run(case.name, nb.op_of(case), path, args.timeout))
            path.unlink()
            crashes = crashes + 1 if results[-1]["kind"] == "crash" else 0
            if crashes >= 5:
                raise SystemExit(f"the worker died on 5 tests in a row; see {log}")
            mark = "." if results[-1]["status"] == "pass" else "F"
            print(mark, end="\n" if (k + 1) % 100 == 0 else "", flush=True)
    finally:
        pool.stop()
    summary = summarise(results, time.perf_counter() - t0, args.code.resolve())
    write(args.out, args.label, summary)
    print(f"\n{summary['pass']}/{summary['total']} = {summary['pass_rate']:.1%} pass "
          f"({summary['mlopt_side']} failures on mlopt's side, {summary['stated_refusals']} stated refusals); "
          f"{summary['wall_s']:.0f} s")
    for kind, n in summary["fail_by_class"].items():
        print(f"  {n:5d}  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
