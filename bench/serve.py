"""Serving benchmark: the image's entry point on loopback, against the in-process runtime.

Compiles the digits example (or takes --manifest/--store), writes the host SKU's serve.json and
serves it with the current entry point and, with --old-entry FILE, a previous one (for example
``git show 696e09b:mlopt/package/entry.py > /tmp/old_entry.py``). For 1/4/16/64 keep-alive clients
sending batch-1 JSON requests for --seconds each: p50/p99 latency, throughput, errors, connection
resets and the server's RSS. In-process: the same build's batch-1 p50 and the best measured batch's
throughput. Loopback only, bounded in time; writes bench/results-serve.json.

    python bench/serve.py [--old-entry /tmp/old_entry.py] [--seconds 3] [--clients 1,4,16,64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployable(manifest: Path | None, store: Path | None, tmp: Path):
    from mlopt.manifest import read_manifest
    from mlopt.package.serving import deployables
    from mlopt.store import Store
    from mlopt.targets.catalog import load_catalog

    if manifest is None:
        subprocess.run([sys.executable, "-m", "mlopt.cli", "compile", str(ROOT / "examples/digits/recipe.yaml"),
                        "--store", str(tmp / "store"), "--out", str(tmp / "out")], check=True,
                       stdout=subprocess.DEVNULL)
        manifest, store = tmp / "out" / "manifest.json", tmp / "store"
    items, _ = deployables(read_manifest(manifest), Store(store), load_catalog())
    return items[0]


def in_process(d, seconds: float) -> dict:
    from mlopt.runtime.served import load_runner
    from mlopt.package.serving import ServingOptions, serve_spec

    run = load_runner(serve_spec(d, ServingOptions()), d.artifact.path)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and len(times) < 200_000:
        t = time.perf_counter()
        run({"x": x})
        times.append(time.perf_counter() - t)
    best = max((b.throughput_per_s or 0.0, b.batch_size) for b in d.entry.measurement.batches)
    return {"p50_ms": 1000 * float(np.median(times)), "best_batch": best[1], "best_throughput_per_s": best[0]}


def serve(entry: Path, spec: Path, model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(entry), "--serving", str(spec), "--model-dir", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{entry} did not become ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load(port: int, clients: int, seconds: float, body: bytes) -> dict:
    lat: list[float] = []
    errors, resets = [0], [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        conn, mine = http.client.HTTPConnection("127.0.0.1", port, timeout=30), []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                conn.request("POST", "/v2/models/digits-cnn/infer", body=body,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    mine.append(time.perf_counter() - t)
                else:
                    errors[0] += 1
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                resets[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            except OSError:
                errors[0] += 1
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    return {"clients": clients, "requests": len(lat), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_per_s": len(lat) / wall,
            "errors": errors[0], "resets": resets[0]}


def executions(port: int) -> tuple[int, int] | None:
    """(inferences, executions) from the statistics endpoint; None where the server has none."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/v2/models/stats")
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            return None
        s = json.loads(body)["model_stats"][0]
        return s["inference_count"], s["execution_count"]
    except (OSError, ValueError, KeyError):
        return None


def bench_server(name: str, entry: Path, spec: Path, model_dir: Path, args: argparse.Namespace, body: bytes) -> list[dict]:
    port = _port()
    proc = serve(entry, spec, model_dir, port)
    rows = []
    try:
        load(port, 1, 0.5, body)  # warm-up
        for n in args.clients:
            before, counts = rss_mb(proc.pid), executions(port)
            row = {"server": name, **load(port, n, args.seconds, body), "rss_mb_before": round(before, 1),
                   "rss_mb_after": round(rss_mb(proc.pid), 1)}
            after = executions(port)
            if counts and after and after[1] > counts[1]:
                row["mean_batch"] = round((after[0] - counts[0]) / (after[1] - counts[1]), 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # the old entry point ignores SIGTERM as PID 1 only; be sure
            proc.kill()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path)
    p.add_argument("--store", type=Path)
    p.add_argument("--old-entry", type=Path, help="a previous entry.py to compare with")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--sla-ms", type=float, default=None, help="serving.latency_sla_ms for the batching plan")
    args = p.parse_args()
    from mlopt.package import entry
    from mlopt.package.serving import ServingOptions, serve_spec

    with tempfile.TemporaryDirectory() as tmp:
        d = deployable(args.manifest, args.store, Path(tmp))
        spec = serve_spec(d, ServingOptions(latency_sla_ms=args.sla_ms))
        (Path(tmp) / "serve.json").write_text(json.dumps(spec))
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]}).encode()
        result = {"backend": d.backend, "sku": d.sku.name, "batching": spec["batching"],
                  "in_process": in_process(d, 2.0), "rows": []}
        print(json.dumps({"in_process": result["in_process"], "batching": spec["batching"]}), flush=True)
        servers = [("new", Path(entry.__file__))] + ([("old", args.old_entry)] if args.old_entry else [])
        for name, path in servers:
            result["rows"] += bench_server(name, path, Path(tmp) / "serve.json", d.artifact.path, args, body)
    (ROOT / "bench" / "results-serve.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
