"""The pass registry: passes describe themselves, the recipe is built from them, and order is checked at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import pytest
import yaml
from typer.testing import CliRunner

from conftest import digits_recipe, tiny_onnx
from mlopt.cli import app
from mlopt.core.errors import RecipeError, UnknownName
from mlopt.core.spec import Strict
from mlopt.passes import PASSES, get_pass, register
from mlopt.recipes import load_recipe
from mlopt.recipes.schema import Recipe

runner = CliRunner()

# Every property of every pass config as the recipe schema listed them before the configs moved
# beside their passes (mlopt/recipes/schema.py -> mlopt/passes/*.py). A field lost or renamed fails.
PASS_FIELDS = {
    "GraphOptimizePass": ["kind", "name", "on_violation", "fold_constants"],
    "QuantizePass": ["kind", "name", "on_violation", "mode", "per_channel", "calibration", "calibration_batches",
                     "op_types", "exclude_nodes", "float_input_channels", "weight_bits", "block_size",
                     "keep_io_types", "preset", "model_type", "search", "search_space"],
    "QuantSearch": ["per_channel", "calibration", "keep_float", "precisions", "max_candidates"],
    "PrunePass": ["kind", "name", "on_violation", "method", "ratio", "heads", "layers", "importance", "global_pruning",
                  "ignore", "finetune_steps", "lr"],
    "StudentFromPrune": ["from", "ratio", "importance"],
    "DistillPass": ["kind", "name", "on_violation", "student", "teacher", "match", "temperature", "alpha", "steps",
                    "lr"],
    "QatPass": ["kind", "name", "on_violation", "steps", "lr", "match", "temperature", "calibration",
                "calibration_batches", "float_input_channels", "weight_bits"],
}
REQUIRED = {"GraphOptimizePass": ["kind"], "QuantizePass": ["kind"], "PrunePass": ["kind"],
            "StudentFromPrune": ["from"], "DistillPass": ["kind", "student"], "QatPass": ["kind"]}
KINDS = {"graph-optimize": "GraphOptimizePass", "quantize": "QuantizePass", "prune": "PrunePass",
         "distill": "DistillPass", "fuse-transformer": "FuseTransformerPass", "qat": "QatPass"}


def _schema() -> dict:
    res = runner.invoke(app, ["recipe", "schema"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


# ------------------------------------------------------------------ the registry


def test_each_pass_describes_itself() -> None:
    assert {k: (s.changes_outputs, s.trains_module) for k, s in PASSES.items()} == {
        "graph-optimize": (False, False), "quantize": (True, False), "prune": (True, True), "distill": (True, True),
        "fuse-transformer": (False, False), "qat": (True, True)}
    # qat trains a module, but leaves only its QDQ export: no later pass can train on it
    assert [k for k, s in PASSES.items() if not s.keeps_module] == ["quantize", "fuse-transformer", "qat"]
    for kind, spec in PASSES.items():
        assert spec.kind == kind and spec.config.__name__ == KINDS[kind]
        assert spec.summary and "\n" not in spec.summary
        assert spec.config.__module__ == spec.fn.__module__  # the config lives beside its pass


def test_a_kind_registers_once() -> None:
    spec = PASSES["quantize"]
    with pytest.raises(ValueError, match="'quantize' is registered twice"):
        register("quantize", config=spec.config, changes_outputs=True)(spec.fn)
    assert PASSES["quantize"] is spec

    class ShrinkPass(Strict):
        kind: Literal["shrink"]
        name: str | None = None
        on_violation: Literal["fail", "skip"] | None = None

    try:
        register("shrink", config=ShrinkPass, changes_outputs=False)(spec.fn)
        assert get_pass("shrink").config is ShrinkPass
        with pytest.raises(ValueError, match="registered twice"):
            register("shrink", config=ShrinkPass, changes_outputs=True)(spec.fn)
        assert PASSES["shrink"].changes_outputs is False
    finally:
        PASSES.pop("shrink", None)


def test_a_config_must_carry_its_kind() -> None:
    class Mislabelled(Strict):
        kind: Literal["other"]
        name: str | None = None
        on_violation: Literal["fail", "skip"] | None = None

    with pytest.raises(ValueError, match=r"kind: Literal\['shrink'\]"):
        register("shrink", config=Mislabelled, changes_outputs=False)(PASSES["quantize"].fn)
    assert "shrink" not in PASSES


def test_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(UnknownName) as e:
        get_pass("shrink")
    assert all(kind in str(e.value) for kind in PASSES)


# ------------------------------------------------------------------ the recipe is built from it


def test_recipe_pass_union_is_the_registry() -> None:
    (step,) = get_args(Recipe.model_fields["passes"].annotation)  # list[Annotated[Union[...], Field(discriminator)]]
    union = get_args(step)[0]
    assert set(get_args(union)) == {spec.config for spec in PASSES.values()}
    mapping = _schema()["properties"]["passes"]["items"]["discriminator"]["mapping"]
    assert mapping == {kind: f"#/$defs/{spec.config.__name__}" for kind, spec in PASSES.items()}


def test_recipe_schema_keeps_every_pass_field() -> None:
    defs = _schema()["$defs"]
    assert {k: list(defs[k]["properties"]) for k in PASS_FIELDS} == PASS_FIELDS
    assert {k: defs[k].get("required") for k in REQUIRED} == REQUIRED
    assert all(defs[k]["additionalProperties"] is False for k in PASS_FIELDS)  # unknown keys stay errors
    assert set(KINDS) == set(PASSES)


# ------------------------------------------------------------------ the order is checked when the recipe loads


def _said(res: object) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(res.output.split())  # type: ignore[attr-defined]


def _digits_with(tmp: Path, passes: list[dict]) -> Path:
    return digits_recipe(tmp, passes=passes, targets=["host"])


def test_training_after_quantize_is_refused_at_load(tmp_path: Path) -> None:
    recipe = _digits_with(tmp_path, [{"kind": "quantize"}, {"kind": "prune", "name": "small"}])
    res = runner.invoke(app, ["compile", str(recipe), "--dry-run"])
    assert res.exit_code == 2
    assert "prune 'small' (passes[1]) must come before quantize (passes[0])" in _said(res)
    assert "trains the float PyTorch module" in _said(res)
    res = runner.invoke(app, ["compile", str(recipe)])  # the build never starts
    assert res.exit_code == 2 and "must come before quantize" in _said(res)
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="distill"):
        load_recipe(_digits_with(tmp_path, [{"kind": "quantize"}, {"kind": "graph-optimize"},
                                            {"kind": "distill", "student": {"from": "prune"}}]))


def test_training_before_quantize_loads(tmp_path: Path) -> None:
    passes = [{"kind": "graph-optimize"}, {"kind": "prune"}, {"kind": "distill", "student": {"from": "prune"}},
              {"kind": "quantize"}, {"kind": "graph-optimize"}]
    res = runner.invoke(app, ["compile", str(_digits_with(tmp_path, passes)), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert [p["kind"] for p in yaml.safe_load(res.output)["passes"]] == [p["kind"] for p in passes]


def test_training_an_onnx_source_is_refused_at_load(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compile", str(tiny_onnx(tmp_path / "m.onnx")), "--pass", "graph-optimize",
                              "--pass", "prune", "--dry-run"])
    assert res.exit_code == 2
    assert "pass prune (passes[1]) trains the PyTorch module" in _said(res) and "m.onnx" in _said(res)
