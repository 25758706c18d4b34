"""Does the model's image generation use its prompt? The flow loss with the right prompt against a wrong one.

A text-to-image model that ignores its prompt still lowers its flow loss a long way (it learns what images
look like), and a GenEval over a few hundred images is a slow and noisy way to notice. Here the same images,
times and noise go through the training forward three times: with each sample's own prompt, with another
sample's prompt (the batch rolled by one) and with the CFG-unconditional prompt. The **prompt gain** is
``loss(other prompt) - loss(own prompt)``: zero for a model that ignores the text, positive when it uses it.
It is reported per flow time (``t = 0`` is noise), since the text decides most where the latent is noisy.

    cheers eval prompt-gain --n 64            # the bundled model on ShapesWorld validation prompts
    cheers eval prompt-gain --objects L1      # objects only: prompts swapped between same-background samples
    cheers eval prompt-gain --routing         # + where the prompt gets lost: LLM image states, head, velocity

A background covers most of a ShapesWorld image, so a model that reads only the background sentence already
has a large prompt gain. :func:`object_prompt_gain` swaps prompts only between samples of a ladder rung that
share their background colour: what is left is the gain from the objects' words (colour, shape, count, place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cheers.data.collate import collate
from cheers.data.samples import SampleBuilder
from cheers.data.shapes import make_sample, split_seeds
from cheers.models.cheers import Cheers
from cheers.processor import CheersProcessor

DEFAULT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclasses.dataclass(frozen=True)
class PromptGain:
    """Mean flow losses per time; ``gain = other - own``. ``relative_gain`` = sum(gain) / sum(own)."""

    times: tuple[float, ...]
    own: tuple[float, ...]
    other: tuple[float, ...]
    unconditional: tuple[float, ...]
    n: int

    @property
    def gain(self) -> tuple[float, ...]:
        return tuple(o - w for o, w in zip(self.other, self.own))

    @property
    def relative_gain(self) -> float:
        return float(sum(self.gain) / max(sum(self.own), 1e-12))

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gain": list(self.gain), "relative_gain": self.relative_gain}

    @staticmethod
    def combine(parts: Sequence[PromptGain]) -> PromptGain:
        """The gain over the union of several evaluations at the same times (means weighted by ``n``)."""
        if not parts or any(p.times != parts[0].times for p in parts):
            raise ValueError("combine needs at least one PromptGain, all at the same times")
        total = sum(p.n for p in parts)

        def mean(field: str) -> tuple[float, ...]:
            return tuple(
                sum(getattr(p, field)[j] * p.n for p in parts) / total for j in range(len(parts[0].times))
            )

        return PromptGain(parts[0].times, mean("own"), mean("other"), mean("unconditional"), n=total)

    def table(self) -> str:
        rows = ["| t | own prompt | other prompt | unconditional | gain |", "|---:|---:|---:|---:|---:|"]
        for t, w, o, u, g in zip(self.times, self.own, self.other, self.unconditional, self.gain):
            rows.append(f"| {t:.2f} | {w:.4f} | {o:.4f} | {u:.4f} | {g:+.4f} |")
        rows.append(f"\nrelative prompt gain {self.relative_gain:+.4f} over {self.n} samples")
        return "\n".join(rows)


def shapes_generation_records(n: int, split: str = "val", first: int = 0) -> list[tuple[dict, list]]:
    """``n`` ShapesWorld generation samples (record, images) of a held-out split, as the trainer reads
    them."""
    out = []
    for seed in split_seeds(split)[first : first + n]:
        sample = make_sample(int(seed), "generation")
        images = sample.pop("images")
        out.append((sample, images))
    return out


def rung_records_by_background(
    rung: str, n: int, split: str = "val", zoom: float = 1.0, first: int = 0, short: bool = False
) -> dict[str, list[tuple[dict, list]]]:
    """``n`` samples of ladder ``rung`` (L1 or L2) per background colour, from the held-out ``split``
    (``short``: with the short prompts, which do not name the background)."""
    from cheers.data.shapes.ladder import rung_sample
    from cheers.data.shapes.palette import BACKGROUND_COLORS

    if rung not in ("L1", "L2"):
        raise ValueError(
            f"objects-only prompt gain needs rung L1 or L2 (objects on a named background), got {rung!r}"
        )
    groups: dict[str, list[tuple[dict, list]]] = {bg: [] for bg in BACKGROUND_COLORS}
    for seed in split_seeds(split)[first:]:
        sample = rung_sample(rung, int(seed), zoom=zoom)
        background = sample.spec["background"]["color"]
        if short:  # the same image, its prompt without the background sentence
            sample = rung_sample(rung, int(seed), zoom=zoom, short=True)
        group = groups[background]
        if len(group) < n:
            group.append((sample.record, [sample.image]))
        if all(len(g) == n for g in groups.values()):
            return groups
    raise ValueError(f"the {split} split has fewer than {n} {rung} samples per background")


def object_prompt_gain(
    model: Cheers,
    processor: CheersProcessor,
    rung: str = "L1",
    n: int = 12,
    split: str = "val",
    times: Sequence[float] = (0.1, 0.5),
    zoom: float = 1.0,
    batch_size: int = 32,
    short: bool = False,
) -> PromptGain:
    """The prompt gain of the objects' words alone: :func:`prompt_gain` within groups of ``n`` ``rung``
    samples that share a background colour (so the swapped prompt names the same background), averaged over
    the groups (``n`` per background colour). ``short``: the prompts in ShapesGenEval's short form, which
    name no background (same images)."""
    return PromptGain.combine(
        [
            prompt_gain(model, processor, records, times, batch_size)
            for records in rung_records_by_background(rung, n, split, zoom, short=short).values()
        ]
    )


def _generation_samples(
    model: Cheers,
    processor: CheersProcessor,
    records: Sequence[tuple[dict, list]],
    times: Sequence[float],
    seed: int,
    cfg_dropout: float = 0.0,
) -> tuple[tuple[int, int, int], list]:
    """(latent shape, training samples) of text-to-image ``records``; raises on bad times or other tasks."""
    if not times or not all(0 <= t < 1 for t in times):
        raise ValueError(f"times must be a non-empty list in [0, 1), got {list(times)}")
    cfg = model.config
    grid = cfg.image_size // cfg.patch_size
    shape = (cfg.latent_channels, grid, grid)
    builder = SampleBuilder(processor, shape, cfg_dropout=cfg_dropout)
    samples = [builder(rec, images, seed + i) for i, (rec, images) in enumerate(records)]
    if any(s.task != "generation" for s in samples):
        raise ValueError(
            "every record must be a text-to-image sample (one <image_gen> image, no input image)"
        )
    return shape, samples


def _own_and_rolled(
    model: Cheers, processor: CheersProcessor, records: Sequence[tuple[dict, list]], times, seed: int
) -> tuple[list, list]:
    """The generation samples of ``records`` with their own prompts, and the same with the prompts rolled by
    one (each image with the next sample's prompt); at least 2 records."""
    if len(records) < 2:
        raise ValueError(f"need at least 2 records to swap prompts between, got {len(records)}")
    _, own = _generation_samples(model, processor, records, times, seed)
    rolled = [
        dataclasses.replace(
            s, input_ids=own[(i + 1) % len(own)].input_ids, labels=own[(i + 1) % len(own)].labels
        )
        for i, s in enumerate(own)
    ]
    return own, rolled


@torch.no_grad()
def prompt_gain(
    model: Cheers,
    processor: CheersProcessor,
    records: Sequence[tuple[dict, list]],
    times: Sequence[float] = DEFAULT_TIMES,
    batch_size: int = 32,
    seed: int = 0,
) -> PromptGain:
    """Flow losses of generation ``records`` with their own, another sample's and the unconditional prompt.

    Args:
        records: (release record, images) pairs whose last image is generated (``<image_gen>``), at least 2.
        times: flow times to evaluate at (each image at each time, same noise throughout).
        batch_size: samples per forward.
    """
    own, rolled = _own_and_rolled(model, processor, records, times, seed)
    _, uncond = _generation_samples(model, processor, records, times, seed, cfg_dropout=1.0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = np.zeros((3, len(times)))
    try:
        for start in range(0, len(own), batch_size):
            for k, samples in enumerate((own, rolled, uncond)):
                batch = collate(samples[start : start + batch_size], processor.special.pad).to(device)
                for j, t in enumerate(times):
                    batch.t = torch.full_like(batch.t, float(t))
                    out = model(**batch.model_inputs())
                    sums[k, j] += float(out.image_loss) * len(batch)
    finally:
        model.train(was_training)
    means = sums / len(own)
    return PromptGain(
        tuple(float(t) for t in times), *(tuple(float(v) for v in row) for row in means), n=len(own)
    )


@dataclasses.dataclass(frozen=True)
class NoiseReadout:
    """How the predicted velocity ``v`` splits over the target ``u = z1 - x0``, per flow time.

    ``v ≈ clean·z1 − noise·x0`` fitted by least squares over all elements (both 1 for the exact velocity). The
    Euler sampler
    removes the starting noise only through the −x0 part of ``v``: a model with ``noise`` near 0 ends its ODE
    with most of that noise still in the latent (mottled, speckled images), however well it reads its prompt.
    The generator sees z_t only through the pixels the projector decoder makes of it, so ``noise`` measures
    whether those pixels carry z_t (docs/tiny-model.md, "The noise the generator cannot see")."""

    times: tuple[float, ...]
    noise: tuple[float, ...]
    clean: tuple[float, ...]
    n: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        rows = ["| t | noise read (1 ideal) | image read (1 ideal) |", "|---:|---:|---:|"]
        rows += [f"| {t:.2f} | {a:+.3f} | {b:+.3f} |" for t, a, b in zip(self.times, self.noise, self.clean)]
        return "\n".join(rows)


@torch.no_grad()
def noise_readout(
    model: Cheers,
    processor: CheersProcessor,
    records: Sequence[tuple[dict, list]],
    times: Sequence[float] = DEFAULT_TIMES,
    batch_size: int = 32,
    seed: int = 0,
) -> NoiseReadout:
    """:class:`NoiseReadout` of ``model`` on generation ``records`` (own prompts; one noise draw per time)."""
    from einops import rearrange

    if not records:
        raise ValueError("need at least one record")
    shape, samples = _generation_samples(model, processor, records, times, seed)
    grid = shape[-1]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    sums = np.zeros((5, len(times)))  # <v, z1>, <v, x0>, <z1, z1>, <z1, x0>, <x0, x0>
    try:
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size], processor.special.pad).to(device)
            for j, t in enumerate(times):
                batch.t = torch.full_like(batch.t, float(t))
                batch.x0 = torch.randn((len(batch),) + shape, generator=generator).to(device)
                out = model(**batch.model_inputs())
                v = out.pred_velocity.float()
                x0 = batch.x0.float()
                z1 = rearrange(out.target_velocity.float(), "n (h w) c -> n c h w", h=grid) + x0
                pairs = ((v, z1), (v, x0), (z1, z1), (z1, x0), (x0, x0))
                sums[:, j] += [float((a * b).sum()) for a, b in pairs]
    finally:
        model.train(was_training)
    clean, noise = [], []
    for vz, vx, zz, zx, xx in sums.T:  # the normal equations of v ≈ a·z1 + b·x0
        a, b = np.linalg.solve([[zz, zx], [zx, xx]], [vz, vx])
        clean.append(float(a))
        noise.append(float(-b))
    return NoiseReadout(tuple(float(t) for t in times), tuple(noise), tuple(clean), len(samples))


