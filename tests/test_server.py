"""The image's server, run as its entry point in a subprocess on the real digits build and driven by
tritonclient (the KServe v2 client Triton ships), raw HTTP for the requests a client library will
not send, and signals: metadata, binary and JSON tensors, strict validation, dynamic batching,
the bounded queue, per-request timeouts and the SIGTERM drain."""

from __future__ import annotations

import os

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from mlopt.package import entry
from mlopt.package.serving import Deployable, ServingOptions, serve_spec
from mlopt.runtime.batcher import BatchConfig, Batcher, QueueFull
from test_serving import _digits, _reference, cpu, with_backend  # noqa: F401  (cpu: the module fixture)

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

NAME = "digits-cnn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The entry point serving one build in a subprocess."""

    def __init__(self, d: Deployable, tmp: Path, prefix: tuple[str, ...] = (), entry_cmd: tuple[str, ...] = (),
                 model_dir: Path | None = None, **changes: dict):
        spec = serve_spec(d, ServingOptions())
        for key, value in changes.items():
            spec[key] = {**spec[key], **value}
        self.spec = spec
        (tmp / "serve.json").write_text(json.dumps(spec))
        self.port, self.grpc_port = _free_port(), _free_port()
        self.url = f"127.0.0.1:{self.port}"
        command = entry_cmd or (sys.executable, entry.__file__)
        self.proc = subprocess.Popen([*prefix, *command, "--serving", str(tmp / "serve.json"),
                                      "--model-dir", str(model_dir or d.artifact.path), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--grpc-port", str(self.grpc_port)],
                                     stderr=subprocess.PIPE, text=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become ready")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        if conn is None:
            c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def get(self, path: str) -> tuple[int, dict]:
        status, _, data = self.request("GET", path)
        return status, json.loads(data)

    def infer_json(self, body: dict, **kw) -> tuple[int, dict]:
        status, _, data = self.request("POST", f"/v2/models/{NAME}/infer", json.dumps(body).encode(), **kw)
        return status, json.loads(data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def ort(cpu: Deployable) -> Deployable:  # noqa: F811
    return with_backend(cpu, "onnxruntime")


@pytest.fixture(scope="module")
def server(ort: Deployable, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # a 20 ms queue delay (what a recipe's latency SLA gives) so concurrent clients are merged
    s = Served(ort, tmp_path_factory.mktemp("served"), batching={"queue_delay_us": 20000})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Served) -> Iterator:
    c = tritonhttp.InferenceServerClient(server.url)
    yield c
    c.close()


def _x(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


# ------------------------------------------------------------------ tritonclient


def test_health_metadata_config_and_index(client, server: Served) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1")
    assert not client.is_model_ready(NAME, "2") and not client.is_model_ready("other")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    for version in ("", "1"):
        meta = client.get_model_metadata(NAME, version)
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    config = client.get_model_config(NAME, "1")
    assert config["max_batch_size"] == server.spec["batching"]["max_batch_size"] == 4
    assert config["input"][0]["dims"] == [1, 8, 8] and config["output"][0]["data_type"] == "TYPE_FP32"
    assert client.get_model_repository_index() == [{"name": NAME, "version": "1", "state": "READY", "reason": ""}]
    stats = client.get_inference_statistics(NAME, "1")["model_stats"][0]
    assert stats["name"] == NAME and "success" in stats["inference_stats"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [None, True, False])
def test_infer_matches_onnxruntime(client, ort: Deployable, binary_in: bool, binary_out: bool | None) -> None:
    x = _x(3)
    inp = tritonhttp.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = None if binary_out is None else [tritonhttp.InferRequestedOutput("output", binary_data=binary_out)]
    res = client.infer(NAME, [inp], model_version="1", outputs=outs, request_id="r1")
    np.testing.assert_allclose(res.as_numpy("output"), _reference(ort, x), atol=1e-4)
    assert res.get_response()["id"] == "r1"
    assert ("binary_data_size" in json.dumps(res.get_response())) == (binary_out is not False)


def test_keep_alive_requests_are_not_delayed_by_nagle(client) -> None:
    """A reused connection answers in well under the ~40 ms of Nagle plus delayed ACK."""
    x = _x(1)
    inp = tritonhttp.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        client.infer(NAME, [inp], headers={"X-Priority": "1"})
        times.append(time.perf_counter() - t)
    # each lone request waits out the 20 ms queue delay for company; Nagle would add ~40 ms more (60+)
    assert float(np.median(times)) < 0.05, times


def test_nan_outputs_stay_valid_json(client, server: Served) -> None:
    x = _x(1)
    x[0, 0, 0, 0] = np.nan
    inp = tritonhttp.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(NAME, [inp], outputs=[tritonhttp.InferRequestedOutput("output", binary_data=False)])
    assert np.isnan(res.as_numpy("output")).any()  # answered as binary data: JSON has no NaN
    status, headers, data = server.request("POST", f"/v2/models/{NAME}/infer", json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1e39] * 64}]}).encode())
    assert status == 200
    head = int(headers.get("inference-header-content-length", len(data)))
    json.loads(data[:head], parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def test_concurrent_clients_are_batched_with_their_own_results(server: Served, ort: Deployable) -> None:
    before = {b["batch_size"]: b["compute_infer"]["count"] for b in
              server.get(f"/v2/models/{NAME}/stats")[1]["model_stats"][0]["batch_stats"]}

    def one(seed: int) -> None:
        c = tritonhttp.InferenceServerClient(server.url)
        try:
            for k in range(6):
                x = _x(1 + (seed + k) % 2, seed=100 * seed + k)
                inp = tritonhttp.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                np.testing.assert_allclose(c.infer(NAME, [inp]).as_numpy("output"), _reference(ort, x), atol=1e-4)
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    stats = server.get("/v2/models/stats")[1]["model_stats"][0]
    merged = {b["batch_size"]: b["compute_infer"]["count"] - before.get(b["batch_size"], 0) for b in stats["batch_stats"]}
    assert any(size > 1 and n > 0 for size, n in merged.items()), merged
    assert max(merged) <= 4  # never past the measured max_batch_size
    assert stats["inference_count"] >= stats["execution_count"]


def test_grpc_client_over_the_same_batcher(server: Served, ort: Deployable) -> None:
    import tritonclient.grpc as tritongrpc

    c = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(NAME, "1")
        assert not c.is_model_ready(NAME, "2")
        meta = c.get_model_metadata(NAME, "1", as_json=True)
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "10"]}]
        assert c.get_model_config(NAME).config.max_batch_size == 4
        assert c.get_model_repository_index(as_json=True)["models"][0]["state"] == "READY"
        before = c.get_inference_statistics(NAME).model_stats[0].inference_count
        x = _x(2)
        inp = tritongrpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = c.infer(NAME, [inp], model_version="1", priority=1, timeout=10_000_000)
        np.testing.assert_allclose(res.as_numpy("output"), _reference(ort, x), atol=1e-4)
        assert c.get_inference_statistics(NAME).model_stats[0].inference_count == before + 2
        bad = tritongrpc.InferInput("x", list(x.shape), "INT64")
        bad.set_data_from_numpy(x.astype(np.int64))
        with pytest.raises(InferenceServerException, match="must be FP32") as e:
            c.infer(NAME, [bad])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match="unknown model"):
            c.infer("other", [inp])
    finally:
        c.close()


