"""OCI images without a daemon: deterministic tar layers and the OCI image layout on disk.

A layer is written in one streaming pass: files are read in chunks into a tar stream (sorted
entries, mtime 0, owner 0:0, fixed modes), hashed uncompressed (the ``diff_id``), gzipped and
hashed again (the blob digest) on the way to a temporary file that is renamed to its digest. The
same files always give the same bytes, so the same inputs give the same image digest, and no
model is ever held in memory whole.

An OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``) holds any number of
images; each is tagged by the ``org.opencontainers.image.ref.name`` annotation of its entry in
``index.json``, which is rewritten atomically, so a tag appears only once its image is complete.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from mlopt.core.errors import BadInput
from mlopt.runtime.files import sha256_file, write_atomic

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# Docker's media types name the same bytes as OCI's; an OCI manifest uses OCI's names.
TO_OCI = {DOCKER_MANIFEST: OCI_MANIFEST, DOCKER_LIST: OCI_INDEX, DOCKER_CONFIG: OCI_CONFIG,
          DOCKER_LAYER_GZIP: OCI_LAYER_GZIP, OCI_LAYER_GZIP: OCI_LAYER_GZIP, OCI_LAYER_TAR: OCI_LAYER_TAR,
          OCI_CONFIG: OCI_CONFIG}
REF_NAME = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20
GZIP_LEVEL = 1  # model weights hardly compress (about 8% at any level); level 1 costs the least time


def canonical_json(obj: Any) -> bytes:
    """The one byte form mlopt writes for JSON documents it digests (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Descriptor":
        return cls(d["mediaType"], d["digest"], int(d["size"]), dict(d.get("annotations") or {}), d.get("platform"))


@dataclass(frozen=True)
class FileEntry:
    """One file of a layer: streamed from ``source``, or small generated ``data``, or a symlink, or a
    hard link to a file that sorts before it in the same layer (a real file wherever it is copied)."""

    path: str  # inside the image, without the leading '/'
    source: Path | None = None
    data: bytes | None = None
    mode: int = 0o644
    link: str | None = None
    hardlink: str | None = None  # the image path of the linked file


@dataclass(frozen=True)
class Layer:
    descriptor: Descriptor
    diff_id: str  # sha256 of the uncompressed tar, listed in the config's rootfs


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it to ``sink``."""

    def __init__(self, sink: BinaryIO):
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _tar_info(path: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def _with_parents(entries: Iterable[FileEntry]) -> list[tuple[str, FileEntry | None]]:
    """Every entry plus a directory entry for each parent folder, sorted by path."""
    items: dict[str, FileEntry | None] = {}
    for e in entries:
        path = e.path.strip("/")
        if path in items:
            raise ValueError(f"layer lists {path!r} twice")
        items[path] = e
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            items.setdefault("/".join(parts[:i]), None)
    for path, e in items.items():  # a tar hard link names a file written before it
        target = e.hardlink.strip("/") if e is not None and e.hardlink is not None else None
        if target is not None and (items.get(target) is None or not target < path):
            raise ValueError(f"layer hard link {path!r} names {target!r}, which is not a file before it in the layer")
    return sorted(items.items())


def _add(tar: tarfile.TarFile, path: str, entry: FileEntry | None) -> None:
    if entry is None:
        tar.addfile(_tar_info(path, tarfile.DIRTYPE, 0o755))
    elif entry.link is not None:
        tar.addfile(_tar_info(path, tarfile.SYMTYPE, 0o777, link=entry.link))
    elif entry.hardlink is not None:
        tar.addfile(_tar_info(path, tarfile.LNKTYPE, entry.mode, link=entry.hardlink.strip("/")))
    elif entry.data is not None:
        tar.addfile(_tar_info(path, tarfile.REGTYPE, entry.mode, len(entry.data)), io.BytesIO(entry.data))
    else:
        assert entry.source is not None
        with open(entry.source, "rb") as f:
            tar.addfile(_tar_info(path, tarfile.REGTYPE, entry.mode, os.fstat(f.fileno()).st_size), f)


class Layout:
    """An OCI image layout folder."""

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root)
        if create:
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            if not (self.root / "oci-layout").is_file():
                (self.root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
            if not (self.root / "index.json").is_file():
                self._write_index({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        elif not (self.root / "oci-layout").is_file() or not (self.root / "index.json").is_file():
            raise BadInput(f"{self.root} is not an OCI image layout (no oci-layout or index.json)",
                           hint="build one with `mlopt image build`, or give the folder `skopeo copy` wrote to")

    # ------------------------------------------------------------ blobs
    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64:
            raise BadInput(f"unsupported digest {digest!r} in {self.root} (only sha256)")
        return self.root / "blobs" / "sha256" / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def _temp(self) -> Path:
        return self.root / "blobs" / "sha256" / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"

    def _commit(self, tmp: Path, digest: str) -> None:
        dest = self.blob_path(digest)
        if dest.is_file():
            tmp.unlink()
        else:
            os.replace(tmp, dest)

    def put_bytes(self, data: bytes, media_type: str, annotations: dict[str, str] | None = None) -> Descriptor:
        """Store a small blob (a config or manifest document)."""
        digest = sha256_digest(data)
        if not self.has_blob(digest):
            tmp = self._temp()
            tmp.write_bytes(data)
            self._commit(tmp, digest)
        return Descriptor(media_type, digest, len(data), annotations or {})

    def read_bytes(self, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise BadInput(f"blob {digest} is missing from {self.root}") from None
        if sha256_digest(data) != digest:
            raise BadInput(f"blob {digest} in {self.root} is damaged: its content does not match its digest",
                           hint="build the image again (`mlopt image build`)")
        return data

    def read_json(self, digest: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(digest))

    def import_blob(self, src: Path, desc: Descriptor) -> None:
        """Copy a blob file into this layout (a hard link where possible), checking its digest."""
        if self.has_blob(desc.digest):
            return
        tmp = self._temp()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        if _digest(tmp) != desc.digest:
            tmp.unlink()
            raise BadInput(f"blob {desc.digest} at {src} is damaged: its content does not match its digest")
        self._commit(tmp, desc.digest)

    def blob_writer(self) -> "BlobWriter":
        return BlobWriter(self)

    def write_layer(self, entries: Iterable[FileEntry], gzip_level: int | None = GZIP_LEVEL,
                    annotations: dict[str, str] | None = None) -> Layer:
        """Write a deterministic tar layer (gzip unless ``gzip_level`` is None), streaming every file."""
        with self.blob_writer() as out:
            blob = _HashingWriter(out.file)
            gz = None if gzip_level is None else \
                gzip.GzipFile(filename="", mode="wb", fileobj=blob, compresslevel=gzip_level, mtime=0)  # type: ignore[arg-type]
            plain = blob if gz is None else _HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:  # type: ignore[call-overload]
                for path, entry in _with_parents(entries):
                    _add(tar, path, entry)
            if gz is not None:
                gz.close()
            out.finish(blob.digest)
        media = OCI_LAYER_TAR if gz is None else OCI_LAYER_GZIP
        return Layer(Descriptor(media, blob.digest, blob.size, annotations or {}), plain.digest)

    # ------------------------------------------------------------ index and tags
    def index(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "index.json").read_text())
        except (OSError, ValueError) as e:
            raise BadInput(f"{self.root}/index.json cannot be read: {e}") from None

    def _write_index(self, index: dict[str, Any]) -> None:
        write_atomic(self.root / "index.json", json.dumps(index, indent=2, sort_keys=True))

    def tag(self, tag: str, desc: Descriptor) -> None:
        """Point ``tag`` at a manifest already stored here (replacing what it pointed at)."""
        index = self.index()
        kept = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(REF_NAME) != tag]
        entry = Descriptor(desc.media_type, desc.digest, desc.size, {REF_NAME: tag}, desc.platform)
        index["manifests"] = kept + [entry.to_json()]
        self._write_index(index)

    def tags(self) -> dict[str, Descriptor]:
        return {m["annotations"][REF_NAME]: Descriptor.from_json(m) for m in self.index().get("manifests", [])
                if REF_NAME in (m.get("annotations") or {})}

    def resolve(self, tag: str | None) -> Descriptor:
        """The descriptor a tag names; with no tag, the layout's only image."""
        manifests = [Descriptor.from_json(m) for m in self.index().get("manifests", [])]
        if tag is None:
            if len(manifests) == 1:
                return manifests[0]
            tag = "latest"
        found = self.tags().get(tag)
        if found is None:
            names = ", ".join(sorted(self.tags())) or "none"
            raise BadInput(f"image {tag!r} not found in OCI layout {self.root}; its tags: {names}")
        return found

    def verify(self) -> list[str]:
        """Problems found re-hashing every blob that a tagged image uses (empty when intact)."""
        problems: list[str] = []
        for tag, desc in sorted(self.tags().items()):
            problems += [f"{tag}: {p}" for p in self._verify_manifest(desc)]
        return problems

    def verify_tag(self, tag: str) -> list[str]:
        """Problems found re-hashing the blobs of one tagged image."""
        return self._verify_manifest(self.resolve(tag))

    def _verify_manifest(self, desc: Descriptor) -> list[str]:
        try:
            manifest = self.read_json(desc.digest)
        except BadInput as e:
            return [e.message]
        blobs = [Descriptor.from_json(manifest["config"])] + [Descriptor.from_json(d) for d in manifest["layers"]]
        out = []
        for b in blobs:
            path = self.blob_path(b.digest)
            if not path.is_file():
                out.append(f"blob {b.digest} is missing")
            elif path.stat().st_size != b.size or _digest(path) != b.digest:
                out.append(f"blob {b.digest} is damaged (its content does not match its digest)")
        return out


class BlobWriter:
    """A temporary blob file renamed to its digest by ``finish``; removed if never finished."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.path = layout._temp()
        self.file: BinaryIO = open(self.path, "wb")
        self.digest: str | None = None

    def finish(self, digest: str) -> None:
        self.file.close()
        self.layout._commit(self.path, digest)
        self.digest = digest

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.file.closed:
            self.file.close()
        if self.digest is None:
            self.path.unlink(missing_ok=True)


def _digest(path: Path) -> str:
    return "sha256:" + sha256_file(path)


def select_platform(index: dict[str, Any], os_name: str, arch: str, where: str) -> Descriptor:
    """The manifest of an image index that runs on ``os_name``/``arch``."""
    for m in index.get("manifests", []):
        p = m.get("platform") or {}
        if p.get("os") == os_name and p.get("architecture") == arch:
            return Descriptor.from_json(m)
    have = ", ".join(f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
                     for m in index.get("manifests", []))
    raise BadInput(f"{where} has no {os_name}/{arch} image (it has: {have or 'none'})",
                   hint="give a base image built for the SKU's architecture with --base-image")