@dataclasses.dataclass(frozen=True)
class RoutingProbe:
    """Where a swapped prompt still shows, and how large the image tokens are against the text.

    The relative change ``|a_other - a_own| / |a_own|`` when each sample's prompt is replaced by another's
    (same images, time and noise) of: the LLM's final image states, the flow head's stage-1 output (``low``,
    before the HFI) and the predicted velocity. A model whose routing carries the prompt into the image
    positions has a large first number (the learnability ladder's onset: a few % -> ~35 %); one whose head
    ignores those states has a small last number. ``token_norm`` / ``text_norm``: mean norm of the image
    tokens at the LLM input and of the text embeddings (docs/tiny-model.md: the image tokens drown the
    prompt when they are much larger)."""

    t: float
    image_states: float
    stage1: float
    velocity: float
    token_norm: float
    text_norm: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        return "\n".join(
            [
                f"| change when the prompt is swapped (t = {self.t:.2f}, {self.n} samples) | relative |",
                "|---|---:|",
                f"| LLM image states | {self.image_states:.4f} |",
                f"| flow head stage 1 (low) | {self.stage1:.4f} |",
                f"| velocity | {self.velocity:.4f} |",
                f"\nimage tokens' mean norm {self.token_norm:.3f} "
                f"against the text embeddings' {self.text_norm:.3f}",
            ]
        )