def test_http_config_and_statistics_parse_as_tritons_protobufs(server: Served) -> None:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2

    config = json_format.ParseDict(server.get(f"/v2/models/{NAME}/config")[1], model_config_pb2.ModelConfig())
    assert config.dynamic_batching.max_queue_delay_microseconds == 20000
    stats = json_format.ParseDict(server.get("/v2/models/stats")[1], service_pb2.ModelStatisticsResponse())
    assert stats.model_stats[0].name == NAME


def test_the_image_layout_serves_with_only_its_shipped_runtime(ort: Deployable, tmp_path: Path) -> None:
    """The files an image holds (entry.py, mlopt_runtime/, serve.json, the model), written out and
    served with ``mlopt`` made unimportable: the server ships whole in ``mlopt_runtime``."""
    from mlopt.package.contents import artifact_files, serving_files

    root = tmp_path / "rootfs"
    files = artifact_files(ort) + serving_files(ort, ServingOptions())
    for f in sorted(files, key=lambda f: f.hardlink is not None):  # a hard link's target is written first
        dest = root / f.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.link is not None:
            dest.symlink_to(f.link)
        elif f.hardlink is not None:  # as tar extracts it: the same file under a second name
            os.link(root / f.hardlink.lstrip("/"), dest)
        else:
            dest.write_bytes(f.data if f.data is not None else Path(f.source).read_bytes())
    opt = root / "opt" / "mlopt"
    assert {"http_server.py", "grpc_server.py", "v2.py", "batcher.py", "served.py"} <= {
        p.name for p in (opt / "mlopt_runtime").iterdir()}
    assert "uvicorn==" in (opt / "serving" / "requirements.txt").read_text()
    run_entry = ("import os, runpy, sys; sys.modules['mlopt'] = None; path = sys.argv.pop(1); sys.argv[0] = path; "
                 "sys.path.insert(0, os.path.dirname(path)); runpy.run_path(path, run_name='__main__')")
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    s = Served(ort, spec_dir, entry_cmd=(sys.executable, "-c", run_entry, str(opt / "entry.py")),
               model_dir=opt / "model")
    try:
        c = tritonhttp.InferenceServerClient(s.url)
        x = _x(2)
        inp = tritonhttp.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(c.infer(NAME, [inp]).as_numpy("output"), _reference(ort, x), atol=1e-4)
        c.close()
    finally:
        s.stop()


