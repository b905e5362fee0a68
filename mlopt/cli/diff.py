"""``mlopt diff``: two manifests compared per SKU, with the gate verdicts (the ``--gate-*`` flags are
compile's, ``mlopt.cli.options.GATE_FLAGS``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from mlopt.cli.guard import guard, out
from mlopt.cli.options import GATE_FLAGS, overrides, with_flags
from mlopt.core.errors import RecipeError

Old = Annotated[str, typer.Argument(help="The baseline manifest: a path or an http(s):// / file:// URL.")]
New = Annotated[str, typer.Argument(help="The new manifest: a path or URL.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the diff as JSON (format mlopt-diff/1).")]
Markdown = Annotated[bool, typer.Option("--markdown", help="Print GitHub-flavoured Markdown (for a PR comment).")]
FailOnGates = Annotated[bool, typer.Option("--fail-on-gates", help="Exit 6 when a gate fails.")]


@guard
@with_flags(GATE_FLAGS)
def diff_cmd(old: Old, new: New, as_json: AsJson = False, markdown: Markdown = False,
             fail_on_gates: FailOnGates = False, *, flags: dict[str, Any]) -> None:
    """What changed per SKU between two manifests (backend, figures, digests) with the gate verdicts.
    Limits default to those NEW was gated with, else the recipe defaults. Exit 0 unless --fail-on-gates."""
    from mlopt.core.errors import GateFailed
    from mlopt.diff import default_limits, diff_manifests, diff_table, to_markdown
    from mlopt.gates import load_manifest_ref
    from mlopt.manifest import GateLimits

    a, b = load_manifest_ref(old, "old manifest"), load_manifest_ref(new, "new manifest")
    given = overrides(GATE_FLAGS, flags).get("gates", {})
    check_gate_flags(given)
    limits = GateLimits.model_validate({**default_limits(b).model_dump(), **given})
    d = diff_manifests(a, b, limits, old, new)
    if as_json:
        typer.echo(json.dumps(d.model_dump(mode="json"), indent=2))
    elif markdown:
        typer.echo(to_markdown(d), nl=False)
    else:
        out.print(diff_table(d))
        for f in d.failures:
            out.print(f"[red]gate failed:[/] {f}", highlight=False)
        for w in d.warnings:
            out.print(f"[yellow]warning:[/] {w}", highlight=False)
    if fail_on_gates and d.verdict == "fail":
        raise GateFailed(f"{len(d.failures)} gate(s) failed: " + "; ".join(d.failures))


def check_gate_flags(given: dict[str, Any]) -> None:
    """The gate flags obey the recipe's rules (``gates:``): a bad value is exit 2, as in compile."""
    from pydantic import ValidationError

    from mlopt.recipes.schema import Gates

    try:
        Gates(**given)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(f"--gate flag {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
