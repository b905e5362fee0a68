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
    """The store these commands inspect: it must exist (a mistyped --store is exit 2, not a new empty store)."""
    from mlopt.store import Store

    return Store.existing(path)


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
    for col in ("id", "model", "version", "SKU", "backend", "precision", "size", "created", "complete"):
        t.add_column(col)
    for r in rows:  # complete: whether the compile that made the version finished (a killed one did not)
        done = {True: "yes", False: "no"}.get(r["complete"], "-")
        t.add_row(r["id"][:12], r["model"], f"v{r['version']}", r["sku"], r["backend"], r["precision"],
                  _size(r["bytes"]), r["created"], done)
    out.print(t)


def _rows(st: Any) -> list[dict[str, Any]]:
    rows = []
    for name, entry in st.models().items():
        for v in entry["versions"]:
            for key in v["artifacts"]:
                art = st.get(key)
                if art and not art.damaged:
                    rows.append({"model": name, "version": v["version"], "id": key, "sku": art.meta.get("sku"),
                                 "backend": art.meta.get("backend"), "precision": art.meta.get("precision"),
                                 "bytes": sum(f.get("bytes", 0) for f in art.meta.get("files", {}).values()),
                                 "created": art.meta.get("created"), "complete": v.get("complete")})
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
    """Re-hash artifacts' files, and every cached step's, against their recorded digests (exit 2 when any
    is damaged; the next compile rebuilds damaged entries, `gc --damaged` removes them)."""
    st = _store(store)
    arts = [st.resolve(artifact_id)] if artifact_id else st.artifacts()
    bad = _report([(a.short, st.verify(a)) for a in arts])
    out.print(f"{len(arts) - bad} ok, {bad} damaged")
    if artifact_id:
        return 2 if bad else 0
    steps = st.steps()
    bad_steps = _report([(f"cache/{s.parent.name}/{s.name[:12]}", st.verify_step(s)) for s in steps])
    out.print(f"cached steps: {len(steps) - bad_steps} ok, {bad_steps} damaged")
    return 2 if bad or bad_steps else 0


def _report(checked: list[tuple[str, list[str]]]) -> int:
    """Print one line per checked entry; the number of damaged ones."""
    for name, problems in checked:
        out.print(f"{name} {'ok' if not problems else 'DAMAGED: ' + '; '.join(problems)}", highlight=False)
    return sum(bool(p) for _, p in checked)


@artifacts_app.command("gc")
@guard
def artifacts_gc(store: StoreFolder = None,
                 keep_last: Optional[int] = typer.Option(None, "--keep-last", min=0, help="Versions to keep per model."),
                 damaged: bool = typer.Option(False, "--damaged", help="Also remove artifacts and cached steps that "
                                                                         "fail verification.")) -> None:
    """Remove unreferenced objects, stale temp folders, and old versions beyond --keep-last (never a version
    a running compile holds)."""
    removed = _store(store).gc(keep_last=keep_last, damaged=damaged)
    held = removed.pop("held")
    out.print(", ".join(f"{v} {k}" for k, v in removed.items()) + " removed"
              + (f"; kept {held} old version(s) a running compile holds" if held else ""))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
