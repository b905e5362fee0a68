"""Hashing, atomic writes and merging, defined once (the byte-level helpers live in
``mlopt.runtime.files`` because images ship them too)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlopt.runtime.files import flock, fsync_dir, sha256_file, write_atomic

__all__ = ["deep_merge", "flock", "fsync_dir", "key_of", "sha256_file", "write_atomic", "write_json"]


def key_of(parts: Any) -> str:
    """sha256 of a JSON-serialisable description (keys sorted, so the order of a dict does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, data: Any, *, sort_keys: bool = True) -> Path:
    """Write ``data`` as strict JSON (RFC 8259: NaN and infinity are refused), atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=str, allow_nan=False) + "\n")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, merging nested mappings (overriding one key of a section keeps the rest)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
