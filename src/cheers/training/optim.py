"""AdamW over the trainable groups and the learning-rate schedule (linear warm-up, then constant or cosine)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from cheers.training.config import TrainSection


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad, each once (tied parameters once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], train: TrainSection) -> torch.optim.AdamW:
    """AdamW; weight decay applies to matrices only (not to biases, norms or embeddings' 1-D tables).

    Args:
        named: trainable (name, parameter) pairs, in a stable order (it is the optimizer state's order).
        train: the recipe's ``train`` section.
    """
    decay, no_decay = [], []
    for _, p in named:
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check train.trainable")
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=tuple(train.betas),
                             eps=train.eps, foreach=False)


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for the update made at optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``ceil(warmup_ratio * total)`` steps (the first update already has a
    non-zero lr); then ``constant`` stays at 1 and ``cosine`` falls to ``min_ratio`` at the last step.
    """
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Factor:
    """Picklable lr lambda."""

    def __init__(self, train: TrainSection) -> None:
        self.total, self.warmup_ratio = train.steps, train.warmup_ratio
        self.schedule, self.min_ratio = train.schedule, train.min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup_ratio, self.schedule, self.min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> LambdaLR:
    return LambdaLR(optimizer, _Factor(train))
