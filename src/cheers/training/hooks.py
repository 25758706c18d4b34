"""Periodic callbacks: sample images (saved as PNG) and scores (logged), with ShapesWorld implementations.

A hook is any object with ``every`` (steps) and ``__call__(ctx) -> dict[str, float] | None``. Hooks run on
*every* process after the optimizer step, with the model in eval mode and no gradients; under FSDP2 the
model is unsharded around them, so a hook must run the same model calls on every process (only rank 0
writes files). Returned numbers are logged to ``metrics.jsonl`` / TensorBoard under ``score/``.
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
    """Every ``every`` steps, ``sample_fn(ctx)`` images go to ``<run>/samples/step-XXXXXXXX.png`` (one grid)."""

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


def run_hooks(hooks: Sequence[Hook], step: int, module: nn.Module, model: Cheers, processor: CheersProcessor,
              run_dir: Path, info: DistInfo, monitor: Any) -> dict[str, float]:
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


# ------------------------------------------------------------------------------------------------------------
# ShapesWorld


def shapes_prompts(count: int, first: int = 0) -> list[tuple[str, dict]]:
    """Fixed (prompt, spec) pairs: ShapesWorld generation samples of the validation split, as trained on."""
    from cheers.data.shapes import make_sample, split_seeds

    out = []
    for seed in split_seeds("val")[first:first + count]:
        sample = make_sample(seed, "generation", render=False)
        out.append((sample["conversations"][0]["value"], sample["spec"]))
    return out


def shapes_sample_fn(count: int = 4, steps: int = 20, guidance: float = 3.0, first: int = 0) -> SampleFn:
    """Text-to-image samples of fixed ShapesWorld prompts (the same noise every time)."""

    def sample(ctx: HookContext) -> list[Any]:
        from cheers.pipeline import CheersPipeline

        pipe = CheersPipeline(ctx.model, ctx.processor, progress=False)
        texts = [p for p, _ in shapes_prompts(count, first)]
        gen = torch.Generator(device="cpu").manual_seed(first)
        return pipe.generate(texts, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images

    return sample


def shapes_score_fn(count: int = 8, steps: int = 20, guidance: float = 3.0, first: int = 100) -> ScoreFn:
    """GenEval-style accuracy on fixed ShapesWorld prompts, judged by the ShapesWorld scene parser."""
    sample = shapes_sample_fn(count, steps, guidance, first)

    def score(ctx: HookContext) -> dict[str, float]:
        from cheers.data.shapes import parse_image, score_spec

        images = sample(ctx)
        specs = [spec for _, spec in shapes_prompts(count, first)]
        correct = [score_spec(parse_image(im), spec).correct for im, spec in zip(images, specs)]
        return {"shapes_geneval": sum(correct) / max(len(correct), 1)}

    return score


def shapes_prompt_gain_fn(count: int = 16, times: Sequence[float] = (0.2, 0.5, 0.8), first: int = 200) -> ScoreFn:
    """The prompt gain (:mod:`cheers.eval.conditioning`) on fixed ShapesWorld validation samples: how much
    the flow loss rises when each image gets another sample's prompt. Near 0 = generation ignores the text."""

    def score(ctx: HookContext) -> dict[str, float]:
        from cheers.eval.conditioning import prompt_gain, shapes_generation_records

        records = shapes_generation_records(count, "val", first)
        return {"shapes_prompt_gain": prompt_gain(ctx.model, ctx.processor, records, times).relative_gain}

    return score


def default_hooks(recipe_log: Any, uses_shapes: bool) -> list[Hook]:
    """The recipe's ``log.sample_every`` / ``log.score_every`` hooks (ShapesWorld only; others pass their own)."""
    hooks: list[Hook] = []
    if not uses_shapes:
        return hooks
    if recipe_log.sample_every > 0:
        hooks.append(SampleImages(recipe_log.sample_every, shapes_sample_fn(recipe_log.sample_count,
                                                                             recipe_log.sample_steps)))
    if recipe_log.score_every > 0:
        hooks.append(Score(recipe_log.score_every, shapes_score_fn(steps=recipe_log.sample_steps)))
        hooks.append(Score(recipe_log.score_every, shapes_prompt_gain_fn()))
    return hooks
