"""A client for the registry HTTP API v2 (the OCI distribution spec), standard library only.

Authentication follows the registry's ``WWW-Authenticate`` challenge: Basic with the Docker config's
credentials, or Bearer tokens fetched from the named realm for a repository scope. Blobs are
uploaded by streaming the file (one PATCH, or PATCHes of ``chunk_bytes``), hashed on the way; a
blob whose bytes do not match its digest is never committed. Downloads stream to disk, verified.
Every failure is a ``RegistryError`` (exit 5) naming the registry and what failed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlopt.core.errors import BadInput, RegistryError
from mlopt.package.auth import (
    Credentials,
    credentials_for,
    docker_config_path,
    parse_challenge,
)
from mlopt.package.oci import (
    CHUNK,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobWriter,
    Descriptor,
    sha256_digest,
)
from mlopt.core.refs import api_host, plain_http

ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
USER_AGENT = "mlopt"


@dataclass
class _Reply:
    status: int
    headers: Any
    body: bytes


class _Window:
    """Reads at most ``limit`` bytes of ``f``, hashing them into ``h`` (a file-like request body)."""

    def __init__(self, f: BinaryIO, limit: int, h: Any):
        self.f, self.left, self.h = f, limit, h

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) if n > 0 else b""
        self.left -= len(data)
        self.h.update(data)
        return data


class Registry:
    """One registry host. ``credentials`` default to the Docker config's for that host."""

    def __init__(self, registry: str, credentials: Credentials | None = None, timeout: float = 60.0,
                 chunk_bytes: int = 0):
        self.registry = registry
        self.host = api_host(registry)
        self.scheme = "http" if plain_http(registry) else "https"
        self._creds = credentials
        self._creds_read = credentials is not None
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._auth: dict[str, str] = {}
        self._basic: str | None = None  # Basic credentials answer every scope

    @property
    def creds(self) -> Credentials | None:
        """The Docker config's credentials, read only once the registry asks for them."""
        if not self._creds_read:
            self._creds, self._creds_read = credentials_for(self.registry), True
        return self._creds

    # ------------------------------------------------------------ transport
    def _url(self, path: str) -> str:
        return path if "://" in path else f"{self.scheme}://{self.host}{path}"

    def _open(self, method: str, url: str, headers: dict[str, str], body: Any = None) -> http.client.HTTPResponse:
        parts = urllib.parse.urlsplit(url)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.netloc, timeout=self.timeout, context=ssl.create_default_context(),
                                               blocksize=CHUNK)
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout, blocksize=CHUNK)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, body=body, headers={"User-Agent": USER_AGENT, **headers})
            return conn.getresponse()
        except OSError as e:
            conn.close()
            raise RegistryError(f"registry {self.registry} is unreachable ({parts.scheme}://{parts.netloc}): "
                                f"{getattr(e, 'strerror', None) or e}",
                                hint="check the address and that the registry is running; plain HTTP is used only "
                                     "for loopback hosts and those listed in $MLOPT_INSECURE_REGISTRIES") from None

    def _send(self, method: str, path: str, scope: str, headers: dict[str, str] | None = None,
              body: Any = None, stream: bool = False) -> http.client.HTTPResponse | _Reply:
        """One request with the scope's authorization; a 401 is answered once by authenticating."""
        headers = dict(headers or {})
        url = self._url(path)
        ours = urllib.parse.urlsplit(url).netloc == self.host  # never send credentials to a redirect's host
        for attempt in (0, 1):
            auth = self._auth.get(scope) or self._basic
            if auth and ours:
                headers["Authorization"] = auth
            resp = self._open(method, url, headers, body)
            if resp.status != 401 or attempt == 1 or hasattr(body, "read"):
                return resp if stream else _Reply(resp.status, resp.headers, _drain(resp))
            challenge = resp.headers.get("WWW-Authenticate", "")
            _drain(resp)
            self._authenticate(challenge, scope)
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, scope: str, ok: tuple[int, ...], what: str,
                headers: dict[str, str] | None = None, body: Any = None) -> _Reply:
        """A request whose status must be in ``ok``; anything else is a RegistryError about ``what``."""
        reply = self._send(method, path, scope, headers, body)
        assert isinstance(reply, _Reply)
        if reply.status not in ok:
            raise self._error(reply, what)
        return reply

    # ------------------------------------------------------------ auth
    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.creds is None:
                raise self._no_credentials(_repo_of(scope))
            self._basic = self.creds.basic()
        elif scheme == "bearer":
            self._auth[scope] = "Bearer " + self._token(params, scope)
        else:
            raise RegistryError(f"registry {self.registry} asks for {challenge or 'an unknown'} authentication, "
                                "which mlopt does not speak (Basic and Bearer only)")

    def _token(self, params: dict[str, str], scope: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.registry} sent a Bearer challenge without a realm")
        query = {"service": params.get("service", ""), "scope": scope}
        headers: dict[str, str] = {}
        if self.creds is not None and self.creds.identity_token:
            form = urllib.parse.urlencode({**query, "grant_type": "refresh_token", "client_id": USER_AGENT,
                                           "refresh_token": self.creds.secret})
            resp = self._open("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"}, form.encode())
        else:
            if self.creds is not None:
                headers["Authorization"] = self.creds.basic()
            resp = self._open("GET", f"{realm}?{urllib.parse.urlencode(query)}", headers)
        body = _drain(resp)
        if resp.status in (401, 403):
            target = _repo_of(scope)
            raise self._refused(target) if self.creds else self._no_credentials(target)
        if resp.status != 200:
            raise RegistryError(f"registry {self.registry}: token service {realm} answered HTTP {resp.status}")
        data = json.loads(body or b"{}")
        token = data.get("token") or data.get("access_token")
        if not token:
            raise RegistryError(f"registry {self.registry}: token service {realm} returned no token")
        return str(token)

    def _no_credentials(self, target: str) -> RegistryError:
        return RegistryError(f"registry {self.registry} requires credentials for {target}, and "
                             f"{docker_config_path()} has none for it",
                             hint=f"run `docker login {self.registry}` (or add an auths entry); mlopt never takes "
                                  "passwords on the command line")

    def _refused(self, target: str) -> RegistryError:
        assert self.creds is not None
        return RegistryError(f"registry {self.registry} refused the credentials of user {self.creds.username!r} "
                             f"for {target} (from {self.creds.source})",
                             hint=f"check them with `docker login {self.registry}`")

    def _error(self, reply: _Reply, what: str) -> RegistryError:
        detail = _error_detail(reply.body)
        if reply.status == 401:
            return self._refused(what) if self.creds else self._no_credentials(what)
        if reply.status == 403:
            return RegistryError(f"registry {self.registry} denied access: cannot {what}{detail}",
                                 hint="the account needs push (or pull) rights on the repository")
        return RegistryError(f"registry {self.registry} cannot {what}: HTTP {reply.status}{detail}")

    # ------------------------------------------------------------ API
    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index, by tag or digest."""
        reply = self._send("GET", f"/v2/{repo}/manifests/{reference}", _scope(repo, "pull"), {"Accept": ACCEPT})
        assert isinstance(reply, _Reply)
        if reply.status == 404:
            raise RegistryError(f"image {self.registry}/{repo}:{reference} not found in registry {self.registry}"
                                f"{_error_detail(reply.body)}", hint="check the name and tag (or digest)")
        if reply.status != 200:
            raise self._error(reply, f"read manifest {repo}:{reference}")
        digest = sha256_digest(reply.body)
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"registry {self.registry} returned a manifest for {repo}@{reference} "
                                f"whose digest is {digest}")
        return reply.body, reply.headers.get("Content-Type", "").split(";")[0], digest

    def blob_exists(self, repo: str, digest: str) -> bool:
        reply = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", _scope(repo, "pull"), (200, 404),
                             f"check blob {digest} in {repo}")
        return reply.status == 200

    def fetch_blob(self, repo: str, desc: Descriptor, out: BlobWriter) -> None:
        """Stream a blob into ``out`` (following redirects), checking its digest and size."""
        url = f"/v2/{repo}/blobs/{desc.digest}"
        for _ in range(5):
            resp = self._send("GET", url, _scope(repo, "pull"), stream=True)
            assert isinstance(resp, http.client.HTTPResponse)
            if resp.status not in (301, 302, 303, 307, 308):
                break
            url = urllib.parse.urljoin(self._url(url), resp.headers["Location"])
            _drain(resp)
        if resp.status != 200:
            raise self._error(_Reply(resp.status, resp.headers, _drain(resp)), f"download blob {desc.digest} of {repo}")
        h = hashlib.sha256()
        with resp:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                h.update(chunk)
                out.file.write(chunk)
        if "sha256:" + h.hexdigest() != desc.digest:
            raise RegistryError(f"registry {self.registry} sent blob {desc.digest} of {repo} with other content")
        out.finish(desc.digest)

    def upload_blob(self, repo: str, desc: Descriptor, path: Path) -> None:
        """Upload a blob from a file, streaming; refused (and the upload cancelled) if the file's bytes
        do not hash to ``desc.digest``."""
        scope = _scope(repo, "pull,push")
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope, (202,), f"start an upload to {repo}",
                             {"Content-Length": "0"})
        location = self._location(start, repo)
        h = hashlib.sha256()
        size = path.stat().st_size
        chunk = self.chunk_bytes or size or 1
        with open(path, "rb") as f:
            for offset in range(0, size, chunk):
                n = min(chunk, size - offset)
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(n),
                           "Content-Range": f"{offset}-{offset + n - 1}"}
                reply = self.request("PATCH", location, scope, (202,), f"upload blob {desc.digest} to {repo}",
                                     headers, _Window(f, n, h))
                location = self._location(reply, repo)
        if "sha256:" + h.hexdigest() != desc.digest or size != desc.size:
            self._send("DELETE", location, scope)
            raise BadInput(f"blob {desc.digest} at {path} is damaged: its content does not match its digest; "
                           f"the upload to {self.registry}/{repo} was cancelled and nothing was tagged",
                           hint="build the image again (`mlopt image build`)")
        sep = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{sep}digest={urllib.parse.quote(desc.digest)}", scope, (201, 204),
                     f"commit blob {desc.digest} to {repo}", {"Content-Length": "0"})

    def put_manifest(self, repo: str, tag: str, data: bytes, media_type: str) -> str:
        """Tag a manifest (its blobs must be there already); returns its digest."""
        reply = self.request("PUT", f"/v2/{repo}/manifests/{tag}", _scope(repo, "pull,push"), (201, 200),
                             f"tag {repo}:{tag}", {"Content-Type": media_type, "Content-Length": str(len(data))}, data)
        digest = sha256_digest(data)
        served = reply.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise RegistryError(f"registry {self.registry} stored {repo}:{tag} as {served}, not {digest}")
        return digest

    def _location(self, reply: _Reply, repo: str) -> str:
        loc = reply.headers.get("Location")
        if not loc:
            raise RegistryError(f"registry {self.registry} gave no upload location for {repo}")
        return urllib.parse.urljoin(self._url(f"/v2/{repo}/blobs/uploads/"), loc)


def _scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


def _repo_of(scope: str) -> str:
    parts = scope.split(":")
    return parts[1] if len(parts) >= 3 and parts[0] == "repository" else "its API"


def _drain(resp: http.client.HTTPResponse) -> bytes:
    try:
        return resp.read()
    finally:
        resp.close()


def _error_detail(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
    except (ValueError, AttributeError):
        return ""
    text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict))
    return f" ({text})" if text else ""
