"""The optimizer and the learning-rate schedule, built from training.*."""

from __future__ import annotations

import torch

from trainer.config import TrainingConfig


def optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norms (ndim < 2) without weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = t.optim == "adamw_torch_fused"
    return torch.optim.AdamW(groups, lr=t.learning_rate, fused=fused or None)


def schedule(opt: torch.optim.Optimizer, t: TrainingConfig, total_steps: int, step: int = 0):
    """The learning-rate schedule of the current config, at `step`. Derived, never restored: a
    resumed run follows the schedule its config states (the resume guard's rule)."""
    from transformers import get_scheduler

    for group, decay in zip(opt.param_groups, (t.weight_decay, 0.0)):
        group["lr"] = group["initial_lr"] = t.learning_rate
        group["weight_decay"] = decay
    ratio = t.warmup_steps if 0 < t.warmup_steps < 1 else t.warmup_ratio
    warmup = int(t.warmup_steps) if t.warmup_steps >= 1 else int(ratio * total_steps)
    scheduler = get_scheduler(t.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    if step:  # transformers' schedules are LambdaLR: lr = base * lambda(step)
        scheduler.last_epoch = step
        scheduler._step_count = step + 1
        lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return scheduler
