"""The artifact store: content-addressed, versioned per model name, atomic, locked, verified.

Layout of a store folder::

    objects/<key>/        one artifact: its files and artifact.json (file digests, provenance)
    cache/<kind>/<key>/   replayable step results (ingest, pass, measure) and matrix task records, with meta.json
    index.json            model name -> versions -> artifact keys
    tmp/                  work in progress; renamed into place when complete
    lock                  flock(2) lock taken for every write
    locks/<kind>-<key>    flock(2) lock of a step being made: concurrent builds wait and reuse it

An artifact's key is the sha256 of what made it (input model, pass configs, toolchain versions,
target, backend); its files are checked against their recorded sha256 on every read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from mlopt.core import hostlock
from mlopt.core.files import flock, fsync_dir, key_of, sha256_file, write_json
from mlopt.core.errors import StoreError, UnknownName, disk_full

ARTIFACT_META = "artifact.json"
STEP_META = "meta.json"


def default_store_path() -> Path:
    return Path(os.environ.get("MLOPT_STORE") or Path.home() / ".cache" / "mlopt" / "store")


@dataclass(frozen=True)
class Artifact:
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def short(self) -> str:
        return self.key[:12]


class Store:
    """A local artifact store folder."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser().absolute() if root else default_store_path()
        self._check_writable()

    # ------------------------------------------------------------ basics
    def _check_writable(self) -> None:
        try:
            for sub in ("objects", "cache", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / "tmp" / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(e) from None
            raise StoreError(
                f"artifact store {self.root} is not writable ({e.strerror or e})",
                hint="pass --store DIR (or set MLOPT_STORE) to a folder you can write",
            ) from None

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive lock for writes to the index and objects (concurrent builds wait)."""
        return flock(self.root / "lock")

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder under tmp/, removed afterwards unless it was moved into place."""
        tmp = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, dest: Path) -> bool:
        """Atomically move ``tmp`` to ``dest``; False when another writer got there first."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
            return True
        except OSError:
            if dest.exists():
                return False
            raise

    # ------------------------------------------------------------ step cache
    def cached_step(self, kind: str, key: str, produce: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any], bool]:
        """Return (folder, meta, hit) for a replayable step, running ``produce(folder)`` on a miss.

        Processes asking for the same step at once (the SKU tasks of one recipe in a build matrix)
        run ``produce`` once: the others wait for it and get its result as a hit."""
        dest = self.root / "cache" / kind / key
        meta_file = dest / STEP_META
        if meta_file.is_file():
            return dest, json.loads(meta_file.read_text()), True
        (self.root / "locks").mkdir(exist_ok=True)
        # one producer per step: a concurrent build of the same recipe waits here, then reuses the result
        with flock(self.root / "locks" / f"{kind}-{key}", hostlock.waiting):
            if meta_file.is_file():
                return dest, json.loads(meta_file.read_text()), True
            with self.staging() as tmp:
                work = tmp / "step"
                work.mkdir()
                meta = produce(work)
                write_json(work / STEP_META, meta)
                with self.lock():
                    self._publish(work, dest)
        return dest, json.loads(meta_file.read_text()), False

    def lookup_step(self, kind: str, key: str) -> dict[str, Any] | None:
        """The meta of a recorded step, or None."""
        meta_file = self.root / "cache" / kind / key / STEP_META
        return json.loads(meta_file.read_text()) if meta_file.is_file() else None

    def record_step(self, kind: str, key: str, meta: dict[str, Any]) -> None:
        """Record (or replace) a step that has no files of its own, atomically."""
        dest = self.root / "cache" / kind / key
        with self.lock():
            dest.mkdir(parents=True, exist_ok=True)
            write_json(dest / STEP_META, meta)

    # ------------------------------------------------------------ artifacts
    def get(self, key: str) -> Artifact | None:
        dest = self.root / "objects" / key
        meta = dest / ARTIFACT_META
        if not meta.is_file():
            return None
        return Artifact(key, dest, json.loads(meta.read_text()))

    def put(self, key: str, files_dir: Path, meta: dict[str, Any], version: tuple[str, int] | None = None) -> Artifact:
        """Commit the files in ``files_dir`` (a staging folder) as artifact ``key``, and link it to
        ``version`` (model, number) under the same lock, so ``gc`` never sees it unreferenced."""
        files = {p.relative_to(files_dir).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(files_dir.rglob("*")) if p.is_file()}
        content = key_of({k: v["sha256"] for k, v in files.items()})
        full = {**meta, "key": key, "files": files, "content_digest": content, "created": _now()}
        write_json(files_dir / ARTIFACT_META, full)
        with self.lock():
            self._publish(files_dir, self.root / "objects" / key)
            if version is not None:
                self._link(*version, key)
        art = self.get(key)
        assert art is not None
        return art

    def resolve(self, ref: str) -> Artifact:
        """An artifact by key or unique key prefix (at least 6 characters)."""
        if len(ref) < 6:
            raise UnknownName(f"artifact id {ref!r} is too short; give at least 6 characters")
        matches = [p.name for p in (self.root / "objects").iterdir() if p.name.startswith(ref)]
        if len(matches) != 1:
            what = "no artifact" if not matches else f"{len(matches)} artifacts"
            raise UnknownName(f"{what} match {ref!r} in {self.root}", hint="`mlopt artifacts list` shows the ids")
        art = self.get(matches[0])
        if art is None:
            raise StoreError(f"artifact {matches[0]} has no {ARTIFACT_META}; the store may be damaged (try `mlopt artifacts gc`)")
        return art

    def verify(self, art: Artifact) -> list[str]:
        """Problems found re-hashing an artifact's files (empty when intact)."""
        problems = []
        for rel, info in art.meta.get("files", {}).items():
            p = art.path / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
            elif sha256_file(p) != info["sha256"]:
                problems.append(f"{rel}: sha256 differs from the recorded digest")
        present = {p.relative_to(art.path).as_posix() for p in art.path.rglob("*") if p.is_file()} - {ARTIFACT_META}
        problems += [f"{rel}: not recorded" for rel in sorted(present - set(art.meta.get("files", {})))]
        return problems

    def checked(self, key: str) -> Artifact | None:
        """``get`` plus digest verification: a damaged artifact is an error, not a cache hit."""
        art = self.get(key)
        if art is not None and (problems := self.verify(art)):
            raise StoreError(f"artifact {key[:12]} is damaged: {'; '.join(problems[:3])}",
                             hint="remove it with `mlopt artifacts gc --damaged` and build again")
        return art

    def artifacts(self) -> list[Artifact]:
        out = []
        for p in sorted((self.root / "objects").iterdir()):
            if (p / ARTIFACT_META).is_file():
                out.append(Artifact(p.name, p, json.loads((p / ARTIFACT_META).read_text())))
        return out

    # ------------------------------------------------------------ versions
    def _index(self) -> dict[str, Any]:
        f = self.root / "index.json"
        if not f.is_file():
            return {"models": {}}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            raise StoreError(f"{f} is corrupt", hint="restore it from a backup or move the store aside") from None

    def version_for(self, model: str, version_key: str, info: dict[str, Any]) -> int:
        """The version number of ``version_key`` under ``model``, adding the next one if new."""
        with self.lock():
            index = self._index()
            versions = index["models"].setdefault(model, {"versions": []})["versions"]
            for v in versions:
                if v["key"] == version_key:
                    return int(v["version"])
            number = 1 + max((int(v["version"]) for v in versions), default=0)
            versions.append({"version": number, "key": version_key, "created": _now(), "artifacts": [], **info})
            write_json(self.root / "index.json", index)
            return number

    def link(self, model: str, version: int, artifact_key: str) -> None:
        """Record that ``artifact_key`` belongs to ``model`` version ``version``."""
        with self.lock():
            self._link(model, version, artifact_key)

    def _link(self, model: str, version: int, artifact_key: str) -> None:
        index = self._index()
        for v in index["models"].get(model, {}).get("versions", []):
            if v["version"] == version and artifact_key not in v["artifacts"]:
                v["artifacts"].append(artifact_key)
        write_json(self.root / "index.json", index)

    def models(self) -> dict[str, Any]:
        return self._index()["models"]

    # ------------------------------------------------------------ gc
    def gc(self, keep_last: int | None = None, damaged: bool = False) -> dict[str, int]:
        """Remove stale temp folders, unreferenced objects, old versions beyond ``keep_last``."""
        removed = {"tmp": 0, "objects": 0, "versions": 0, "damaged": 0}
        with self.lock():
            index = self._index()
            if keep_last is not None:
                for entry in index["models"].values():
                    vs = sorted(entry["versions"], key=lambda v: v["version"])
                    removed["versions"] += max(0, len(vs) - keep_last)
                    entry["versions"] = vs[-keep_last:] if keep_last > 0 else []
                write_json(self.root / "index.json", index)
            live = {a for e in index["models"].values() for v in e["versions"] for a in v["artifacts"]}
            for p in (self.root / "objects").iterdir():
                art = self.get(p.name)
                bad = art is None or (damaged and self.verify(art))
                if p.name not in live or bad:
                    shutil.rmtree(p, ignore_errors=True)
                    removed["damaged" if bad and p.name in live else "objects"] += 1
            for p in (self.root / "tmp").iterdir():
                if not _pid_alive(p.name.split("-")[0]):
                    shutil.rmtree(p, ignore_errors=True)
                    removed["tmp"] += 1
        return removed


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
