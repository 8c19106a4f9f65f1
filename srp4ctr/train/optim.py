"""Adam with a linear warm-up and polynomial learning-rate decay (the paper's optimiser)."""

from __future__ import annotations

import torch


def make_optimizer(
    params,
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 1.0,
    end_lr_ratio: float = 0.0,
):
    """Adam (AdamW when ``weight_decay`` > 0) and a per-step LambdaLR schedule.

    lr(t) = lr · t / warmup                                   for t < warmup
    lr(t) = lr · [end + (1 − end) · (1 − (t − warmup)/(T − warmup))^power]   after
    """
    params = [p for p in params if p.requires_grad]
    if weight_decay > 0:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr)
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        frac = min(max(frac, 0.0), 1.0)
        return end_lr_ratio + (1.0 - end_lr_ratio) * (1.0 - frac) ** power

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched
