"""Optimizers and learning-rate schedules.

Schedules are pure functions of the step, applied by setting each group's ``lr`` before the step:
nothing to pickle in a checkpoint but the step counter, and a resumed run follows the same curve.
"""

from __future__ import annotations

import math

import torch

from dlkit.choices import OPTIMIZERS, SCHEDULES
from dlkit.errors import UsageError


def make_optimizer(name: str, params, *, lr: float, weight_decay: float, momentum: float = 0.9,
                   beta2: float = 0.999):
    """``beta2``: Adam's second-moment decay (0.99 suits small batches of few tokens, as nanoGPT's)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=(0.9, beta2))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, beta2))
    raise UsageError(f"unknown optimizer '{name}'", hint="choose one of " + ", ".join(OPTIMIZERS))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only, not on biases, norms and embeddings' pads."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.0) -> float:
    """Multiplier on the base learning rate at ``step`` (0-based) of ``total`` steps.

    ``warmup`` is a fraction of ``total`` with a linear ramp from near zero; ``onecycle`` has its
    own ramp (30% of the run unless ``warmup`` says otherwise) and anneals to 1/1000 with a cosine.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule '{schedule}'", hint="choose one of " + ", ".join(SCHEDULES))
    total = max(total, 1)
    if schedule == "onecycle" and warmup <= 0:
        warmup = 0.3
    warm = int(round(warmup * total))
    if step < warm:
        start = 0.04 if schedule == "onecycle" else 0.0
        return start + (1.0 - start) * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "step":  # x0.1 at 50% and 75% of the post-warm-up run
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    floor = 1e-3 if schedule == "onecycle" else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
