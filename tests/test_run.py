"""The state one build's stages share: frozen, replaced rather than changed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlopt.compiler.run import Reference, Run
from mlopt.core.spec import InputSpec
from mlopt.recipes import recipe_from_dict


def _run(tmp_path: Path) -> Run:
    recipe = recipe_from_dict({"name": "m", "model": {"source": str(tmp_path / "m.onnx")}})
    return Run(recipe, None, lambda _: None)  # type: ignore[arg-type]


def test_run_is_frozen_and_with_inputs_gives_a_new_one(tmp_path: Path) -> None:
    run = _run(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.inputs = ()  # type: ignore[misc]
    x = (InputSpec(name="x", shape=["batch", 4]),)
    new = run.with_inputs(x)
    assert new is not run and new.inputs == x and run.inputs == ()
    assert new.stages is run.stages  # one build, one table of stage timings
    assert new.with_inputs(list(x)) is new  # the same inputs: the same run (its loaded data kept)


def test_a_reference_without_evaluation_data_has_neither_metric_nor_outputs() -> None:
    ref = Reference()
    assert ref.accuracy is None and ref.outputs is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.accuracy = None  # type: ignore[misc]
