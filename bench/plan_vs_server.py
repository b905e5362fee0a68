"""The plan's simulator against the real server: measured and simulated latency of one replica.

For each model (the digits example, and EfficientNet-Lite0 whose service time is well above the
~1 ms HTTP overhead, so queueing shows), on the host SKU with ONNX Runtime and measured batch curves:

1. compile (or reuse ``--work``'s store and manifests) and write the serve.json an image would carry
   (``Deployable`` + ``serve_spec``, with a latency SLA of ``--sla-factor`` x the largest measured
   batch's p99 + the default server overhead, so the batching rule the plan and the image share
   gives max batch = that batch, queue delay = its fill time p50 x (b - 1) / b);
2. start the image's entry point on 127.0.0.1 (a free port) and measure its per-request overhead:
   one keep-alive client, closed loop, batch 1: the server's p50 minus the curve's batch-1 p50;
3. at each planned rate (``--fractions`` of the replica's capacity as the plan computes it:
   ``replica_capacity`` with the SLA, Poisson arrivals and the measured overhead; a plan routes up to
   1 / (1 + headroom) of it, 0.9 by default, to a replica at the peak),
   drive an **open-loop** Poisson load: requests are sent at their scheduled times over a pool of
   keep-alive HTTP/1.1 connections (a new one opened when all are busy), never after the previous
   answer; bounded by ``--requests`` and ``--seconds``; batch-1 requests with binary tensors;
4. run the plan's simulator (``mlopt.plan.simulate.replica_latencies``) on the same pool: 1 replica,
   the serve.json's max batch and queue delay, the manifest's curve, on the very send times the
   server saw (and, as a check of the sample's noise, on 50,000 fresh Poisson arrivals at the rate),
   with and without the server's overhead as its one-at-a-time stage ahead of the batcher (as the
   plan simulates it, with the measured figure; ``ratio_p99_server_model`` is the goal's ratio);
5. print model, rate, measured p50/p99, simulated p50/p99 and the ratio of the p99s (measured /
   simulated) three ways: the simulator as it is (the in-process curve only), with the measured
   overhead's p50 added to every simulated request, and with a draw from the measured overhead's
   distribution added to each; then the mean batch each side ran, and errors.

The simulator knows nothing of HTTP: the in-process curve lacks the protocol, the event loop and the
hand-offs between threads, so the first ratio shows what the plan misses as it stands; the overhead
is measured separately (step 2), never fitted to the load runs.

Loopback only, bounded in count and time; writes bench/results-plan-vs-server.json with the CPU.

    python bench/plan_vs_server.py [--work DIR] [--seconds 30] [--requests 3000] [--fractions 0.5,0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlopt.package.serving import Deployable, ServingOptions, serve_spec  # noqa: E402
from mlopt.plan.curve import Curve  # noqa: E402
from mlopt.plan.inputs import ModelTraffic  # noqa: E402
from mlopt.plan.queueing import capacity_at  # noqa: E402
from mlopt.plan.simulate import WARMUP, arrivals, replica_latencies  # noqa: E402
from mlopt.runtime.batching import DEFAULT_SERVER_OVERHEAD_MS  # noqa: E402

DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
             "uint8": "UINT8", "int8": "INT8", "bool": "BOOL"}
MODELS = {  # name -> (recipe, compile arguments beyond --target host --backend onnxruntime)
    "digits": ("examples/digits/recipe.yaml", ["--batch-sizes", "1,2,4,8"]),
    "efficientnet": ("examples/efficientnet/recipe.yaml", ["--batch-sizes", "1,2,4,8", "--runs", "30"]),
}
LONG_RUN = 50_000  # arrivals of the reference simulation
POOL = 16  # keep-alive connections opened before the load starts


# ------------------------------------------------------------------ builds and serve.json
def compile_model(name: str, work: Path) -> Path:
    """The model's manifest on the host SKU with ONNX Runtime, compiled unless ``work`` has it."""
    recipe, extra = MODELS[name]
    out = work / name
    manifest = out / "manifest.json"
    if not manifest.exists():
        subprocess.run([sys.executable, "-m", "mlopt.cli", "compile", str(ROOT / recipe), "--target", "host",
                        "--backend", "onnxruntime", *extra, "--store", str(work / "store"), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return manifest


def host_deployable(manifest: Path, store: Path) -> Deployable:
    from mlopt.manifest import read_manifest
    from mlopt.package.serving import deployables
    from mlopt.store import Store
    from mlopt.targets.catalog import load_catalog
    from mlopt.targets.detect import host_sku

    catalog = load_catalog()
    items, _ = deployables(read_manifest(manifest), Store(store), catalog, (host_sku(catalog).name,))
    return items[0]


def planned_options(d: Deployable, sla_factor: float) -> ServingOptions:
    """A latency SLA of ``sla_factor`` x the largest measured batch's p99 + the server's default
    overhead: with a factor of at least 2 the batching rule (``batch_rule``, as the plan and the
    image both have it) merges up to that batch, its fill time p50 x (b - 1) / b as the queue delay."""
    top = max(d.entry.measurement.batches, key=lambda b: b.batch_size)
    return ServingOptions(latency_sla_ms=sla_factor * top.p99_ms + DEFAULT_SERVER_OVERHEAD_MS,
                          server_overhead_ms=DEFAULT_SERVER_OVERHEAD_MS)


def curve_of(d: Deployable) -> Curve:
    curve = Curve.from_measurement(d.entry.measurement)
    assert curve is not None, f"{d.model.name} has no measured batch curve on {d.sku.name}"
    return curve


def request_body(spec: dict[str, Any], seed: int = 0) -> tuple[bytes, int]:
    """A batch-1 request with binary input tensors asking binary outputs, and its JSON header's length."""
    rng = np.random.default_rng(seed)
    inputs, blobs = [], []
    for i in spec["inputs"]:
        shape = [1] + [d if isinstance(d, int) else 1 for d in i["shape"][1:]]
        blob = rng.random(shape).astype(i["dtype"]).tobytes()
        inputs.append({"name": i["name"], "shape": shape, "datatype": DATATYPES[i["dtype"]],
                       "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(blobs), len(header)


def http_request(spec: dict[str, Any], port: int, body: bytes, head: int) -> bytes:
    """The raw HTTP/1.1 request (keep-alive) for ``body``."""
    return (f"POST /v2/models/{spec['model']}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {head}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# ------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(spec: dict[str, Any], model_dir: Path, tmp: Path) -> Iterator[int]:
    """The image's entry point serving ``spec`` on 127.0.0.1; yields its port."""
    from mlopt.package import entry

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"serve-{spec['model']}.json"
    path.write_text(json.dumps(spec))
    port = free_port()
    proc = subprocess.Popen([sys.executable, entry.__file__, "--serving", str(path), "--model-dir", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        end = time.monotonic() + 120
        while _get(port, "/v2/health/ready")[0] != 200:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the server of {spec['model']} did not become ready (exit {proc.poll()})")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _get(port: int, path: str) -> tuple[int, Any]:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, json.loads(data) if data else None
    except (OSError, ValueError):
        return 0, None


def batch_counts(port: int) -> dict[int, list[int]]:
    """The server's executions by batch size: size -> [runs, compute ns] (statistics extension)."""
    _, body = _get(port, "/v2/models/stats")
    rows = body["model_stats"][0]["batch_stats"]
    return {r["batch_size"]: [r["compute_infer"]["count"], r["compute_infer"]["ns"]] for r in rows}


def counts_since(before: dict[int, list[int]], after: dict[int, list[int]]) -> dict[int, list[int]]:
    return {b: [c - before.get(b, [0, 0])[0], ns - before.get(b, [0, 0])[1]] for b, (c, ns) in after.items()
            if c > before.get(b, [0, 0])[0]}


def mean_batch(counts: dict[int, list[int]]) -> float:
    runs = sum(c for c, _ in counts.values())
    return sum(b * c for b, (c, _) in counts.items()) / runs if runs else 0.0


# ------------------------------------------------------------------ load
@dataclass
class Load:
    """What an open-loop run saw: per answered request its send time and latency (s)."""

    sent: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)  # send time - scheduled time
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    opened: int = 0  # connections opened beyond the initial pool
    unfinished: int = 0


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if m:
        await reader.readexactly(int(m.group(1)))
    return status


async def open_loop(port: int, raw: bytes, schedule: np.ndarray, timeout: float) -> Load:
    """Send ``raw`` at each time of ``schedule`` (s from the start), whatever is still in flight."""
    loop = asyncio.get_running_loop()
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(POOL)]
    load = Load()

    async def one(at: float) -> None:
        conn = idle.pop() if idle else None
        if conn is None:
            conn = await asyncio.open_connection("127.0.0.1", port)
            load.opened += 1
        reader, writer = conn
        sent = loop.time()
        try:
            writer.write(raw)
            await writer.drain()
            status = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            load.errors += 1
            writer.close()
            return
        done = loop.time()
        load.statuses[status] = load.statuses.get(status, 0) + 1
        if status != 200:
            load.errors += 1
        else:
            load.sent.append(sent - t0)
            load.latency.append(done - sent)
            load.late.append(sent - t0 - at)
        idle.append(conn)

    t0 = loop.time() + 0.05
    tasks = []
    for at in schedule.tolist():
        wait = t0 + at - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(at)))
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    load.unfinished = len(pending)
    load.errors += len(pending)
    for reader, writer in idle:
        writer.close()
    return load


def closed_loop(port: int, raw: bytes, n: int) -> np.ndarray:
    """Latencies (s) of ``n`` requests sent one after another on one keep-alive connection."""
    async def run() -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out = []
        for _ in range(n):
            t = time.perf_counter()
            writer.write(raw)
            await writer.drain()
            status = await _read_response(reader)
            if status == 200:
                out.append(time.perf_counter() - t)
        writer.close()
        return out

    return np.array(asyncio.run(run()))


def poisson_schedule(rate: float, n: int, seed: int) -> np.ndarray:
    """``n`` Poisson arrival times at ``rate`` (the simulator's own ``arrivals``), starting at 0."""
    t = arrivals(_poisson(rate), rate, n, np.random.default_rng(seed))
    return t - t[0]


def _poisson(rate: float) -> ModelTraffic:
    return ModelTraffic(mean_rps=rate, peak_rps=rate, p99_sla_ms=1e9)


# ------------------------------------------------------------------ one comparison
@dataclass(frozen=True)
class Setting:
    requests: int = 3000
    seconds: float = 30.0
    overhead_requests: int = 300
    seed: int = 0


def overhead(port: int, raw: bytes, curve: Curve, delay_s: float, n: int) -> dict[str, Any]:
    """The server's p50 at one client (closed loop, batch 1) minus what the simulator gives such a
    request (the queue delay, as a lone request waits all of it, plus the curve's batch-1 p50): what
    HTTP, the protocol and the hand-offs between threads add per request, which the in-process curve
    lacks. ``samples_s``: every such difference, its distribution (not in the JSON)."""
    before = batch_counts(port)
    lat = closed_loop(port, raw, n)
    ran = counts_since(before, batch_counts(port))
    curve_p50 = float(curve.at(1)[0][()])
    compute = ran.get(1, [0, 0])
    extra = np.maximum(lat - delay_s - curve_p50, 0.0)
    return {"server_p50_ms": 1e3 * float(np.median(lat)), "server_p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "curve_p50_ms": 1e3 * curve_p50, "queue_delay_ms": 1e3 * delay_s,
            "server_compute_mean_ms": 1e-6 * compute[1] / compute[0] if compute[0] else float("nan"),
            "http_ms": 1e3 * (float(np.median(lat)) - delay_s - compute[1] / compute[0] * 1e-9) if compute[0] else None,
            "overhead_ms": 1e3 * float(np.median(extra)), "overhead_p99_ms": 1e3 * float(np.percentile(extra, 99)),
            "samples_s": extra}


def capacity(curve: Curve, batching: dict[str, Any], sla_s: float, over_s: float) -> tuple[float, str]:
    """One replica's capacity (requests/s) as the plan has it: the queueing model's highest Poisson
    rate within the SLA (``capacity_at``) with the serve.json's batching, the measured overhead as
    the server's one-at-a-time stage ahead of the batcher (HTTP's part: latency at one client less
    the queue delay and the server's own compute). Where even an unloaded replica misses the SLA
    (the measured overhead is above the default the SLA was set with): the rate at which the HTTP
    stage is half busy, said so."""
    batch, delay = max(1, batching["max_batch_size"]), batching["queue_delay_us"] / 1e6
    cap = capacity_at(curve, batch, delay, sla_s, 1.0, over_s)
    if cap is None:
        return 0.5 / over_s, f"0.5 / measured overhead {over_s * 1e3:.2f} ms (the SLA is missed even unloaded)"
    return cap.rate, f"plan (queueing model, batch {batch}, server overhead {over_s * 1e3:.2f} ms measured)"


def simulate(spec: dict[str, Any], curve: Curve, sent: np.ndarray, rate: float, seed: int,
             overhead_s: float = 0.0) -> dict[str, Any]:
    """The plan's simulator on one replica with the serve.json's batching: on ``sent`` (the send times
    the server saw) and on ``LONG_RUN`` fresh Poisson arrivals at ``rate``; ``overhead_s`` is the
    server's per-request stage ahead of the batcher (``latency``: without it; ``server``: with it)."""
    batch = max(1, int(spec["batching"]["max_batch_size"]))
    delay = spec["batching"]["queue_delay_us"] / 1e6
    rng = np.random.default_rng(seed + 1)
    sizes: list[int] = []
    same = replica_latencies(sent, batch, delay, curve, rng, sizes)
    server = replica_latencies(sent, batch, delay, curve, np.random.default_rng(seed + 1), overhead=overhead_s)
    long_run = replica_latencies(poisson_schedule(rate, LONG_RUN, seed + 2), batch, delay, curve, rng,
                                 overhead=overhead_s)
    return {"latency": same, "server": server, "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
            "long_p50_s": float(np.percentile(long_run[int(LONG_RUN * WARMUP):], 50)),
            "long_p99_s": float(np.percentile(long_run[int(LONG_RUN * WARMUP):], 99))}


def compare_at(port: int, spec: dict[str, Any], raw: bytes, curve: Curve, rate: float, over: dict[str, float],
               setting: Setting, sim_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """One open-loop run at ``rate`` against the simulation of the same pool (``sim_spec``: the
    batching the simulator assumes, by default the server's own)."""
    n = max(20, min(setting.requests, int(rate * setting.seconds)))
    schedule = poisson_schedule(rate, n, setting.seed)
    before = batch_counts(port)
    load = asyncio.run(open_loop(port, raw, schedule, timeout=schedule[-1] + 30))
    ran = counts_since(before, batch_counts(port))
    sent, lat = np.array(load.sent), np.array(load.latency)
    order = np.argsort(sent)
    sent, lat = sent[order], lat[order]
    o_server = (over["http_ms"] if over.get("http_ms") is not None else over["overhead_ms"]) / 1e3
    sim = simulate(sim_spec or spec, curve, sent, rate, setting.seed, o_server)
    keep = sent >= sent[-1] * WARMUP  # the simulator's rule: the empty start is not counted
    m, s = lat[keep], sim["latency"][keep]
    o = over["overhead_ms"] / 1e3
    drawn = np.random.default_rng(setting.seed + 3).choice(over["samples_s"], s.size)  # the overhead's distribution
    row = {"model": spec["model"], "rate_per_s": round(rate, 2), "requests": int(keep.sum()),
           "achieved_rate_per_s": round(len(sent) / (sent[-1] - sent[0]), 2) if len(sent) > 1 else 0.0,
           "measured_p50_ms": 1e3 * float(np.percentile(m, 50)), "measured_p99_ms": 1e3 * float(np.percentile(m, 99)),
           "simulated_p50_ms": 1e3 * float(np.percentile(s, 50)), "simulated_p99_ms": 1e3 * float(np.percentile(s, 99)),
           "simulated_overhead_p50_ms": 1e3 * float(np.percentile(s + o, 50)),
           "simulated_overhead_p99_ms": 1e3 * float(np.percentile(s + o, 99)),
           "simulated_overhead_dist_p50_ms": 1e3 * float(np.percentile(s + drawn, 50)),
           "simulated_overhead_dist_p99_ms": 1e3 * float(np.percentile(s + drawn, 99)),
           "long_run_simulated_p50_ms": 1e3 * sim["long_p50_s"], "long_run_simulated_p99_ms": 1e3 * sim["long_p99_s"],
           "measured_mean_batch": round(mean_batch(ran), 3), "simulated_mean_batch": round(sim["mean_batch"], 3),
           "measured_batches": {str(b): c for b, (c, _) in sorted(ran.items())},
           "server_compute_mean_ms_by_batch": {str(b): round(1e-6 * ns / c, 3) for b, (c, ns) in sorted(ran.items())},
           "send_late_p99_ms": 1e3 * float(np.percentile(load.late, 99)) if load.late else 0.0,
           "errors": load.errors, "statuses": {str(k): v for k, v in load.statuses.items()},
           "extra_connections": load.opened, "unfinished": load.unfinished}
    srv = sim["server"][keep]
    row.update({"simulated_server_p50_ms": 1e3 * float(np.percentile(srv, 50)),
                "simulated_server_p99_ms": 1e3 * float(np.percentile(srv, 99)),
                "server_overhead_ms_simulated": 1e3 * o_server})
    row["ratio_p99"] = row["measured_p99_ms"] / row["simulated_p99_ms"]
    row["ratio_p99_server_model"] = row["measured_p99_ms"] / row["simulated_server_p99_ms"]
    row["ratio_p99_with_overhead"] = row["measured_p99_ms"] / row["simulated_overhead_p99_ms"]
    row["ratio_p99_with_overhead_dist"] = row["measured_p99_ms"] / row["simulated_overhead_dist_p99_ms"]
    return row


def run_model(d: Deployable, options: ServingOptions, fractions: list[float], setting: Setting, tmp: Path,
              server_batching: dict[str, Any] | None = None, reference: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Serve ``d`` with the planned serve.json and compare at each fraction of its capacity.
    ``server_batching`` overrides the server's batching only (the simulator keeps the planned one),
    with the overhead and capacity of ``reference`` (an earlier result with the planned batching:
    a server that waits longer for a batch would count that wait as overhead)."""
    planned = serve_spec(d, options)
    spec = {**planned, "batching": {**planned["batching"], **(server_batching or {})}}
    curve = curve_of(d)
    body, head = request_body(spec)
    with serving(spec, d.artifact.path, tmp) as port:
        raw = http_request(spec, port, body, head)
        closed_loop(port, raw, 20)  # warm-up
        if reference is None:
            over = overhead(port, raw, curve, planned["batching"]["queue_delay_us"] / 1e6, setting.overhead_requests)
            cap, bound = capacity(curve, planned["batching"], options.latency_sla_ms / 1e3,
                                  (over["http_ms"] if over["http_ms"] is not None else over["overhead_ms"]) / 1e3)
        else:
            over = {**reference["overhead"], "samples_s": reference["overhead_samples_s"]}
            cap, bound = reference["capacity_per_s"], reference["capacity_bound"]
        rows = [{**compare_at(port, spec, raw, curve, f * cap, over, setting, planned), "fraction": f}
                for f in fractions]
    return {"model": d.model.name, "backend": d.backend, "sku": d.sku.name, "threads": planned["threads"],
            "latency_sla_ms": options.latency_sla_ms, "batching": planned["batching"],
            "server_batching": spec["batching"], "curve": {"sizes": list(curve.sizes),
                                                           "p50_ms": [1e3 * x for x in curve.p50_s],
                                                           "p99_ms": [1e3 * x for x in curve.p99_s]},
            "capacity_per_s": cap, "capacity_bound": bound,
            "overhead": {k: v for k, v in over.items() if k != "samples_s"}, "overhead_samples_s": over["samples_s"],
            "rows": rows}


def disagreements(row: dict[str, Any], factor: float, batch_tolerance: float) -> list[str]:
    """Where a comparison row says the server and the simulation disagree: errors, a measured p99
    beyond ``factor`` times (or below 1 / ``factor`` times) the simulated p99 with the measured
    overhead distribution added, or a mean batch off the simulated one by more than ``batch_tolerance``
    (relative)."""
    out = []
    if row["errors"]:
        out.append(f"{row['errors']} requests failed ({row['statuses']})")
    r = row["ratio_p99_with_overhead_dist"]
    if not 1 / factor <= r <= factor:
        out.append(f"measured p99 {row['measured_p99_ms']:.2f} ms is {r:.2f}x the simulated "
                   f"{row['simulated_overhead_dist_p99_ms']:.2f} ms (allowed 1/{factor:g} to {factor:g})")
    mb, sb = row["measured_mean_batch"], row["simulated_mean_batch"]
    if abs(mb - sb) > batch_tolerance * sb:
        out.append(f"mean batch {mb:.2f} against {sb:.2f} simulated (allowed +-{batch_tolerance:.0%})")
    return out


# ------------------------------------------------------------------ report
def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'model':<20} {'rate/s':>7} {'meas p50':>9} {'meas p99':>9} {'sim p50':>8} {'sim p99':>8} "
            f"{'ratio':>6} {'+srv p99':>9} {'ratio':>6} {'+dist p99':>9} {'ratio':>6} {'batch m/s':>10} {'err':>4}")
    lines = [head, "-" * len(head)]
    for r in results:
        for x in r["rows"]:
            lines.append(f"{x['model']:<20} {x['rate_per_s']:>7.1f} {x['measured_p50_ms']:>9.2f} "
                         f"{x['measured_p99_ms']:>9.2f} {x['simulated_p50_ms']:>8.2f} {x['simulated_p99_ms']:>8.2f} "
                         f"{x['ratio_p99']:>6.2f} {x['simulated_server_p99_ms']:>9.2f} "
                         f"{x['ratio_p99_server_model']:>6.2f} {x['simulated_overhead_dist_p99_ms']:>9.2f} "
                         f"{x['ratio_p99_with_overhead_dist']:>6.2f} "
                         f"{x['measured_mean_batch']:>4.2f}/{x['simulated_mean_batch']:<5.2f} {x['errors']:>4}")
    return "\n".join(lines)


def cpu() -> dict[str, Any]:
    from mlopt.targets.detect import cpu_flags, cpu_model, x86_level

    flags = cpu_flags()
    return {"model": cpu_model(), "x86_level": x86_level(flags), "cores": os.cpu_count(),
            "flags": sorted(f for f in flags if f.startswith(("avx", "fma", "sse", "amx", "f16c", "bmi")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="folder for the store and manifests (reused when present)")
    p.add_argument("--models", default="digits,efficientnet")
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.9])
    p.add_argument("--requests", type=int, default=3000, help="requests per rate, at most")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of load per rate, at most")
    p.add_argument("--sla-factor", type=float, default=2.5,
                   help="latency SLA = this x the largest measured batch's p99 + the default server overhead "
                        "(sets the planned batching)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results-plan-vs-server.json")
    args = p.parse_args()
    setting = Setting(args.requests, args.seconds, seed=args.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        results = []
        for name in args.models.split(","):
            t = time.perf_counter()
            d = host_deployable(compile_model(name, work), work / "store")
            print(f"{name}: built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            r = run_model(d, planned_options(d, args.sla_factor), args.fractions, setting, Path(scratch) / name)
            print(json.dumps({k: r[k] for k in ("model", "batching", "capacity_per_s", "capacity_bound", "overhead")}),
                  file=sys.stderr, flush=True)
            results.append(r)
    print(table(results))
    out = {"cpu": cpu(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "setting": {**vars(setting), "fractions": args.fractions, "sla_factor": args.sla_factor,
                                     "pool_connections": POOL, "long_run_arrivals": LONG_RUN},
           "results": [{k: v for k, v in r.items() if k != "overhead_samples_s"} for r in results]}
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
