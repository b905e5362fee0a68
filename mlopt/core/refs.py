"""Image references: ``HOST[:PORT]/REPO[:TAG|@sha256:...]`` for registries and ``oci:PATH[:TAG]``
for OCI layouts on disk, parsed by the grammar of the distribution project's reference package.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from mlopt.core.errors import BadInput

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$")
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
INSECURE_ENV = "MLOPT_INSECURE_REGISTRIES"


@dataclass(frozen=True)
class ImageRef:
    """An image in a registry."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What the registry API is asked for: the digest when known, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> "ImageRef":
        return replace(self, tag=check_tag(tag, self.name), digest=None)

    def with_digest(self, digest: str) -> "ImageRef":
        return replace(self, digest=digest)

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class LayoutRef:
    """An image in an OCI image layout folder."""

    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


def check_tag(tag: str, where: str) -> str:
    """``tag`` when it is a valid image tag, else a BadInput naming ``where`` (the registry)."""
    if not TAG.match(tag):
        raise BadInput(f"invalid image tag {tag!r} for {where}: a tag is 1-128 letters, digits, '_', '.' or '-', "
                       "not starting with '.' or '-'", hint="fix --tag (placeholders: {model} {version} {sku} {backend})")
    return tag


def parse_ref(text: str, default_tag: str | None = "latest") -> ImageRef:
    """Parse ``[HOST[:PORT]/]REPO[:TAG][@sha256:HEX]`` (Docker Hub when no host is given)."""
    rest, _, digest = text.partition("@")
    if digest and not DIGEST.match(digest):
        raise BadInput(f"image reference {text!r}: {digest!r} is not a sha256 digest (sha256: and 64 hex digits)")
    registry, path = _split_host(rest, text)
    repo, tag = path, None
    if ":" in path.rsplit("/", 1)[-1]:
        repo, _, tag = path.rpartition(":")
        check_tag(tag, f"{registry}/{repo}")
    _check_repo(repo, text)
    if registry == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    return ImageRef(registry, repo, tag or (None if digest else default_tag), digest or None)


def parse_repository(text: str) -> ImageRef:
    """Parse ``HOST[:PORT]/REPO`` for pushing: no tag and no digest (tags come from --tag)."""
    registry, repo = _split_host(text, text)
    if "@" in text or ":" in repo:
        raise BadInput(f"--registry {text!r} must be HOST/REPO without a tag or digest",
                       hint="tags are made per SKU from --tag, by default v{version}-{sku}")
    if registry == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    _check_repo(repo, text)
    return ImageRef(registry, repo)


def parse_base(text: str) -> ImageRef | LayoutRef:
    """A base image: ``oci:PATH[:TAG]`` (an OCI layout folder) or a registry reference."""
    if text.startswith("oci:"):
        body = text[4:]
        path, sep, tag = body.rpartition(":")
        if not sep or "/" in tag or not path:
            path, tag = body, ""
        if tag:
            check_tag(tag, f"oci:{path}")
        return LayoutRef(Path(path).expanduser().resolve(), tag or None)
    return parse_ref(text)


def absolute_oci(text: str | None) -> str | None:
    """``oci:PATH[:TAG]`` with PATH made absolute (relative to the current folder); others unchanged."""
    if text and text.startswith("oci:") and not text[4:].startswith("/"):
        return "oci:" + str(Path(text[4:]).expanduser().absolute())
    return text


def _split_host(text: str, whole: str) -> tuple[str, str]:
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _HOST.match(first):
            raise BadInput(f"image reference {whole!r}: {first!r} is not a registry host[:port]")
        return (DOCKER_HUB if first in ("index.docker.io", DOCKER_HUB_API) else first), rest
    return DOCKER_HUB, text


def _check_repo(repo: str, whole: str) -> None:
    if not repo or not REPOSITORY.match(repo):
        raise BadInput(f"image reference {whole!r}: repository {repo!r} must be lowercase letters, digits and "
                       "separators ('.', '_', '__', '-') in '/'-separated parts")


def api_host(registry: str) -> str:
    """The host that serves the registry API (Docker Hub's differs from its name)."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


def plain_http(registry: str) -> bool:
    """Whether to talk HTTP rather than HTTPS: loopback registries, and those in $MLOPT_INSECURE_REGISTRIES."""
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    listed = {h.strip() for h in os.environ.get(INSECURE_ENV, "").split(",") if h.strip()}
    return registry in listed
