"""The artifact store: content-addressed, versioned per model name, atomic, locked, verified.

Layout of a store folder::

    objects/<key>/        one artifact: its files and artifact.json (file digests, provenance)
    cache/<kind>/<key>/   replayable step results (ingest, pass, measure) and matrix task records, with meta.json
                          and files.json (the sha256 of every file of the step, meta.json included)
    index.json            model name -> versions -> artifact keys
    tmp/                  work in progress; renamed into place when complete
    lock                  flock(2) lock taken for every write
    locks/<kind>-<key>    flock(2) lock of a step being made: concurrent builds wait and reuse it
    locks/version-<model>-<n>  shared flock(2) a running compile holds on its version: gc keeps that version

An artifact's key is the sha256 of what made it (input model, pass configs, toolchain versions,
target, backend); its files are checked against their recorded sha256 on every read, and so are a
cached step's. A damaged artifact or step is never used: it is removed and made again (the log says
so), and ``verify`` / ``gc --damaged`` report and repair both. A version records whether the compile
that made it finished (``complete``); a killed compile leaves ``complete: false``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from mlopt.core import hostlock
from mlopt.core.artifact import BuildInfo, BuildMeta, dump
from mlopt.core.files import flock, fsync_dir, key_of, sha256_file, write_json
from mlopt.core.errors import StoreError, UnknownName, disk_full

ARTIFACT_META = "artifact.json"
STEP_META = "meta.json"
STEP_FILES = "files.json"


def default_store_path() -> Path:
    return Path(os.environ.get("MLOPT_STORE") or Path.home() / ".cache" / "mlopt" / "store")


@dataclass(frozen=True)
class Artifact:
    key: str
    path: Path
    meta: dict[str, Any]  # artifact.json as stored (what runtimes and images read)
    damaged: str = ""  # why its artifact.json cannot be read ("" when it can)

    @property
    def short(self) -> str:
        return self.key[:12]

    @cached_property
    def build(self) -> BuildMeta:
        """``meta`` typed: the compiler's view of the build (refused when it lacks a field)."""
        return BuildMeta.model_validate(self.meta)


