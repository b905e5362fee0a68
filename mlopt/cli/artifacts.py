"""``mlopt artifacts list|show|verify|gc``: the artifact store (``mlopt.store``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mlopt.cli.guard import guard, out
from mlopt.cli.options import AsJson, StoreFolder

artifacts_app = typer.Typer(help="Inspect and maintain the artifact store.", no_args_is_help=True)


def _store(path: Optional[Path]) -> Any:
    from mlopt.store import Store

    return Store(path)


@artifacts_app.command("list")
@guard
def artifacts_list(store: StoreFolder = None, as_json: AsJson = False) -> None:
    """Stored artifacts by model and version."""
    st = _store(store)
    rows = _rows(st)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"artifacts in {st.root}")
    for col in ("id", "model", "version", "SKU", "backend", "precision", "size", "created"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"][:12], r["model"], f"v{r['version']}", r["sku"], r["backend"], r["precision"],
                  _size(r["bytes"]), r["created"])
    out.print(t)


def _rows(st: Any) -> list[dict[str, Any]]:
    rows = []
    for name, entry in st.models().items():
        for v in entry["versions"]:
            for key in v["artifacts"]:
                art = st.get(key)
                if art:
                    rows.append({"model": name, "version": v["version"], "id": key, "sku": art.meta["sku"],
                                 "backend": art.meta["backend"], "precision": art.meta["precision"],
                                 "bytes": sum(f["bytes"] for f in art.meta["files"].values()),
                                 "created": art.meta["created"]})
    return rows


@artifacts_app.command("show")
@guard
def artifacts_show(artifact_id: str, store: StoreFolder = None) -> None:
    """An artifact's metadata (files, digests, provenance) as JSON."""
    typer.echo(json.dumps({**_store(store).resolve(artifact_id).meta}, indent=2))


@artifacts_app.command("verify")
@guard
def artifacts_verify(artifact_id: Optional[str] = typer.Argument(None, help="An id; all artifacts when omitted."),
                     store: StoreFolder = None) -> int:
    """Re-hash artifacts' files against their recorded digests (exit 2 when any is damaged)."""
    st = _store(store)
    arts = [st.resolve(artifact_id)] if artifact_id else st.artifacts()
    bad = 0
    for art in arts:
        problems = st.verify(art)
        bad += bool(problems)
        out.print(f"{art.short} {'ok' if not problems else 'DAMAGED: ' + '; '.join(problems)}", highlight=False)
    out.print(f"{len(arts) - bad} ok, {bad} damaged")
    return 2 if bad else 0


@artifacts_app.command("gc")
@guard
def artifacts_gc(store: StoreFolder = None,
                 keep_last: Optional[int] = typer.Option(None, "--keep-last", min=0, help="Versions to keep per model."),
                 damaged: bool = typer.Option(False, "--damaged", help="Also remove artifacts that fail verification.")) -> None:
    """Remove unreferenced objects, stale temp folders, and old versions beyond --keep-last."""
    removed = _store(store).gc(keep_last=keep_last, damaged=damaged)
    out.print(", ".join(f"{v} {k}" for k, v in removed.items()) + " removed")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
