"""Periodic callbacks: sample images (saved as PNG) and scores (logged).

A hook is any object with ``every`` (steps) and ``__call__(ctx) -> dict[str, float] | None``. Hooks run on
*every* process after the optimizer step, with the model in eval mode and no gradients; under FSDP2 the
model is unsharded around them, so a hook must run the same model calls on every process (only rank 0
writes files). Returned numbers are logged to ``metrics.jsonl`` / TensorBoard under ``score/``.

This module is the mechanism only; the ShapesWorld sample and score hooks that a recipe's
``log.sample_every`` / ``log.score_every`` ask for measure the model, so they live in
:mod:`cheers.eval.train_hooks`, and ``cheers train`` passes them to the trainer (training does not import
evaluation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cheers.models.cheers import Cheers
from cheers.processor import CheersProcessor
from cheers.training.distributed import DistInfo

logger = logging.getLogger(__name__)


@dataclass
class HookContext:
    step: int  # optimizer steps done
    model: Cheers  # the (unwrapped) model, in eval mode
    processor: CheersProcessor
    run_dir: Path
    info: DistInfo
    monitor: Any  # cheers.training.monitor.Monitor


class Hook(Protocol):
    every: int

    def __call__(self, ctx: HookContext) -> dict[str, float] | None: ...


SampleFn = Callable[[HookContext], Sequence[Any]]  # -> PIL images
ScoreFn = Callable[[HookContext], dict[str, float]]


class SampleImages:
    """Every ``every`` steps, ``sample_fn(ctx)`` images go to ``<run>/samples/step-XXXXXXXX.png`` (one
    grid)."""

    def __init__(self, every: int, sample_fn: SampleFn, columns: int = 4) -> None:
        self.every, self.sample_fn, self.columns = every, sample_fn, columns

    def __call__(self, ctx: HookContext) -> dict[str, float] | None:
        images = list(self.sample_fn(ctx))
        if ctx.info.is_main and images:
            grid = image_grid(images, self.columns)
            path = ctx.run_dir / "samples" / f"step-{ctx.step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            ctx.monitor.add_image("samples", grid, ctx.step)
            logger.info("saved sample images to %s", path)
        return None


class Score:
    """Every ``every`` steps, log ``score_fn(ctx)``."""

    def __init__(self, every: int, score_fn: ScoreFn) -> None:
        self.every, self.score_fn = every, score_fn

    def __call__(self, ctx: HookContext) -> dict[str, float] | None:
        return dict(self.score_fn(ctx))


def image_grid(images: Sequence[Any], columns: int = 4):
    from PIL import Image

    images = [im.convert("RGB") for im in images]
    w, h = images[0].size
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


@contextlib.contextmanager
def _hook_mode(module: nn.Module, info: DistInfo):
    was_training = module.training
    module.eval()
    unshard = info.strategy == "fsdp" and hasattr(module, "unshard")
    if unshard:
        module.unshard()
    try:
        with torch.no_grad():
            yield
    finally:
        if unshard:
            module.reshard()
        module.train(was_training)


def run_hooks(
    hooks: Sequence[Hook],
    step: int,
    module: nn.Module,
    model: Cheers,
    processor: CheersProcessor,
    run_dir: Path,
    info: DistInfo,
    monitor: Any,
) -> dict[str, float]:
    """Run the hooks due at ``step``; returns their merged numbers."""
    due = [h for h in hooks if h.every > 0 and step % h.every == 0]
    if not due:
        return {}
    out: dict[str, float] = {}
    with _hook_mode(module, info):
        ctx = HookContext(step, model, processor, run_dir, info, monitor)
        for hook in due:
            out.update(hook(ctx) or {})
    return out