class Store:
    """A local artifact store folder."""

    def __init__(self, root: str | Path | None = None, log: Callable[[str], None] | None = None):
        self.root = Path(root).expanduser().absolute() if root else default_store_path()
        # where repairs are reported (a damaged step or artifact removed to be made again)
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self._check_writable()

    @classmethod
    def existing(cls, root: str | Path | None = None) -> "Store":
        """A store that must already exist (``verify``, ``gc``, ``list``): a typo is an error, not a new store."""
        path = Path(root).expanduser().absolute() if root else default_store_path()
        if not (path / "objects").is_dir():
            what = "does not exist" if not path.exists() else "is not an mlopt store (it has no objects/ folder)"
            raise StoreError(f"artifact store {path} {what}",
                             hint="check --store (or $MLOPT_STORE); a compile creates the store")
        return cls(path)

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
        meta = self._intact_step(dest)
        if meta is not None:
            return dest, meta, True
        (self.root / "locks").mkdir(exist_ok=True)
        # one producer per step: a concurrent build of the same recipe waits here, then reuses the result
        with flock(self.root / "locks" / f"{kind}-{key}", hostlock.waiting):
            meta = self._intact_step(dest)
            if meta is not None:
                return dest, meta, True
            with self.staging() as tmp:
                work = tmp / "step"
                work.mkdir()
                meta = produce(work)
                write_json(work / STEP_META, meta)
                write_json(work / STEP_FILES, _digests(work))
                with self.lock():
                    self._publish(work, dest)
        return dest, json.loads((dest / STEP_META).read_text()), False

    def verify_step(self, folder: Path) -> list[str]:
        """Problems found re-hashing a cached step's files against its files.json (empty when intact)."""
        try:
            recorded = json.loads((folder / STEP_FILES).read_text())
            json.loads((folder / STEP_META).read_text())
        except FileNotFoundError as e:
            return [f"{Path(e.filename).name}: missing"]
        except (OSError, ValueError) as e:
            return [f"unreadable record ({type(e).__name__})"]
        if not isinstance(recorded, dict):
            return [f"{STEP_FILES}: not a mapping of file digests"]
        return _compare(folder, recorded, skip={STEP_FILES})

    def steps(self) -> list[Path]:
        """Every cached step folder (cache/<kind>/<key>)."""
        cache = self.root / "cache"
        return sorted(p for kind in cache.iterdir() if kind.is_dir() for p in kind.iterdir() if p.is_dir()) \
            if cache.is_dir() else []

    def _intact_step(self, dest: Path) -> dict[str, Any] | None:
        """The meta of an intact cached step; a damaged one is removed (and reported), so it is made again."""
        if not dest.exists():
            return None
        problems = self.verify_step(dest)
        if not problems:
            return json.loads((dest / STEP_META).read_text())
        self.log(f"[store] cached step {dest.parent.name}/{dest.name[:12]} is damaged "
                 f"({'; '.join(problems[:3])}): making it again")
        self._discard(dest)
        return None

    def _discard(self, folder: Path) -> None:
        """Remove a damaged entry atomically: renamed out of place under the lock, then deleted."""
        with self.lock():
            if not folder.exists():
                return
            grave = self.root / "tmp" / f"{os.getpid()}-damaged-{uuid.uuid4().hex}"
            os.rename(folder, grave)
        shutil.rmtree(grave, ignore_errors=True)

    def lookup_step(self, kind: str, key: str) -> dict[str, Any] | None:
        """The meta of a recorded step, or None."""
        dest = self.root / "cache" / kind / key
        if not (dest / STEP_FILES).is_file():  # written before steps carried digests, or never
            return None
        return self._intact_step(dest)

    def record_step(self, kind: str, key: str, meta: dict[str, Any]) -> None:
        """Record (or replace) a step that has no files of its own, atomically."""
        dest = self.root / "cache" / kind / key
        with self.staging() as tmp:
            work = tmp / "step"
            work.mkdir()
            write_json(work / STEP_META, meta)
            write_json(work / STEP_FILES, _digests(work))
            with self.lock():
                if dest.exists():  # a reader in between sees no record (a miss), never half of one
                    os.rename(dest, tmp / "old")
                self._publish(work, dest)

    # ------------------------------------------------------------ artifacts
    def get(self, key: str) -> Artifact | None:
        dest = self.root / "objects" / key
        return self._artifact(dest) if dest.is_dir() else None

    @staticmethod
    def _artifact(dest: Path) -> Artifact:
        try:
            meta = json.loads((dest / ARTIFACT_META).read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a mapping")
            return Artifact(dest.name, dest, meta)
        except FileNotFoundError:
            return Artifact(dest.name, dest, {}, damaged=f"{ARTIFACT_META}: missing")
        except (OSError, ValueError) as e:
            return Artifact(dest.name, dest, {}, damaged=f"{ARTIFACT_META}: unreadable ({type(e).__name__})")

    def put(self, key: str, files_dir: Path, meta: BuildInfo | dict[str, Any],
            version: tuple[str, int] | None = None) -> Artifact:
        """Commit the files in ``files_dir`` (a staging folder) as artifact ``key``, and link it to
        ``version`` (model, number) under the same lock, so ``gc`` never sees it unreferenced."""
        meta = dump(meta) if isinstance(meta, BuildInfo) else meta
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
        if art.damaged:
            return [art.damaged]
        files = art.meta.get("files")
        if not isinstance(files, dict) or not all(isinstance(i, dict) and "sha256" in i for i in files.values()):
            return [f"{ARTIFACT_META}: has no file digests"]
        return _compare(art.path, {rel: info["sha256"] for rel, info in files.items()}, skip={ARTIFACT_META})

    def reusable(self, key: str) -> Artifact | None:
        """The artifact for ``key`` when it is intact. A damaged one is removed (and reported) and None
        returned, so the build makes it again, under the same key, rather than another backend's build
        silently taking its place."""
        art = self.get(key)
        if art is None or not (problems := self.verify(art)):
            return art
        self.log(f"[store] artifact {key[:12]} is damaged ({'; '.join(problems[:3])}): building it again")
        self._discard(art.path)
        return None

    def checked(self, key: str) -> Artifact | None:
        """``get`` plus digest verification: a damaged artifact is an error, not a cache hit."""
        art = self.get(key)
        if art is not None and (problems := self.verify(art)):
            raise StoreError(f"artifact {key[:12]} is damaged: {'; '.join(problems[:3])}",
                             hint="compile again (it rebuilds damaged artifacts), or remove it with "
                                  "`mlopt artifacts gc --damaged`")
        return art

    def artifacts(self) -> list[Artifact]:
        return [self._artifact(p) for p in sorted((self.root / "objects").iterdir()) if p.is_dir()]

    # ------------------------------------------------------------ versions
    def _index(self) -> dict[str, Any]:
        f = self.root / "index.json"
        if not f.is_file():
            return {"models": {}}
        try:
            index = json.loads(f.read_text())
        except (ValueError, OSError):  # not JSON, or not UTF-8
            raise StoreError(f"{f} is corrupt", hint="restore it from a backup or move the store aside") from None
        models = index.get("models") if isinstance(index, dict) else None
        if not isinstance(models, dict) or not all(
                isinstance(m, dict) and isinstance(m.get("versions"), list)
                and all(isinstance(v, dict) and isinstance(v.get("artifacts", []), list) for v in m["versions"])
                for m in models.values()):
            raise StoreError(f"{f} is not an mlopt store index (expected {{\"models\": {{NAME: {{\"versions\": [...]}}}}}})",
                             hint="restore it from a backup or move the store aside")
        return index

    def version_for(self, model: str, version_key: str, info: dict[str, Any]) -> int:
        """The version number of ``version_key`` under ``model``, adding the next one if new."""
        with self.lock():
            index = self._index()
            versions = index["models"].setdefault(model, {"versions": []})["versions"]
            for v in versions:
                if v["key"] == version_key:
                    return int(v["version"])
            number = 1 + max((int(v["version"]) for v in versions), default=0)
            versions.append({"version": number, "key": version_key, "created": _now(), "artifacts": [],
                             "complete": False, **info})
            write_json(self.root / "index.json", index)
            return number

    @contextlib.contextmanager
    def holding(self, model: str, version: int) -> Iterator[None]:
        """Hold ``model`` version ``version`` while a compile writes it: ``gc`` keeps a held version
        (a shared flock(2), released when the block ends or the process dies). On a normal end the
        version is marked complete; a killed compile leaves it ``complete: false``."""
        (self.root / "locks").mkdir(exist_ok=True)
        with open(self._lease(model, version), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                yield
                self.mark_complete(model, version)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def mark_complete(self, model: str, version: int) -> None:
        with self.lock():
            index = self._index()
            for v in index["models"].get(model, {}).get("versions", []):
                if v["version"] == version:
                    v["complete"] = True
            write_json(self.root / "index.json", index)

    def _lease(self, model: str, version: int) -> Path:
        return self.root / "locks" / f"version-{model}-{version}"

    def _held(self, model: str, version: int) -> bool:
        """Whether a running compile holds this version (its shared lock blocks an exclusive one)."""
        path = self._lease(model, version)
        if not path.exists():
            return False
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

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
        removed = {"tmp": 0, "objects": 0, "versions": 0, "damaged": 0, "steps": 0, "held": 0}
        with self.lock():
            index = self._index()
            if keep_last is not None:
                for model, entry in index["models"].items():
                    vs = sorted(entry["versions"], key=lambda v: v["version"])
                    old = vs[:-keep_last] if keep_last > 0 else vs
                    held = [v for v in old if self._held(model, v["version"])]  # a running compile's
                    removed["versions"] += len(old) - len(held)
                    removed["held"] += len(held)
                    entry["versions"] = held + (vs[-keep_last:] if keep_last > 0 else [])
                write_json(self.root / "index.json", index)
            live = {a for e in index["models"].values() for v in e["versions"] for a in v["artifacts"]}
            for p in (self.root / "objects").iterdir():
                art = self.get(p.name)
                bad = art is None or (damaged and self.verify(art))
                if p.name not in live or bad:
                    shutil.rmtree(p, ignore_errors=True)
                    removed["damaged" if bad and p.name in live else "objects"] += 1
            if damaged:
                for step in self.steps():
                    if self.verify_step(step):
                        shutil.rmtree(step, ignore_errors=True)
                        removed["steps"] += 1
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


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except files.json itself, by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STEP_FILES}


def _compare(folder: Path, recorded: dict[str, str], skip: set[str]) -> list[str]:
    """Files of ``folder`` that are missing, differ from ``recorded`` or were never recorded."""
    problems = []
    for rel, digest in recorded.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the recorded digest")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - skip
    return problems + [f"{rel}: not recorded" for rel in sorted(present - set(recorded))]
