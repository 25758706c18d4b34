"""AdamW over the trainable groups and the learning-rate schedule (linear warm-up, then constant, cosine
or wsd)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from cheers.training.config import TrainSection


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad, each once (tied parameters once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_lr_multipliers(multipliers: dict[str, float]) -> None:
    """Raise ValueError unless every key is a :class:`Cheers` parameter group and every factor a
    number > 0."""
    from cheers.models.cheers import Cheers

    for group, factor in multipliers.items():
        if group not in Cheers.PARAMETER_GROUPS:
            raise ValueError(f"unknown group {group!r}; known: {sorted(Cheers.PARAMETER_GROUPS)}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"{group} must be a number > 0, got {factor!r}")


def lr_multiplier(name: str, multipliers: dict[str, float]) -> float:
    """The lr factor of parameter ``name`` (a :class:`Cheers` name): its parameter group's entry, else 1."""
    from cheers.models.cheers import Cheers

    return float(multipliers.get(Cheers.group_of(name), 1.0))


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], train: TrainSection) -> torch.optim.AdamW:
    """AdamW; weight decay applies to matrices only (not to biases, norms or embeddings' 1-D tables).

    ``train.lr_multipliers`` scales the lr of whole parameter groups (one optimizer group per factor); the
    schedule multiplies every group's lr by the same factor.

    Args:
        named: trainable (name, parameter) pairs, in a stable order (it is the optimizer state's order).
        train: the recipe's ``train`` section.
    """
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in named:
        key = (p.ndim >= 2, lr_multiplier(name, train.lr_multipliers))
        buckets.setdefault(key, []).append(p)
    if not buckets:
        raise ValueError("no trainable parameters: check train.trainable")
    order = sorted(buckets, key=lambda k: (not k[0], k[1] != 1.0, k[1]))  # decay first, the base lr first
    groups = [
        {"params": buckets[k], "weight_decay": train.weight_decay if k[0] else 0.0, "lr": train.lr * k[1]}
        for k in order
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps, foreach=False)


def lr_factor(
    step: int,
    total: int,
    warmup_ratio: float,
    schedule: str,
    min_ratio: float = 0.0,
    decay_ratio: float = 0.2,
) -> float:
    """Multiplier of the base lr for the update made at optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``ceil(warmup_ratio * total)`` steps (the first update already has a
    non-zero lr); then ``constant`` stays at 1, ``cosine`` falls to ``min_ratio`` at the last step, and
    ``wsd`` (warm-up, stable, decay) stays at 1 until the last ``ceil(decay_ratio * total)`` steps, over
    which it falls linearly to ``min_ratio`` (a constant-lr run that ends annealed).
    """
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(1, math.ceil(decay_ratio * total))
        left = total - 1 - step  # updates after this one
        if left >= decay:
            return 1.0
        return min_ratio + (1 - min_ratio) * max(left, 0) / decay
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Factor:
    """Picklable lr lambda."""

    def __init__(self, train: TrainSection) -> None:
        self.total, self.warmup_ratio = train.steps, train.warmup_ratio
        self.schedule, self.min_ratio = train.schedule, train.min_lr_ratio
        self.decay_ratio = train.decay_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup_ratio, self.schedule, self.min_ratio, self.decay_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> LambdaLR:
    return LambdaLR(optimizer, _Factor(train))


def follow_recipe_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    train: TrainSection,
    base_lrs: list[float],
) -> list[str]:
    """After a resume, make the schedule the recipe's again where the recipe changed it.

    A checkpoint restores the schedule it was saved with (its total steps, shape and base lrs, through the
    scheduler's and the optimizer's state), so without this a run extended with ``--set train.steps=N
    --resume`` would go on at the old schedule's end (lr 0 after a cosine or wsd decay), and a new
    ``train.lr`` would be ignored. The step reached is kept; what the recipe says of the schedule (steps,
    kind, warm-up, decay, floor, per-group base lrs ``base_lrs`` as built from it) replaces the saved one,
    and the lr of the next update is set from it. With ``train.minutes`` the total steps are the budget's
    fit and stay as saved. Returns the changes (empty when the checkpoint already follows the recipe, so
    that an unchanged resume stays exact).
    """
    wanted = _Factor(train)
    changes = []
    for key, value in vars(wanted).items():  # every group has the same schedule
        if key == "total" and train.minutes > 0:
            continue
        old = {getattr(saved, key, None) for saved in scheduler.lr_lambdas}
        if old != {value}:
            changes.append(f"{key} {'/'.join(map(str, sorted(old, key=str)))} -> {value}")
    for i, (old, new) in enumerate(zip(scheduler.base_lrs, base_lrs, strict=True)):
        if not math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0):
            changes.append(f"group {i} lr {old:g} -> {new:g}")
    if not changes:
        return []
    step = scheduler.last_epoch
    lrs = []
    for i, (saved, group) in enumerate(zip(scheduler.lr_lambdas, optimizer.param_groups, strict=True)):
        factor = _Factor(train)
        if train.minutes > 0:
            factor.total = saved.total
        scheduler.lr_lambdas[i] = factor
        scheduler.base_lrs[i] = group["initial_lr"] = base_lrs[i]
        group["lr"] = base_lrs[i] * factor(step)
        lrs.append(group["lr"])
    scheduler._last_lr = lrs
    return changes


class StepBudget:
    """Fits a run's length to a wall-clock budget: ``train.minutes`` of training steps, schedule included.

    The rate is measured from ``skip`` steps after the start (the first steps pay for warm-up work) and the
    run's total steps are re-fitted every ``every`` steps, so the warm-up and the cosine decay end when the
    budget does; ``train.steps`` stays the upper bound. Because :func:`lr_factor` is a pure function of
    (step, total), a re-fit only bends the remaining schedule. Decisions (re-fits and the stop at the
    deadline) happen only every ``every`` steps and go through ``agree`` (e.g. rank 0's value broadcast to
    every process), so that all processes stop at the same step. Setup, evaluation hooks after the loop,
    export and stage 0's statistics fit are not counted.
    """

    def __init__(
        self,
        minutes: float,
        start: int,
        max_steps: int,
        scheduler: LambdaLR | None,
        skip: int = 10,
        every: int = 10,
        agree: Callable[[int], int] | None = None,
    ) -> None:
        if minutes <= 0:
            raise ValueError(f"train.minutes must be > 0 for a budget, got {minutes}")
        self.deadline = time.monotonic() + 60.0 * minutes
        self.start, self.total, self.max_steps, self.scheduler = start, max_steps, max_steps, scheduler
        self.skip, self.every, self.agree = skip, every, agree
        self.t0: float | None = None

    def update(self, done: int) -> int:
        """After optimizer step ``done``: the run's current last step (``done`` once the budget is spent)."""
        if done == self.start + self.skip:
            self.t0 = time.monotonic()
        if done % self.every:
            return self.total
        now = time.monotonic()
        total = self.total
        if now >= self.deadline:
            total = min(total, done)
        elif self.t0 is not None and done > self.start + self.skip:
            rate = (done - self.start - self.skip) / max(now - self.t0, 1e-9)  # steps per second
            total = max(done + 1, min(self.max_steps, done + int(rate * (self.deadline - now))))
        self.total = self.agree(total) if self.agree is not None else total
        if self.scheduler is not None:
            for fn in self.scheduler.lr_lambdas:
                if isinstance(fn, _Factor):
                    fn.total = self.total
        return self.total
