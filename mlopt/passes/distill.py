"""distill: train a student on the teacher's temperature-softened outputs (KL) plus the task loss.

The student is given ('module:factory'), derived from the teacher by structured pruning
(``student: {from: prune, ratio: 0.5}``: prune, then recover accuracy by distillation), or the module a
pass before made (``student: input``: a prune pass's result). The teacher is the incoming module or,
with ``teacher: original``, the model as ingested: prune -> distill from the original -> quantize, each
step judged by the budget (distillation on too little data can lower the metric; the gate then skips it).
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator

from mlopt.core.callables import load_callable
from mlopt.core.errors import BadInput
from mlopt.core.model import Model
from mlopt.core.spec import Strict
from mlopt.passes import PassContext, register
from mlopt.passes.prune import count, example_args, finetune, need_module, prune_structured


class StudentFromPrune(Strict):
    from_: Literal["prune"] = Field(alias="from")
    ratio: float = Field(0.5, gt=0, lt=1)
    importance: Literal["magnitude", "taylor", "lamp", "random"] = "magnitude"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DistillPass(Strict):
    """Train a student on the teacher's soft targets (temperature-scaled KL) plus the task loss."""

    kind: Literal["distill"]
    name: str | None = None
    on_violation: Literal["fail", "skip"] | None = None
    student: Union[str, StudentFromPrune] = Field(
        description="A 'module:factory' returning the student nn.Module, {from: prune, ratio: 0.5}, or 'input': "
        "the incoming module (the result of a prune pass before this one).")
    teacher: Literal["input", "original"] = Field(
        "input", description="input: the incoming module; original: the model as ingested (after a prune pass, "
        "the unpruned model).")
    match: Literal["kl", "mse"] = Field(
        "kl", description="kl: the teacher's temperature-softened class probabilities (plus the task loss where "
        "there are labels; classifiers); mse: the teacher's outputs themselves (embeddings, regression).")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the task loss.")
    steps: int = Field(300, gt=0, description="Optimizer steps over data.calibration (cycled).")
    lr: float = Field(1e-3, gt=0)

    @field_validator("student")
    @classmethod
    def _student(cls, v: Union[str, StudentFromPrune]) -> Union[str, StudentFromPrune]:
        if isinstance(v, str) and ":" not in v and v != "input":
            raise ValueError(f"student {v!r} must be 'module:factory', 'input' or {{from: prune, ratio: 0.5}}")
        return v


@register("distill", config=DistillPass, changes_outputs=True, trains_module=True)
def distill(model: Model, cfg: DistillPass, ctx: PassContext) -> tuple[Model, dict[str, Any]]:
    incoming = need_module(model, "distill")
    if ctx.calibration is None:
        raise BadInput("distill needs data.calibration: the inputs (and labels, if any) to train the student on")
    teacher = incoming if cfg.teacher == "input" or ctx.original is None else ctx.original()
    feed = ctx.calibration.feeds[0]
    student = _student(cfg, incoming, feed)
    _check_outputs(student, teacher, feed)
    losses = finetune(student, teacher, ctx, cfg.steps, cfg.lr, temperature=cfg.temperature,
                      alpha=cfg.alpha if cfg.match == "kl" else None)
    out = ctx.export(student.eval(), ctx.workdir / "model.onnx")
    t, s = count(teacher, feed), count(student, feed)
    ctx.log(f"[distill] student params {s['params']:,} (teacher {t['params']:,}); loss {losses[0]} -> {losses[-1]}")
    return model.derive(out.onnx_path, module_fn=lambda: copy.deepcopy(student)), {
        "student": cfg.student if isinstance(cfg.student, str) else cfg.student.model_dump(by_alias=True),
        "teacher": cfg.teacher, "match": cfg.match,
        "teacher_params": t["params"], "student_params": s["params"], "teacher_macs": t["macs"],
        "student_macs": s["macs"], "steps": cfg.steps, "temperature": cfg.temperature, "alpha": cfg.alpha,
        "loss_first": losses[0], "loss_last": losses[-1], "loss_curve": losses,
    }


def _student(cfg: DistillPass, incoming: Any, feed: dict) -> Any:
    import torch

    if cfg.student == "input":
        return copy.deepcopy(incoming)
    if isinstance(cfg.student, str):
        student = load_callable(cfg.student, "student factory")()
        if not isinstance(student, torch.nn.Module):
            raise BadInput(f"student factory {cfg.student!r} returned {type(student).__name__}, not an nn.Module")
        return student
    student = copy.deepcopy(incoming)
    prune_structured(student, feed, cfg.student.ratio, cfg.student.importance, False, [])
    return student


def _check_outputs(student: Any, teacher: Any, feed: dict) -> None:
    import torch

    args = example_args(feed)
    with torch.no_grad():
        s, t = student(*args), teacher(*args)
    if s.shape != t.shape:
        raise BadInput(f"the student's output shape {tuple(s.shape)} differs from the teacher's {tuple(t.shape)}")
