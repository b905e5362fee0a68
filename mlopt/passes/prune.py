"""prune: structured pruning that really removes channels (torch-pruning's dependency graph), then
fine-tuning; or unstructured magnitude pruning, which only makes weights sparse (smaller when
compressed, not faster on dense hardware)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field, model_validator

from mlopt.core.errors import BadInput
from mlopt.core.model import Model
from mlopt.core.spec import Strict
from mlopt.passes import PassContext, register


class PrunePass(Strict):
    """Structured pruning that removes channels/neurons (torch-pruning), or unstructured magnitude pruning."""

    kind: Literal["prune"]
    name: str | None = None
    on_violation: Literal["fail", "skip"] | None = None
    method: Literal["structured", "unstructured"] = "structured"
    ratio: float = Field(0.5, ge=0, lt=1, description="Fraction of channels (structured) or weights (unstructured) removed.")
    heads: float = Field(0.0, ge=0, lt=1, description="structured: fraction of attention heads removed in BERT-style "
                         "self-attention (query/key/value Linear layers and an output projection), lowest norm first.")
    layers: int = Field(0, ge=0, description="structured: number of repeated blocks (transformer layers: the longest "
                        "ModuleList of one block type) removed whole, one at a time, each time the block whose removal "
                        "moves the model's outputs on data.calibration least (relative L2 to the unpruned outputs).")
    importance: Literal["magnitude", "taylor", "lamp", "random"] = Field("magnitude", description="Channel importance criterion.")
    global_pruning: bool = Field(False, description="Rank channels across layers (True) or prune each layer by ratio.")
    ignore: list[str] = Field(default_factory=list, description="Module names left whole (the classifier head is always kept).")
    finetune_steps: int = Field(200, ge=0, description="Fine-tuning steps on data.calibration after pruning (labels needed).")
    lr: float = Field(1e-3, gt=0, description="Fine-tuning learning rate (Adam).")

    @model_validator(mode="after")
    def _check(self) -> "PrunePass":
        if self.ratio == 0 and self.heads == 0 and self.layers == 0:
            raise ValueError("nothing to prune: set ratio (channels or weights), heads or layers above 0")
        if (self.heads or self.layers) and self.method != "structured":
            raise ValueError("heads and layers apply to structured pruning only")
        return self


def need_module(model: Model, what: str) -> Any:
    if model.module_fn is None:
        raise BadInput(f"{what} trains the PyTorch module, and this model's source is ONNX only",
                       hint="give model.source as a PyTorch factory 'model.py:function' or a .pt2 file")
    return model.module_fn()


@register("prune", config=PrunePass, changes_outputs=True, trains_module=True)
def prune(model: Model, cfg: PrunePass, ctx: PassContext) -> tuple[Model, dict[str, Any]]:
    module = copy.deepcopy(need_module(model, f"prune {cfg.method}"))
    feed = ctx.calibration.feeds[0] if ctx.calibration is not None else None
    if feed is None:
        raise BadInput("prune needs data.calibration: example inputs for the dependency graph and fine-tuning")
    before = count(module, feed)
    dropped: dict[str, Any] | None = None
    if cfg.method == "structured":
        if cfg.layers:
            dropped = drop_layers(module, ctx.calibration.feeds[:LAYER_RANKING_BATCHES], cfg.layers)
        heads = prune_heads(module, cfg.heads) if cfg.heads else None
        if cfg.ratio:
            prune_structured(module, feed, cfg.ratio, cfg.importance, cfg.global_pruning, cfg.ignore)
        losses = finetune(module, model.module_fn(), ctx, cfg.finetune_steps, cfg.lr)
        note = "channels removed: the model is smaller and dense, so it runs faster"
        if dropped:
            note += f"; {dropped['blocks']}: {dropped['before']} -> {dropped['before'] - len(dropped['removed'])} blocks"
        if heads:
            note += f"; attention heads {heads[0]} -> {heads[1]}"
    else:
        sparsity = prune_unstructured(module, cfg.ratio, cfg.ignore)
        losses = finetune(module, model.module_fn(), ctx, cfg.finetune_steps, cfg.lr, keep_zeros=True)
        note = (f"unstructured: {sparsity:.0%} of weights are zero; this shrinks the compressed size only and "
                "does NOT make the model faster on dense hardware")
    after = count(module, feed)
    out = ctx.export(module.eval(), ctx.workdir / "model.onnx")
    details = {"method": cfg.method, "ratio": cfg.ratio, "params_before": before["params"],
               "params_after": after["params"], "macs_before": before["macs"], "macs_after": after["macs"],
               "finetune_loss_first": losses[0] if losses else None, "finetune_loss_last": losses[-1] if losses else None,
               "note": note}
    if dropped:
        details["layers"] = dropped
    ctx.log(f"[prune] {cfg.method}: params {before['params']:,} -> {after['params']:,}, "
            f"MACs {before['macs']:,} -> {after['macs']:,}")
    return model.derive(out.onnx_path, module_fn=_frozen(module)), details


def _frozen(module: Any) -> Any:
    return lambda: copy.deepcopy(module)


def count(module: Any, feed: dict) -> dict[str, int]:
    import torch
    import torch_pruning as tp

    args = example_args(feed)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, args)
    return {"macs": int(macs), "params": int(params)}


def example_args(feed: dict) -> tuple:
    """A feed's input arrays as the positional tensors of forward() (feeds are in signature order)."""
    import torch

    return tuple(torch.from_numpy(v) for v in feed.values())


