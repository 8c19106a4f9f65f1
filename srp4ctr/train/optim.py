"""Adam with a linear warm-up and polynomial learning-rate decay (the paper's optimiser)."""

from __future__ import annotations

import logging

import torch
from torch import nn


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of ``model``'s sparse-gradient embedding tables (the tables of sampled
    pre-training heads over large vocabularies)."""
    return [m.weight for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]


class _Steps:
    """Several optimizers (or schedules) stepped as one."""

    def __init__(self, parts):
        self.parts = list(parts)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parts:
            p.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for p in self.parts:
            p.step()

    def get_last_lr(self) -> list[float]:
        return [lr for p in self.parts for lr in p.get_last_lr()]


def make_optimizer(
    params,
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 1.0,
    end_lr_ratio: float = 0.0,
    sparse_params=(),
    scaled_params=(),
    lr_ratio: float = 1.0,
):
    """Adam (AdamW when ``weight_decay`` > 0) and a per-step LambdaLR schedule.

    lr(t) = lr · t / warmup                                   for t < warmup
    lr(t) = lr · [end + (1 − end) · (1 − (t − warmup)/(T − warmup))^power]   after

    ``sparse_params`` (of ``params``; :func:`sparse_parameters`) get ``SparseAdam`` with the same
    learning rate and schedule: it updates only the rows a step's sparse gradient holds (the
    moments of the other rows wait, "lazy" Adam) and applies no weight decay. Then the
    optimizer and schedule returned step both parts. ``scaled_params`` (of ``params``) train at
    ``lr * lr_ratio`` on the same schedule (a second parameter group).
    """
    sparse_ids = {id(p) for p in sparse_params}
    params = [p for p in params if p.requires_grad]
    sparse = [p for p in params if id(p) in sparse_ids]
    params = [p for p in params if id(p) not in sparse_ids]
    scaled_ids = {id(p) for p in scaled_params} if lr_ratio != 1.0 else set()

    def groups_of(ps: list) -> list[dict]:
        """``ps`` as parameter groups: at ``lr``, and the scaled ones at ``lr * lr_ratio``."""
        groups = [{"params": [p for p in ps if id(p) not in scaled_ids], "lr": lr},
                  {"params": [p for p in ps if id(p) in scaled_ids], "lr": lr * lr_ratio}]
        return [g for g in groups if g["params"]] or [{"params": [], "lr": lr}]

    groups = groups_of(params)
    if weight_decay > 0:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        frac = min(max(frac, 0.0), 1.0)
        return end_lr_ratio + (1.0 - end_lr_ratio) * (1.0 - frac) ** power

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if not sparse:
        return opt, sched
    if weight_decay > 0:
        logging.getLogger(__name__).warning(
            "weight_decay %g applies to the dense parameters only: the %d sparse-gradient "
            "embedding table(s) (vocabularies above ModelConfig.sampled_softmax_above) are "
            "stepped by SparseAdam, without decay", weight_decay, len(sparse))
    sopt = torch.optim.SparseAdam(groups_of(sparse), lr=lr)
    ssched = torch.optim.lr_scheduler.LambdaLR(sopt, factor)
    return _Steps([opt, sopt]), _Steps([sched, ssched])
