from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import EXAMPLES, digits_recipe, write_recipe
from mlopt.cli import app
from mlopt.core.errors import RecipeError
from mlopt.recipes import load_recipe, recipe_from_dict

runner = CliRunner()


@pytest.mark.parametrize("example", ["digits", "efficientnet", "minilm"])
def test_bundled_recipes_load(example: str) -> None:
    recipe = load_recipe(EXAMPLES / example / "recipe.yaml")
    assert recipe.targets
    assert Path(recipe.model.source.rpartition(":")[0] or recipe.model.source).is_absolute()


def test_typo_names_the_field_and_suggests(tmp_path: Path) -> None:
    data = yaml.safe_load(digits_recipe(tmp_path).read_text())
    data["benchmark"]["batch_size"] = [1]
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path / "r.yaml", data))
    assert "benchmark.batch_size" in str(e.value) and "batch_sizes" in str(e.value)


def test_bad_value_names_the_path() -> None:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"name": "m", "model": {"source": "m.onnx"}, "benchmark": {"batch_sizes": [0]}})
    assert "benchmark.batch_sizes" in str(e.value)


def test_unknown_pass_kind_lists_choices() -> None:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"name": "m", "model": {"source": "m.onnx"}, "passes": [{"kind": "shrink"}]})
    assert "graph-optimize" in str(e.value)


def test_torch_source_needs_signature() -> None:
    with pytest.raises(RecipeError, match="input signature"):
        recipe_from_dict({"name": "m", "model": {"source": "model.py:build"}})


def test_dry_run_prints_resolved_recipe_with_flags(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compile", "model.onnx", "--input", "x:1x3x224x224", "--target", "cpu-x86-64-v4",
                              "--batch-sizes", "1,8,32", "--runs", "7", "--threads", "4", "--trials", "16",
                              "--max-drop", "0.02", "--pass", "graph-optimize", "--out", str(tmp_path / "o"),
                              "--dry-run"])
    assert res.exit_code == 0, res.output
    recipe = yaml.safe_load(res.output)
    assert recipe["model"]["inputs"] == [{"name": "x", "shape": [1, 3, 224, 224], "dtype": "float32"}]
    assert recipe["targets"] == ["cpu-x86-64-v4"]
    assert recipe["benchmark"]["batch_sizes"] == [1, 8, 32] and recipe["benchmark"]["runs"] == 7
    assert recipe["benchmark"]["threads"] == 4 and recipe["tuning"]["trials"] == 16
    assert recipe["accuracy"]["max_drop"] == 0.02 and recipe["passes"][0]["kind"] == "graph-optimize"
    # the printed recipe replays: it validates as a recipe of its own
    assert recipe_from_dict(recipe).benchmark.runs == 7


def test_flags_override_recipe_file(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compile", str(digits_recipe(tmp_path)), "--target", "cpu-x86-64-v3", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["targets"] == ["cpu-x86-64-v3"]


def test_bad_input_flag_is_exit_2() -> None:
    res = runner.invoke(app, ["compile", "m.onnx", "--input", "x", "--dry-run"])
    assert res.exit_code == 2
    assert "name:1x3x224x224" in res.output


def test_recipe_schema_is_json_schema() -> None:
    import json

    import jsonschema

    res = runner.invoke(app, ["recipe", "schema"])
    schema = json.loads(res.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "benchmark" in schema["properties"]