def head_layers(module: Any, feed: dict) -> list[Any]:
    """The layers producing the output (classifier heads): never pruned, so the output keeps its size."""
    import torch

    with torch.no_grad():
        out = module(*example_args(feed))
    width = out.shape[-1]
    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.out_features == width]
    return last[-1:]


def prune_structured(module: Any, feed: dict, ratio: float, importance: str, global_pruning: bool,
                     ignore: list[str]) -> None:
    """Remove channels in place with torch-pruning's dependency-graph pruner."""
    import torch
    import torch_pruning as tp

    named = dict(module.named_modules())
    missing = [n for n in ignore if n not in named]
    if missing:
        raise BadInput(f"prune.ignore names modules the model does not have: {missing}")
    imp = {"magnitude": tp.importance.MagnitudeImportance(p=2), "taylor": tp.importance.TaylorImportance(),
           "lamp": tp.importance.LAMPImportance(p=2), "random": tp.importance.RandomImportance()}[importance]
    args = example_args(feed)
    pruner = tp.pruner.MetaPruner(module, args, importance=imp, pruning_ratio=ratio, global_pruning=global_pruning,
                                  ignored_layers=head_layers(module, feed) + [named[n] for n in ignore])
    if importance == "taylor":  # Taylor importance needs gradients of a loss
        module.zero_grad()
        module(*args).float().pow(2).mean().backward()
    torch.manual_seed(0)
    pruner.step()


LAYER_RANKING_BATCHES = 8  # calibration batches that rank blocks for removal (each candidate runs them all)


def block_list(module: Any) -> tuple[str, Any]:
    """The model's repeated blocks: the longest ModuleList whose items are all one type (a transformer's layers)."""
    import torch

    lists = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2
             and len({type(b) for b in m}) == 1]
    if not lists:
        raise BadInput("prune.layers is set, but the model has no list of repeated blocks (a ModuleList of one block type)")
    return max(lists, key=lambda nm: len(nm[1]))


def drop_layers(module: Any, feeds: list[dict], n: int) -> dict[str, Any]:
    """Remove ``n`` blocks of the model's block list in place, greedily: each time the block whose removal keeps
    the outputs on ``feeds`` closest (relative L2) to the unpruned model's. A block whose removal breaks the
    forward pass (it changes the shape its successor reads) is never chosen."""
    import torch

    name, blocks = block_list(module)
    if n >= len(blocks):
        raise BadInput(f"prune.layers={n} would remove every block of {name} ({len(blocks)} blocks); keep at least one")
    parent, attr = _parent(module, name)
    original = list(blocks)

    def outputs() -> Any:
        with torch.no_grad():
            return torch.cat([module(*example_args(f)).float().flatten(1) for f in feeds])

    ref = outputs()
    kept, removed, drift = list(range(len(original))), [], []
    for _ in range(n):
        best: tuple[float, int] | None = None
        for i in kept:
            setattr(parent, attr, torch.nn.ModuleList([original[j] for j in kept if j != i]))
            try:
                out = outputs()
            except (RuntimeError, IndexError, TypeError, ValueError):
                continue
            if out.shape != ref.shape:
                continue
            err = float((out - ref).norm() / ref.norm().clamp(min=1e-12))
            if best is None or err < best[0]:
                best = (err, i)
        if best is None:
            setattr(parent, attr, torch.nn.ModuleList([original[j] for j in kept]))
            raise BadInput(f"prune.layers: no block of {name} can be removed without breaking the forward pass")
        kept.remove(best[1])
        removed.append(best[1])
        drift.append(round(best[0], 5))
    setattr(parent, attr, torch.nn.ModuleList([original[j] for j in kept]))
    return {"blocks": name, "before": len(original), "removed": removed, "relative_l2": drift}


def _parent(module: Any, name: str) -> tuple[Any, str]:
    path, _, attr = name.rpartition(".")
    return module.get_submodule(path), attr


