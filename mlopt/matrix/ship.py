"""Artifacts sent back from a node that built into its own store, and adopted by the driver's store.

A node packs the artifacts its task manifest refers to, with the model version they belong to
(its key and digests, not its number: numbers are per store), into one tar. The driver re-files
each artifact under the same key, checks its content digest, links it to its own version number
for that version key, and rewrites the manifest's versions and paths to its store.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from mlopt.core.errors import StoreError
from mlopt.matrix.ledger import artifact_keys
from mlopt.core.files import sha256_file
from mlopt.store import ARTIFACT_META, Store

BUNDLE_META = "bundle.json"


def pack(store: Store, manifest: dict[str, Any]) -> bytes:
    """A tar of the manifest's artifacts and its model version (key and digests)."""
    model = manifest["models"][0]
    versions = store.models()[model["name"]]["versions"]
    version = next(v for v in versions if v["version"] == model["version"])
    keys = artifact_keys(manifest)
    meta = {"model": model["name"], "version_key": version["key"], "artifacts": keys,
            "info": {"input_digest": version["input_digest"], "final_digest": version["final_digest"]}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps(meta).encode()
        info = tarfile.TarInfo(BUNDLE_META)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for key in keys:
            tar.add(store.root / "objects" / key, arcname=f"objects/{key}")
    return buf.getvalue()


def adopt(store: Store, bundle: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
    """File a bundle's artifacts in ``store``; return the manifest rewritten to this store."""
    with store.staging() as tmp, tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        tar.extractall(tmp, filter="data")
        meta = json.loads((tmp / BUNDLE_META).read_text())
        version = store.version_for(meta["model"], meta["version_key"], meta["info"])
        for key in meta["artifacts"]:
            _adopt_one(store, tmp / "objects" / key, key, (meta["model"], version))
    return relocate(manifest, store, version)


def _adopt_one(store: Store, folder: Path, key: str, version: tuple[str, int]) -> None:
    sent = json.loads((folder / ARTIFACT_META).read_text())
    if store.checked(key) is not None:
        store.link(*version, key)
        return
    (folder / ARTIFACT_META).unlink()
    damaged = [rel for rel, info in sent["files"].items()
               if not (folder / rel).is_file() or sha256_file(folder / rel) != info["sha256"]]
    if damaged:
        raise StoreError(f"artifact {key[:12]} sent back by a node does not match its digests "
                         f"({', '.join(damaged[:3])})",
                         hint="run the task again; the node's store may be damaged (`mlopt artifacts verify`)")
    meta = {k: v for k, v in sent.items() if k not in ("key", "files", "content_digest", "created")}
    store.put(key, folder, meta, version=version)


def relocate(manifest: dict[str, Any], store: Store, version: int) -> dict[str, Any]:
    """The manifest with this store's version number and artifact paths."""
    m = copy.deepcopy(manifest)
    m["store"] = str(store.root)
    for model in m["models"]:
        model["version"] = version
    for e in m["entries"]:
        e["version"] = version
        for ref in [e.get("artifact"), *(c.get("artifact") for c in e["candidates"])]:
            if ref:
                ref["path"] = str(store.root / "objects" / ref["key"])
    return m
