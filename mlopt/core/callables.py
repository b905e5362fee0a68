"""The user's code a recipe names: 'path/to/file.py:function' or 'package.module:function'.

Model factories, data sources, metrics and student factories are all loaded here; the file is run
as a module once per process (its folder on ``sys.path`` while it imports).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from mlopt.core.errors import ModelLoadError


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import 'path/to/file.py:function' or 'package.module:function'."""
    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise ModelLoadError(f"{what} {spec!r} must look like 'path/to/file.py:function' or 'package.module:function'")
    module = _import(target, what)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ModelLoadError(f"{what} {spec!r}: {target} has no function {func!r}")
    return fn


def _import(target: str, what: str) -> Any:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"{what} file {path} does not exist")
        name = "mlopt_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        finally:
            sys.path.remove(str(path.parent))
        sys.modules[name] = module
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ModelLoadError(f"{what}: cannot import {target!r}: {e}") from None