@torch.no_grad()
def routing_probe(
    model: Cheers,
    processor: CheersProcessor,
    records: Sequence[tuple[dict, list]],
    t: float = 0.1,
    batch_size: int = 32,
    seed: int = 0,
) -> RoutingProbe:
    """:class:`RoutingProbe` of ``model`` on generation ``records`` (at least 2; prompts rolled by one)."""
    own, rolled = _own_and_rolled(model, processor, records, (t,), seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    diffs = np.zeros((3, 2))  # [states, low, velocity] x [|other - own|², |own|²]
    norms = np.zeros((2, 2))  # [image tokens, text embeddings] x [sum of norms, count]
    stage1: list[torch.Tensor] = []  # the flow head's stage-1 output of the forward below, as it ran
    hook = model.model.gen_projector.register_forward_hook(lambda _m, _a, out: stage1.append(out))
    try:
        for start in range(0, len(own), batch_size):
            outs = []
            for samples in (own, rolled):
                batch = collate(samples[start : start + batch_size], processor.special.pad).to(device)
                batch.t = torch.full_like(batch.t, float(t))
                out = model(**batch.model_inputs())
                asm = out.assembled
                states = out.hidden_states[asm.image_slots]
                outs.append((states.float(), stage1.pop().float(), out.pred_velocity.float()))
                if samples is own:  # image tokens at the LLM input against the prompts' text embeddings
                    text = asm.valid & ~asm.image_slots
                    norms[0] += [
                        float(asm.embeds[asm.image_flags].float().norm(dim=-1).sum()),
                        int(asm.image_flags.sum()),
                    ]
                    norms[1] += [float(asm.embeds[text].float().norm(dim=-1).sum()), int(text.sum())]
            for k, (a, b) in enumerate(zip(outs[0], outs[1])):
                diffs[k] += [float((b - a).pow(2).sum()), float(a.pow(2).sum())]
    finally:
        hook.remove()
        model.train(was_training)
    states, low, velocity = (float(np.sqrt(d / max(o, 1e-30))) for d, o in diffs)
    token_norm, text_norm = (float(total / max(count, 1)) for total, count in norms)
    return RoutingProbe(float(t), states, low, velocity, token_norm, text_norm, len(own))
