"""Load recipes from YAML (or dicts) into the strict ``Recipe`` model, with errors a user can act on."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mlopt.core.errors import RecipeError
from mlopt.core.files import deep_merge
from mlopt.passes import PASSES
from mlopt.recipes.schema import Recipe


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file, apply ``overrides`` (dotted-free nested dict), resolve relative paths."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
                          hint="save the recipe as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of fields (see `mlopt recipe schema`)")
    merged = deep_merge(raw, overrides or {})
    return recipe_from_dict(merged, where=str(path)).resolve_paths(path.parent.resolve())


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate a dict into a ``Recipe``; the first problems are reported with their field paths."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{where}: " + "; ".join(_describe(err) for err in e.errors()[:4])) from None


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, every field resolved (what --dry-run prints)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    if err["type"] == "extra_forbidden":
        return f"unknown field {loc!r}{_suggest(err)}"
    if err["type"] == "union_tag_invalid":
        return f"{loc}: {err['msg']}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg  # a rule across fields (the pass order) names its fields itself


def _suggest(err: dict[str, Any]) -> str:
    """For a misspelt key, name the field it probably meant."""
    *parent, key = err["loc"]
    fields = _fields_at(parent)
    near = difflib.get_close_matches(str(key), fields, n=1)
    return f" (did you mean {near[0]!r}?)" if near else (f" (allowed: {', '.join(fields)})" if fields else "")


def _fields_at(path: list[Any]) -> list[str]:
    model: Any = Recipe
    for part in path:
        if isinstance(part, int) or model is None:
            continue
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            # a discriminated union member ("graph-optimize"): look its config up by its tag
            spec = PASSES.get(part)
            model = spec.config if spec is not None else None
            continue
        model = _model_of(info.annotation)
    return sorted(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    from typing import get_args

    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
