"""Test helpers for images: a real local registry (Debian's docker-registry), a synthetic base image
written by hand (independent of mlopt's writer), and the tools the checks use (skopeo, umoci)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
APT = "apt-get install docker-registry skopeo umoci"


def require_tools() -> None:
    """Skip unless the registry, skopeo and umoci are installed."""
    missing = [t for t in (REGISTRY_BIN, "skopeo", "umoci") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed ({APT})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str | None:
    """A bcrypt htpasswd line: Python's crypt (glibc blowfish), else the bcrypt module, else htpasswd(1)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13
        if crypt.METHOD_BLOWFISH in crypt.methods:
            return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"
    except ImportError:
        pass
    with contextlib.suppress(ImportError):
        import bcrypt

        return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}"
    if shutil.which("htpasswd"):
        done = subprocess.run(["htpasswd", "-nbB", user, password], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    return None


@contextlib.contextmanager
def registry(tmp: Path, htpasswd: str | None = None, auth_yaml: str = "") -> Iterator[str]:
    """Run docker-registry on 127.0.0.1 with storage under ``tmp``; yields HOST:PORT."""
    port = free_port()
    auth = auth_yaml
    if htpasswd:
        (tmp / "htpasswd").write_text(htpasswd + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: mlopt-test\n    path: {tmp / 'htpasswd'}\n"
    config = tmp / "registry.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp / 'data'}\n"
                      f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: test\n{auth}")
    log = open(tmp / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _wait(port: int, proc: subprocess.Popen) -> None:
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # 401: up, with auth
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("docker-registry did not start")


def _blob(root: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_base_layout(root: Path, tag: str = "base", arches: tuple[str, ...] = ("amd64",)) -> Path:
    """A tiny base image (one layer with two files; a config with Env and Cmd) as an OCI layout; with
    several architectures, an image index of one manifest per architecture."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **_base_manifest(root, arch),
                  "platform": {"os": "linux", "architecture": arch}} for arch in arches]
    top = manifests[0]
    if len(arches) > 1:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
        top = {"mediaType": "application/vnd.oci.image.index.v1+json", **_blob(root, json.dumps(index).encode())}
    entry = {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return root


def _base_manifest(root: Path, arch: str) -> dict:
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for name, content in (("etc/base-release", f"synthetic base {arch}\n".encode()),
                              ("usr/local/bin/hello", b"#!/bin/sh\necho hi\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o755
            tar.addfile(info, io.BytesIO(content))
    raw = tar_bytes.getvalue()
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(root, gzip.compress(raw, mtime=0))}
    config = {"architecture": arch, "os": "linux",
              "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "BASE=1"], "Cmd": ["python3"],
                         "Labels": {"base.label": "kept"}},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
              "history": [{"created_by": "synthetic base layer"}]}
    cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(root, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": [layer]}
    return _blob(root, json.dumps(manifest).encode())


def skopeo_inspect(ref: str, raw: bool = False, creds: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["skopeo", "inspect", "--tls-verify=false"] + (["--raw"] if raw else []) + \
          (["--creds", creds] if creds else ["--no-creds"]) + [f"docker://{ref}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def skopeo_copy(src: str, dest: str, dest_creds: str | None = None) -> None:
    creds = ["--dest-creds", dest_creds] if dest_creds else []
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", *creds, src, dest],
                   check=True, capture_output=True, timeout=120)


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    """Unpack an image (rootless) and return its root file system."""
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle)], check=True,
                   capture_output=True, timeout=120)
    return bundle / "rootfs"


# ------------------------------------------------------------------ token (Bearer) authentication


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """A minimal Docker token service: Basic-authenticated GET -> an RS256 JWT that distribution checks
    against the certificate in its rootcertbundle (signed with the openssl command line)."""

    def __init__(self, tmp: Path, user: str, password: str, service: str = "mlopt-test", issuer: str = "mlopt-ci"):
        self.tmp, self.user, self.password, self.service, self.issuer = tmp, user, password, service, issuer
        self.key, self.cert = tmp / "token.key", tmp / "token.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "1", "-subj", "/CN=mlopt-token"], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        import base64

        self.x5c = base64.b64encode(der).decode()
        self.requests: list[str] = []

    def token(self, scope: str) -> str:
        now = int(time.time())
        access = []
        if scope.startswith("repository:"):
            _, name, actions = scope.split(":")
            access = [{"type": "repository", "name": name, "actions": actions.split(",")}]
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": self.user, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": f"{now}-{len(self.requests)}", "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def handler(self) -> type:
        import base64
        from http.server import BaseHTTPRequestHandler
        from urllib.parse import parse_qs, urlsplit

        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                service.requests.append(self.path)
                want = "Basic " + base64.b64encode(f"{service.user}:{service.password}".encode()).decode()
                if self.headers.get("Authorization") != want:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": service.token(query.get("scope", [""])[0])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@contextlib.contextmanager
def token_registry(tmp: Path, user: str, password: str) -> Iterator[tuple[str, TokenService]]:
    """docker-registry with token authentication and its token service; yields (HOST:PORT, service)."""
    import threading
    from http.server import ThreadingHTTPServer

    service = TokenService(tmp, user, password)
    server = ThreadingHTTPServer(("127.0.0.1", 0), service.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    realm = f"http://127.0.0.1:{server.server_address[1]}/token"
    auth = (f"auth:\n  token:\n    realm: {realm}\n    service: {service.service}\n    issuer: {service.issuer}\n"
            f"    rootcertbundle: {service.cert}\n")
    try:
        with registry(tmp, auth_yaml=auth) as host:
            yield host, service
    finally:
        server.shutdown()
        server.server_close()
