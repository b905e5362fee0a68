"""The CLI's two consoles and its one error boundary: ``guard`` runs a command and turns what it raises
(``MloptError``, Ctrl-C, a full disk, a bug) into one message and the documented exit code.

Only here are ``MloptError`` turned into messages and exit codes.
"""

from __future__ import annotations

import errno
import functools
import sys
import traceback
from typing import Any, Callable

import typer
from rich.console import Console

from mlopt.core.errors import MloptError

# Wide enough for the summary table when output goes to a file or a CI log.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
STATE = {"debug": False}  # set by `mlopt --debug`


def guard(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command: errors become one message and their exit code; an int it returns is its exit code."""
    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> None:
        code = _run(lambda: command(*args, **kwargs))
        if code is not None:
            raise typer.Exit(code)
    return guarded


def _run(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn errors into one message and the documented exit code."""
    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:  # Ctrl-C: store writes are atomic (temp folder, then rename), so none is half-done
        _debug_traceback()
        err.print("interrupted", highlight=False)
        raise typer.Exit(130)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            _fail(f"unexpected {type(e).__name__}: {e}", "run again with --debug for the traceback", 1)
        from mlopt.core.errors import disk_full

        full = disk_full(e)  # a full disk is the user's to fix, wherever the write was
        _fail(full.message, full.hint, full.exit_code)
    except MloptError as e:
        _fail(e.message, e.hint, e.exit_code)
    except Exception as e:  # an unexpected failure (a bug): one line, the traceback with --debug
        _fail(f"unexpected {type(e).__name__}: {e}", "run again with --debug for the traceback", 1)


def _debug_traceback() -> None:
    if STATE["debug"]:
        traceback.print_exc()


def _fail(message: str, hint: str | None, code: int) -> None:
    _debug_traceback()
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err.print(f"[yellow]hint:[/] {hint}", highlight=False)
    raise typer.Exit(code)
