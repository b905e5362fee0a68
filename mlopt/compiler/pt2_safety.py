"""Refuse a torch.export ``.pt2`` archive that would run code when torch loads it.

``torch.export.load`` unpickles some members with ``weights_only=False`` (pickled weights and
constants, sample inputs when the weights-only load fails, opaque objects) and loads AOTInductor
shared libraries. So before torch sees an archive, every member torch could unpickle is scanned
opcode by opcode (``pickletools.genops``, nothing is unpickled) and refused when it names a global
outside a small allow-list: tensor rebuild functions, storage and dtype names, plain containers.
Members torch reads only as raw bytes, JSON or text are skipped; anything unrecognised is scanned.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import pickletools
import posixpath
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

from mlopt.core.errors import ModelLoadError

_HINT = "mlopt loads only plain tensors from a .pt2; save the program again with torch.export.save from a trusted model"

ALLOWED_GLOBALS = frozenset({
    "collections.OrderedDict",
    "builtins.set", "builtins.frozenset", "builtins.list", "builtins.dict", "builtins.tuple",
    "builtins.bytearray", "builtins.complex", "builtins.slice", "_codecs.encode",
    "torch.Size", "torch.device", "torch.Tensor", "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout", "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_qtensor", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
    "torch.per_tensor_affine", "torch.per_tensor_symmetric", "torch.per_channel_affine",
    "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
})
_TORCH_STORAGE = re.compile(r"torch\.[A-Z][A-Za-z0-9]*Storage")
_TORCH_DTYPE = re.compile(
    r"torch\.(u?int(1|2|4|8|16|32|64)|float(16|32|64)|bfloat16|half|double|bool|complex(32|64|128)"
    r"|float8_e\w+|float4_e\w+|q(u?int8|int32|uint4x2|uint2x4)|bits\w+)"
)
_STRING_PUSHES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_NEUTRAL = {"PROTO", "FRAME", "STOP"}  # leave the stack as it is
_TEXT_NAMES = {"archive_format", "archive_version", "version", "byteorder", "serialization_id",
               ".format_version", ".storage_alignment"}
_TEXT_DIRS = ("/extra/", "/models/")  # read by torch as text or JSON only


def allowed(global_name: str) -> bool:
    """Whether a pickle may name this global ('module.name') in a .pt2 mlopt loads."""
    return (global_name in ALLOWED_GLOBALS or bool(_TORCH_STORAGE.fullmatch(global_name))
            or bool(_TORCH_DTYPE.fullmatch(global_name)))


def check_pt2(path: Path) -> None:
    """Raise ``ModelLoadError`` if ``path`` is not a readable zip archive, holds compiled code, or
    holds a pickle naming a global outside the allow-list. Nothing in the archive is executed."""
    with _open_archive(path) as archive:
        pickled, raw = _payload_roles(archive, path)
        for name in archive.namelist():
            if "/data/aotinductor/" in f"/{name}":
                raise ModelLoadError(f"{path}: member {name} is AOTInductor compiled code, which mlopt does not run",
                                     hint=_HINT)
            if name in pickled or not (name in raw or _is_text(name) or name.endswith("/")):
                check_payload(archive.read(name), f"{path}: member {name}")


def _open_archive(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist", hint="check model.source in the recipe")
    try:
        archive = zipfile.ZipFile(path)
        bad = archive.testzip()  # reads every member, so a truncated or corrupt one fails here
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a readable .pt2 archive ({type(e).__name__}: {_line(e)})",
                             hint="the file may be truncated or corrupt; save it again with torch.export.save") from None
    if bad is not None or not _has_pt2_marker(archive):
        archive.close()
        why = f"member {bad} fails its checksum" if bad else "it has no archive_format member"
        raise ModelLoadError(f"{path} is not a readable .pt2 archive ({why})",
                             hint="the file may be truncated or corrupt; save it again with torch.export.save")
    return archive


def _has_pt2_marker(archive: zipfile.ZipFile) -> bool:
    # a truncated .pt2 can still open as a zip: the one torch.save wrote inside it, near its end
    return any(posixpath.basename(n) == "archive_format" or n == "version" for n in archive.namelist())


def _payload_roles(archive: zipfile.ZipFile, path: Path) -> tuple[set[str], set[str]]:
    """Members the weights/constants configs name as pickled, and those they name as raw tensor bytes."""
    pickled: set[str] = set()
    raw: set[str] = set()
    for name in archive.namelist():
        if not name.endswith("_config.json") or "/data/" not in f"/{name}":
            continue
        folder = posixpath.dirname(name)
        for fqn, meta in _config_entries(archive, name, path):
            member = posixpath.normpath(posixpath.join(folder, str(meta.get("path_name", ""))))
            is_pickle = meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_"))
            (pickled if is_pickle else raw).add(member)
    return pickled, raw - pickled


def _config_entries(archive: zipfile.ZipFile, name: str, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        config = json.loads(archive.read(name))["config"]
        entries = [(str(k), v) for k, v in config.items() if isinstance(v, dict)]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{path}: member {name} is not a valid payload config ({type(e).__name__}: {_line(e)})",
                             hint=_HINT) from None
    yield from entries


def _is_text(name: str) -> bool:
    return (name.endswith(".json") or posixpath.basename(name) in _TEXT_NAMES
            or any(d in f"/{name}" for d in _TEXT_DIRS))


def check_payload(data: bytes, where: str) -> None:
    """Scan one member torch may unpickle: a torch.save zip (its ``.pkl`` members) or raw pickles."""
    if data[:4] != b"PK\x03\x04":
        scan_pickles(data, where)
        return
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
        members = {n: inner.read(n) for n in inner.namelist() if n.endswith((".pkl", ".py"))}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        raise ModelLoadError(f"{where} is a corrupt torch.save archive ({type(e).__name__}: {_line(e)})",
                             hint=_HINT) from None
    for name, body in members.items():
        if name.endswith(".py"):
            raise ModelLoadError(f"{where} holds TorchScript code ({name}), which mlopt does not run", hint=_HINT)
        scan_pickles(body, f"{where} ({name})")


def scan_pickles(data: bytes, where: str) -> None:
    """Check every global named by the pickles at the start of ``data`` (torch's legacy format
    writes several in a row, then raw storage bytes, where the scan stops)."""
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        start = stream.tell()
        if not _scan_one(stream, where) or stream.tell() == start:
            return


def _scan_one(stream: io.BytesIO, where: str) -> bool:
    """Scan one pickle; False when the bytes stop parsing as a pickle (raw data, or a broken pickle
    that the unpickler would also stop at, after the globals already checked)."""
    recent: list[str | None] = []  # what each stack-changing opcode pushed: a string, or None
    memo: dict[int, str | None] = {}
    proto = 0
    try:
        for op, arg, _pos in pickletools.genops(stream):
            if op.name == "PROTO":
                proto = arg
            _check_op(op.name, arg, recent, memo, proto, where)
    except ValueError:
        return False
    return True


def _check_op(op: str, arg: Any, recent: list[str | None], memo: dict[int, str | None], proto: int, where: str) -> None:
    if op in ("GLOBAL", "INST"):
        module, _, name = str(arg).partition(" ")
        _refuse_unless_allowed(module, name, proto, where)
    elif op == "STACK_GLOBAL":
        if len(recent) < 2 or recent[-2] is None or recent[-1] is None:
            raise ModelLoadError(f"{where}: a pickle names a global this check cannot read", hint=_HINT)
        _refuse_unless_allowed(recent[-2], recent[-1], proto, where)
    elif op in ("EXT1", "EXT2", "EXT4"):
        raise ModelLoadError(f"{where}: a pickle uses the copyreg extension registry ({op})", hint=_HINT)
    if op in _MEMO_PUTS:
        memo[len(memo) if op == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
    elif op in _MEMO_GETS:
        recent.append(memo.get(int(arg)))
    elif op in _STRING_PUSHES:
        recent.append(arg if isinstance(arg, str) else None)
    elif op not in _NEUTRAL:
        recent.append(None)


def _refuse_unless_allowed(module: str, name: str, proto: int, where: str) -> None:
    if proto < 3:  # the unpickler maps Python 2 names (fix_imports) for these protocols only
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    if not allowed(f"{module}.{name}"):
        raise ModelLoadError(f"{where} would call {module}.{name} when unpickled; refused", hint=_HINT)


def _line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]