def prune_heads(module: Any, ratio: float) -> tuple[int, int]:
    """Remove the lowest-norm attention heads of BERT-style blocks in place; return (heads before, after).

    A block is a module with ``self`` (query/key/value Linear layers, num_attention_heads,
    attention_head_size) and ``output.dense`` (the projection back to the hidden size).
    """
    import torch

    before = after = 0
    for parent in module.modules():
        att, proj = getattr(parent, "self", None), getattr(getattr(parent, "output", None), "dense", None)
        if not isinstance(proj, torch.nn.Linear) or not all(
                isinstance(getattr(att, p, None), torch.nn.Linear) for p in ("query", "key", "value")):
            continue
        h, d = att.num_attention_heads, att.attention_head_size
        keep_n = max(1, h - round(h * ratio))
        norms = sum(getattr(att, p).weight.detach().view(h, d, -1).pow(2).sum((1, 2)) for p in ("query", "key", "value"))
        keep = sorted(norms.argsort(descending=True)[:keep_n].tolist())
        idx = torch.cat([torch.arange(k * d, (k + 1) * d) for k in keep])
        for p in ("query", "key", "value"):
            setattr(att, p, _rows(getattr(att, p), idx))
        parent.output.dense = _columns(proj, idx)
        att.num_attention_heads, att.all_head_size = keep_n, len(idx)
        before, after = before + h, after + keep_n
    if not before:
        raise BadInput("prune.heads is set, but the model has no BERT-style attention blocks to prune")
    return before, after


def _rows(layer: Any, idx: Any) -> Any:
    import torch

    new = torch.nn.Linear(layer.in_features, len(idx), bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[idx])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[idx])
    return new


def _columns(layer: Any, idx: Any) -> Any:
    import torch

    new = torch.nn.Linear(len(idx), layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, idx])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def prune_unstructured(module: Any, ratio: float, ignore: list[str]) -> float:
    """Zero the smallest weights of every Conv/Linear (global magnitude); return the sparsity."""
    import torch
    import torch.nn.utils.prune as tprune

    layers = [(m, "weight") for n, m in module.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and n not in ignore]
    tprune.global_unstructured(layers, pruning_method=tprune.L1Unstructured, amount=ratio)
    for m, name in layers:
        tprune.remove(m, name)
    total = sum(m.weight.numel() for m, _ in layers)
    return sum(int((m.weight == 0).sum()) for m, _ in layers) / total


def finetune(student: Any, teacher: Any, ctx: PassContext, steps: int, lr: float, keep_zeros: bool = False,
             temperature: float = 1.0, alpha: float | None = None) -> list[float]:
    """Train ``student``: cross-entropy where labels exist, else match the teacher's outputs.

    With ``alpha`` the loss is alpha * KL(student/T || teacher/T) * T^2 + (1 - alpha) * CE (distillation).
    Returns the loss averaged over each tenth of the run (first and last show that it fell).
    """
    import torch

    if steps == 0:
        return []
    batches = ctx.calibration.feeds
    labels = _split_labels(ctx.calibration)
    masks = {n: (p != 0) for n, p in student.named_parameters()} if keep_zeros else {}
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    teacher.eval()
    student.train()
    losses: list[float] = []
    with deterministic_training():
        _train_steps(student, teacher, opt, batches, labels, masks, steps, temperature, alpha, losses)
    student.eval()
    tenth = max(1, steps // 10)
    return [round(sum(losses[k:k + tenth]) / len(losses[k:k + tenth]), 5) for k in range(0, steps, tenth)]


@contextmanager
def deterministic_training() -> Iterator[None]:
    """Seeded, deterministic kernels and one thread while training: the same student on every run of
    a machine, whatever its core count. (Across CPU types float results still differ in the last bits:
    AVX2 and AVX-512 kernels sum in different orders, so recipes' budgets keep a margin.)"""
    import torch

    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _train_steps(student: Any, teacher: Any, opt: Any, batches: list, labels: list, masks: dict, steps: int,
                 temperature: float, alpha: float | None, losses: list[float]) -> None:
    import torch
    import torch.nn.functional as F

    for step in range(steps):
        i = step % len(batches)
        args = example_args(batches[i])
        with torch.no_grad():
            t_out = teacher(*args)
        s_out = student(*args)
        y = labels[i]
        if alpha is None:
            loss = F.cross_entropy(s_out, y) if y is not None else F.mse_loss(s_out, t_out)
        else:
            kl = F.kl_div(F.log_softmax(s_out / temperature, -1), F.softmax(t_out / temperature, -1),
                          reduction="batchmean") * temperature ** 2
            loss = alpha * kl + (1 - alpha) * F.cross_entropy(s_out, y) if y is not None else kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if masks:
            with torch.no_grad():
                for n, p in student.named_parameters():
                    p.mul_(masks[n])
        losses.append(loss.item())


def _split_labels(batches: Any) -> list[Any]:
    """Per-batch label tensors (None where the data has no labels)."""
    import torch

    if batches.labels is None:
        return [None] * len(batches.feeds)
    out, start = [], 0
    for feed in batches.feeds:
        n = len(next(iter(feed.values())))
        out.append(torch.from_numpy(batches.labels[start:start + n]).long())
        start += n
    return out
