"""ShapesWorld measurements during training: sample images, GenEval-style accuracy and the prompt gain.

Hook factories for :class:`cheers.training.loop.Trainer` (the mechanism is :mod:`cheers.training.hooks`). They
measure the model, so they live with evaluation; ``cheers train`` builds the ones a recipe asks for with
:func:`recipe_hooks` and passes them to the trainer::

    train(recipe, hooks=recipe_hooks(recipe))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cheers.data.shapes import make_sample, parse_image, score_spec, split_seeds
from cheers.eval.conditioning import prompt_gain, shapes_generation_records
from cheers.pipeline import CheersPipeline
from cheers.training.config import Recipe
from cheers.training.hooks import Hook, HookContext, SampleFn, SampleImages, Score, ScoreFn


def shapes_prompts(count: int, first: int = 0) -> list[tuple[str, dict]]:
    """Fixed (prompt, spec) pairs: ShapesWorld generation samples of the validation split, as trained on."""
    out = []
    for seed in split_seeds("val")[first : first + count]:
        sample = make_sample(seed, "generation", render=False)
        out.append((sample["conversations"][0]["value"], sample["spec"]))
    return out


def shapes_sample_fn(count: int = 4, steps: int = 20, guidance: float = 3.0, first: int = 0) -> SampleFn:
    """Text-to-image samples of fixed ShapesWorld prompts (the same noise every time)."""

    def sample(ctx: HookContext) -> list[Any]:
        pipe = CheersPipeline(
            ctx.model, ctx.processor, progress=False
        )  # the trainer installed the fast VAE path
        texts = [p for p, _ in shapes_prompts(count, first)]
        gen = torch.Generator(device="cpu").manual_seed(first)
        return pipe.generate(texts, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images

    return sample


def shapes_score_fn(count: int = 8, steps: int = 20, guidance: float = 3.0, first: int = 100) -> ScoreFn:
    """GenEval-style accuracy on fixed ShapesWorld prompts, judged by the ShapesWorld scene parser."""
    sample = shapes_sample_fn(count, steps, guidance, first)

    def score(ctx: HookContext) -> dict[str, float]:
        images = sample(ctx)
        specs = [spec for _, spec in shapes_prompts(count, first)]
        correct = [score_spec(parse_image(im), spec).correct for im, spec in zip(images, specs)]
        return {"shapes_geneval": sum(correct) / max(len(correct), 1)}

    return score


def shapes_prompt_gain_fn(
    count: int = 16, times: Sequence[float] = (0.2, 0.5, 0.8), first: int = 200
) -> ScoreFn:
    """The prompt gain (:mod:`cheers.eval.conditioning`) on fixed ShapesWorld validation samples: how much
    the flow loss rises when each image gets another sample's prompt. Near 0 = generation ignores the text."""

    def score(ctx: HookContext) -> dict[str, float]:
        records = shapes_generation_records(count, "val", first)
        return {"shapes_prompt_gain": prompt_gain(ctx.model, ctx.processor, records, times).relative_gain}

    return score


def recipe_hooks(recipe: Recipe) -> list[Hook]:
    """The hooks of the recipe's ``log.sample_every`` / ``log.score_every``: ShapesWorld samples, their
    accuracy and the prompt gain; none for a recipe without a ShapesWorld source (other data passes its own
    hooks)."""
    log = recipe.log
    hooks: list[Hook] = []
    if not any(s.kind == "shapes" for s in recipe.data.sources):
        return hooks
    if log.sample_every > 0:
        hooks.append(SampleImages(log.sample_every, shapes_sample_fn(log.sample_count, log.sample_steps)))
    if log.score_every > 0:
        hooks.append(Score(log.score_every, shapes_score_fn(steps=log.sample_steps)))
        hooks.append(Score(log.score_every, shapes_prompt_gain_fn()))
    return hooks
