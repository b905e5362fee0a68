"""Registry credentials from the Docker config file, never from the command line.

Looked up the way the Docker CLI does: ``$DOCKER_CONFIG/config.json`` (else
``~/.docker/config.json``); a ``credHelpers`` entry for the registry, else the ``credsStore``
helper, else the ``auths`` entry (base64 ``user:password`` in ``auth``, or ``username`` and
``password``, or an ``identitytoken``). Helpers are the ``docker-credential-NAME`` programs
(``get`` with the registry on standard input, JSON ``{Username, Secret}`` out).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlopt.core.errors import BadInput, RegistryError
from mlopt.core.refs import DOCKER_HUB

HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str  # a password, or an identity (refresh) token when ``identity_token``
    source: str  # where they came from, for messages
    identity_token: bool = False

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def credentials_for(registry: str) -> Credentials | None:
    """The credentials the Docker config file holds for ``registry`` (None when it has none)."""
    path = docker_config_path()
    if not path.is_file():
        return None
    config = _read(path)
    helper = (config.get("credHelpers") or {}).get(registry) or config.get("credsStore")
    if helper:
        found = _from_helper(helper, registry)
        if found is not None:
            return found
    entry = _auths_entry(config.get("auths") or {}, registry)
    return _from_entry(entry, registry, path) if entry else None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"Docker config {path} cannot be read: {e}", hint="fix or move the file") from None
    if not isinstance(data, dict):
        raise BadInput(f"Docker config {path} is not a JSON object")
    return data


def _normalise(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def _auths_entry(auths: dict[str, Any], registry: str) -> dict[str, Any] | None:
    wanted = {registry} | (set(HUB_KEYS) if registry == DOCKER_HUB else set())
    for key, entry in auths.items():
        if (key in wanted or _normalise(key) in wanted) and isinstance(entry, dict) and entry:
            return entry
    return None


def _from_entry(entry: dict[str, Any], registry: str, path: Path) -> Credentials | None:
    source = f"{path} (auths)"
    if entry.get("identitytoken"):
        return Credentials(entry.get("username") or "<token>", entry["identitytoken"], source, identity_token=True)
    if entry.get("auth"):
        try:
            user, sep, secret = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise BadInput(f"Docker config {path}: the auth entry for {registry} is not base64 'user:password'") from None
        if not sep:
            raise BadInput(f"Docker config {path}: the auth entry for {registry} is not base64 'user:password'")
        return Credentials(user, secret, source)
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"], source)
    return None


def _from_helper(helper: str, registry: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    exe = shutil.which(program)
    if exe is None:
        raise RegistryError(f"the Docker config names credential helper {program!r} for {registry}, "
                            "but it is not on PATH", hint=f"install {program} or remove it from {docker_config_path()}")
    server = "https://index.docker.io/v1/" if registry == DOCKER_HUB else registry
    res = subprocess.run([exe, "get"], input=server, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        if "not found" in (res.stdout + res.stderr).lower():
            return None
        said = (res.stderr or res.stdout).strip()[:200]
        raise RegistryError(f"credential helper {program} failed for {registry}: {said}")
    try:
        data = json.loads(res.stdout)
        user, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"credential helper {program} printed no Username/Secret JSON for {registry}") from None
    return Credentials(user, secret, f"credential helper {program}", identity_token=user == "<token>")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate: Bearer realm="...",service="...",scope="..."`` -> ("bearer", params)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    params.update({k.lower(): v for k, v in re.findall(r'(\w+)=([^",\s]+)', rest) if k.lower() not in params})
    return scheme.lower(), params