# ------------------------------------------------------------------ what a client library will not send

BAD = [  # (body, headers, status, message)
    (b"{not json", {}, 400, "not valid JSON"),
    (b"[1, 2]", {}, 400, "JSON object"),
    (json.dumps({"inputs": "abc"}).encode(), {}, 400, "'inputs' must be a list"),
    (json.dumps({"inputs": []}).encode(), {}, 400, "inputs must be ['x']"),
    (json.dumps({"inputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [0]}]}).encode(), {}, 400,
     "inputs must be ['x']"),
]


def _inp(**changes) -> dict:
    t = {"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    return {"inputs": [{**t, **changes}]}


BAD += [(json.dumps(body).encode(), {}, status, message) for body, status, message in [
    (_inp(datatype="NONSENSE"), 400, "unknown datatype 'NONSENSE'"),
    (_inp(datatype="fp32"), 400, "upper case"),
    (_inp(datatype="INT64"), 400, "must be FP32"),
    ({"inputs": _inp()["inputs"] * 2}, 400, "more than once"),
    (_inp(shape=[-1, 1, 8, 8]), 400, "negative dimension"),
    (_inp(shape=[0, 1, 8, 8], data=[]), 400, "batch size 0"),
    (_inp(shape=[1, 8, 8]), 400, "rank 3"),
    (_inp(shape=[1, 1, 8, 7]), 400, "does not match"),
    (_inp(data=[0.5] * 63), 400, "63 elements"),
    (_inp(data="abc"), 400, "'data' must be a list"),
    (_inp(data=["a"] * 64), 400, "is not FP32"),
    (_inp(shape=[5, 1, 8, 8], data=[0.5] * 320), 413, "above this server's limit of 4"),
    ({**_inp(), "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
    ({**_inp(), "parameters": {"priority": -1}}, 400, "priority"),
    ({**_inp(), "parameters": {"timeout": "soon"}}, 400, "timeout"),
]]
BAD += [
    (json.dumps(_inp()).encode(), {"Inference-Header-Content-Length": "x"}, 400, "not a number"),
    (json.dumps(_inp()).encode(), {"Inference-Header-Content-Length": "99999"}, 400, "outside"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                             "parameters": {"binary_data_size": 256}}]}).encode() + b"\0" * 100,
     {"Inference-Header-Content-Length": None}, 400, "runs past the end"),
    (json.dumps(_inp()).encode(), {"X-Priority": "high"}, 400, "X-Priority"),
]


@pytest.mark.parametrize("body,headers,status,message", BAD, ids=[f"{i}-{b[3][:20]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_status_and_the_server_stays_up(server: Served, body: bytes, headers: dict,
                                                              status: int, message: str) -> None:
    if headers.get("Inference-Header-Content-Length", "") is None:
        headers = {"Inference-Header-Content-Length": str(body.index(b"\0"))}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    got, _, data = server.request("POST", f"/v2/models/{NAME}/infer", body, headers, conn=conn)
    assert got == status and message in json.loads(data)["error"], data
    # the same keep-alive connection still answers a good request
    ok, _, data = server.request("POST", f"/v2/models/{NAME}/infer", json.dumps(_inp()).encode(), conn=conn)
    assert ok == 200, data
    conn.close()


def test_routes_versions_and_query_strings(server: Served) -> None:
    assert server.get("/v2/health/ready?probe=1")[0] == 200 and server.get("/healthz")[0] == 200
    assert server.get(f"/v2/models/{NAME}/versions/1/ready")[0] == 200
    assert server.get(f"/v2/models/{NAME}/versions/2")[0] == 404
    assert server.get("/v2/models/other/ready")[0] == 404
    assert server.get("/v2/nowhere")[0] == 404
    status, out = server.infer_json(_inp(), headers={})
    assert status == 200 and out["outputs"][0]["shape"] == [1, 10]
    status, _, data = server.request("POST", f"/v2/models/{NAME}/versions/1/infer?x=1", json.dumps(_inp()).encode())
    assert status == 200, data
    assert server.request("GET", f"/v2/models/{NAME}/infer")[0] == 405


def test_a_body_over_the_limit_is_413_and_the_connection_stays_sane(server: Served) -> None:
    limit = server.spec["limits"]["max_body_bytes"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    status, headers, data = server.request("POST", f"/v2/models/{NAME}/infer", b"{" + b" " * limit + b"}", conn=conn)
    assert status == 413 and "limit of" in json.loads(data)["error"]
    # the body was read to its end: the next request on the connection is a request, not its rest
    assert server.request("POST", f"/v2/models/{NAME}/infer", json.dumps(_inp()).encode(), conn=conn)[0] == 200
    conn.close()
    # chunked, with no Content-Length: counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", f"/v2/models/{NAME}/infer", body=iter([b"{" + b" " * (limit // 2)] * 3), encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    # a declared size far past the limit is refused before any of it is read, and the connection closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 30}\r\n\r\n".encode())
        answer = raw.makefile("rb").read()  # until the server closes
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
    assert server.infer_json(_inp())[0] == 200


# ------------------------------------------------------------------ queue, timeouts, drain


def test_full_queue_answers_503_with_retry_after_and_timeouts_expire(ort: Deployable, tmp_path: Path) -> None:
    # one second of queue delay holds requests in a queue of two
    s = Served(ort, tmp_path, batching={"queue_delay_us": 1_000_000}, limits={"max_queue": 2})
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(s.infer_json, _inp()) for _ in range(2)]
            time.sleep(0.3)
            status, headers, data = s.request("POST", f"/v2/models/{NAME}/infer", json.dumps(_inp()).encode())
            assert status == 503 and headers["retry-after"] == "1" and "queue" in json.loads(data)["error"]
            assert [f.result()[0] for f in held] == [200, 200]
        status, out = s.infer_json({**_inp(), "parameters": {"timeout": 50_000}})  # 50 ms, in microseconds
        assert status == 503 and "timeout" in out["error"]
        import tritonclient.grpc as tritongrpc

        g = tritongrpc.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
        inp = tritongrpc.InferInput("x", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(_x(1))
        with pytest.raises(InferenceServerException, match="timeout expired") as e:
            g.infer(NAME, [inp], timeout=50_000)
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        g.close()
        assert s.get("/v2/health/live")[0] == 200
    finally:
        s.stop()


def test_sigterm_turns_readiness_off_and_finishes_in_flight_requests(ort: Deployable, tmp_path: Path) -> None:
    s = Served(ort, tmp_path, batching={"queue_delay_us": 1_500_000})
    try:
        x = _x(1)
        body = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(s.infer_json, body)
            time.sleep(0.3)
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert s.get("/v2/health/ready")[0] == 503  # still answering, no longer ready
            assert s.get("/v2/health/live")[0] == 200
            status, out = inflight.result(timeout=30)
        assert status == 200
        np.testing.assert_allclose(np.array(out["outputs"][0]["data"], np.float32).reshape(1, 10),
                                   _reference(ort, x), atol=1e-4)
        code, err = s.proc.wait(timeout=20), s.proc.stderr.read()
        assert code == 0 and "readiness off" in err and "Traceback" not in err, err
    finally:
        s.stop()


def _pid_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _pid_namespaces(), reason="needs unshare --pid (root or user namespaces)")
def test_sigterm_as_pid_1_drains_and_exits_0(ort: Deployable, tmp_path: Path) -> None:
    """As a container's PID 1 a process gets no default SIGTERM action: only a handler stops it."""
    s = Served(ort, tmp_path, prefix=("unshare", "--pid", "--fork"))
    try:
        children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
        [child] = children
        [nspid] = [line for line in Path(f"/proc/{child}/status").read_text().splitlines() if line.startswith("NSpid:")]
        assert nspid.split()[-1] == "1"  # PID 1 in its own PID namespace
        assert s.infer_json(_inp())[0] == 200
        import os

        os.kill(int(child), signal.SIGTERM)
        code, err = s.proc.wait(timeout=30), s.proc.stderr.read()
        assert code == 0 and "readiness off" in err, err
    finally:
        s.stop()


# ------------------------------------------------------------------ the batcher alone


def test_batcher_orders_by_priority_and_bounds_its_queue() -> None:
    gate, order = threading.Event(), []

    def run(feed: dict) -> dict:
        gate.wait(10)
        order.extend(feed["x"].reshape(-1).tolist())
        return {"y": feed["x"] * 2}

    b = Batcher(run, BatchConfig(max_batch=2, queue_delay_s=0.0, max_queue=4))
    b.start()
    try:
        first = b.submit({"x": np.array([[0.0]])}, 1, priority=10)
        time.sleep(0.1)  # the worker holds the first request; the next ones queue
        futures = [b.submit({"x": np.array([[float(v)]])}, 1, priority=p) for v, p in [(1, 10), (2, 10), (3, 1), (4, 2)]]
        with pytest.raises(QueueFull):
            b.submit({"x": np.array([[5.0]])}, 1, priority=1)
        gate.set()
        assert [float(f.result(10)["y"][0, 0]) for f in [first, *futures]] == [0, 2, 4, 6, 8]
        assert order == [0, 3, 4, 1, 2]  # priority 1, then 2, then the default level in arrival order
        assert b.stats.batches == {1: [1, b.stats.batches[1][1]], 2: [2, b.stats.batches[2][1]]}
    finally:
        b.stop()
