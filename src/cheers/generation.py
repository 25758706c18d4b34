"""Interleaved generation with a KV cache: prefill, image sampling (flow ODE) and text decoding (SPEC §10).

Dimension legend: B prompts, R cache rows (B, or 2B with guidance: conditional rows first), T cache length,
N tokens per image, C latent channels, h×w latent grid, V vocabulary.

Unlike the release (batch of one, row 0 only), every row is independent: rows of different lengths are
right-padded, each row has its own positions and its own valid keys, so each gives what it gives alone.
Guidance runs the conditional and unconditional prompts as one batch and tokenizes each latent once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cheers.models.cheers import Cheers
from cheers.sampling import apply_guidance, edit_schedule, edit_start, euler_sample, schedule
from cheers.text_sampling import TextSampling, pick_tokens
from cheers.tokens import unconditional_ids

logger = logging.getLogger(__name__)


@dataclass
class LMState:
    """The KV cache of R rows and, per row, which cached keys are real and the next position id."""

    cache: object
    key_valid: torch.Tensor  # (R, T) bool
    next_pos: torch.Tensor  # (R,) long
    last_logits: torch.Tensor  # (R, V) logits after the last real token of each row

    @property
    def length(self) -> int:
        return self.key_valid.shape[1]

    def crop(self, length: int, next_pos: torch.Tensor) -> None:
        """Drop every cache entry past ``length`` and restore the rows' next positions."""
        if self.length > length:
            self.cache.crop(length - self.length)  # a negative count removes that many entries
            self.key_valid = self.key_valid[:, :length]
        self.next_pos = next_pos.clone()


def prefill(model: Cheers, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            pixel_values: torch.Tensor | None, repeat_images: int = 1) -> LMState:
    """Run the prompt (images at t = 1) and keep its cache; the last real position seeds decoding.

    ``repeat_images`` > 1 tokenizes ``pixel_values`` once and feeds the tokens to that many copies of the
    batch (the guidance branches share their images).
    """
    features = None
    if pixel_values is not None:
        features = model.model.image_features(pixel_values)
        if repeat_images > 1:
            features = dataclasses.replace(features, tokens=features.tokens.repeat(repeat_images, 1, 1))
    out = model(input_ids, attention_mask, use_cache=True, image_features=features)
    asm = out.assembled
    last = (asm.lengths - 1).clamp(min=0)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    logits = out.logits[rows, last]  # (R, V)
    return LMState(out.past_key_values, asm.valid.clone(), asm.lengths.clone(), logits)


def extend(model: Cheers, state: LMState, embeds: torch.Tensor, active: torch.Tensor,
           bidirectional: bool) -> torch.Tensor:
    """Append T new positions per row to the cache; returns their final hidden states (R, T, Dt).

    New tokens see every real cached key of their row and each other (all of them when ``bidirectional``,
    else causally). Rows with ``active`` False compute but their entries are marked invalid and their
    positions do not advance.
    """
    rows, new = embeds.shape[:2]
    device = embeds.device
    positions = state.next_pos[:, None] + torch.arange(new, device=device)  # (R, T)
    if bidirectional:
        block = torch.ones(new, new, dtype=torch.bool, device=device)
    else:
        block = torch.ones(new, new, dtype=torch.bool, device=device).tril()
    past = state.key_valid[:, None, :].expand(rows, new, -1)  # (R, T, P)
    mask = torch.cat([past, block.expand(rows, -1, -1)], dim=-1)[:, None]  # (R, 1, T, P+T)
    out = model.run_language_model(embeds, mask, positions, state.cache, use_cache=True)
    state.key_valid = torch.cat([state.key_valid, active[:, None].expand(rows, new)], dim=1)
    state.next_pos = state.next_pos + active.long() * new
    return out.last_hidden_state


class ImageSampler:
    """Velocity of a latent given the cached prompt(s), with optional guidance (SPEC §10.1).

    Args:
        model: the Cheers model.
        state: the cache after the prompt; R = B, or 2B with guidance (conditional rows first).
        cfg_scale: guidance scale, or None for none.
        active: (B,) rows that are generating an image; the others' entries are invalidated.
    """

    def __init__(self, model: Cheers, state: LMState, cfg_scale: float | None, active: torch.Tensor) -> None:
        self.model, self.state, self.cfg_scale = model, state, cfg_scale
        self.guided = state.key_valid.shape[0] == 2 * active.shape[0]
        self.active = torch.cat([active, active]) if self.guided else active
        self.prefix_length = state.length
        self.prefix_pos = state.next_pos.clone()
        self.evaluated = False

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """x (B, C, h, w), t 0-d -> (conditional velocity, unconditional velocity or None, gate (B, h, w))."""
        core = self.model.model
        if self.evaluated:  # each evaluation sees only the prompt plus its own image tokens
            self.state.crop(self.prefix_length, self.prefix_pos)
        self.evaluated = True
        tokens, pixel_hat = core.tokenize_latent(x)  # computed once for both guidance branches
        if self.guided:
            tokens, pixel_hat = torch.cat([tokens, tokens]), torch.cat([pixel_hat, pixel_hat])
        rows = tokens.shape[0]
        hidden = extend(self.model, self.state, tokens, self.active, bidirectional=True)  # (R, N, Dt)
        temb1, temb2 = core.time_embed(t.reshape(1).to(x.device))
        v, gate = core.velocity_head(hidden, temb1.expand(rows, -1, -1), temb2.expand(rows, -1, -1), pixel_hat,
                                     tuple(x.shape[-2:]))
        if not self.guided:
            return v, None, gate
        b = x.shape[0]
        return v[:b], v[b:], gate[:b]

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocity the sampler integrates (guidance applied) and the gate map."""
        v_cond, v_uncond, gate = self.velocity(x, t)
        if v_uncond is None:
            return v_cond, gate
        return apply_guidance(v_cond, v_uncond, self.cfg_scale), gate


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # per prompt: generated ids (IM_END first after an image)
    images: list[list[torch.Tensor]]  # per prompt: decoded images (3, H, W), unclamped
    latents: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt: final latents (C, h, w)
    gates: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt, per image: (S, h, w) gate maps


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
Generators = torch.Generator | list[torch.Generator] | None


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def randn_rows(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal (B, ...); with a list of generators row b is drawn from generator b alone, so a prompt
    gets the same noise in a batch as on its own."""
    # drawn on the generator's own device, then moved: a CPU generator gives the same noise on any device
    if not isinstance(generator, list):
        where = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=where).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)


@torch.no_grad()
def generate(model: Cheers, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, *, num_inference_steps: int = 80,
             cfg_scale: float | None = None, alpha: float = 1.0, edit_image: bool = False,
             max_length: int = 1024, sampling: TextSampling | None = None,
             generator: Generators = None, latents: torch.Tensor | None = None,
             latent_grid: tuple[int, int] | None = None, final_step: str = "release",
             max_total_ids: int = 1024, callback: StepCallback | None = None,
             return_gates: bool = False,
             token_callback: Callable[[int, int], None] | None = None,
             uncond_input_ids: torch.Tensor | None = None,
             uncond_attention_mask: torch.Tensor | None = None) -> GenerationOutput:
    """The release's ``generate`` loop, batched: text decoding, and an image whenever a row's last token is
    ``<im_start>`` (SPEC §10.2).

    Args:
        input_ids, attention_mask: (B, L) prompts (right-padded), typically ending in ``<im_start>``.
        pixel_values: (n, 3, H, W) the prompts' images: one per marker, plus one per marker-less row (the
            release's dummy image, prepended). With ``edit_image`` there is one image per row, which is also
            the editing start.
        num_inference_steps: Euler steps S (editing runs int(0.9·S) from t = 0.1).
        cfg_scale: guidance scale; None or 1 disables guidance.
        alpha: the release's time shift (α < 1 spends more steps near the noise end).
        max_length: stop once the count (N per image + 1 per text token) exceeds this.
        sampling: text sampling settings (greedy by default).
        latents: (B, C, h, w) the start noise of the first image (else drawn from ``generator``).
        latent_grid: (h, w) of generated images; default: the grid of ``pixel_values``.
        final_step: ``"release"`` (overshoot by 1/S) or ``"exact"`` (stop at t = 1).
        callback: ``callback(step, t, x, v)`` after each velocity evaluation.
        return_gates: also return the HFI gate map of every step of every image.
        token_callback: ``token_callback(row, token_id)`` for each generated token, as it is chosen (streaming).
        uncond_input_ids, uncond_attention_mask: the unconditional prompts for guidance (e.g. a negative
            prompt); default: the release's rule (every id but the image-block tokens becomes ``<no_mean>``).
    """
    special = model.require_special()
    sampling = sampling or TextSampling()
    device = input_ids.device
    batch = input_ids.shape[0]
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    guided = cfg_scale is not None and cfg_scale != 1
    if edit_image and (pixel_values is None or pixel_values.shape[0] != batch):
        raise ValueError(f"edit_image needs one input image per prompt: {batch} prompt(s), "
                         f"{0 if pixel_values is None else pixel_values.shape[0]} image(s)")
    if latent_grid is None:
        if pixel_values is None:
            raise ValueError("pass latent_grid=(h, w) (or pixel_values) so the size of generated images is known")
        latent_grid = model.model.grid_of(pixel_values)
    ids, mask, pix = input_ids, attention_mask, pixel_values
    if guided:
        if uncond_input_ids is None:
            uncond_input_ids, uncond_attention_mask = unconditional_ids(input_ids, special), attention_mask
        elif uncond_attention_mask is None:
            uncond_attention_mask = torch.ones_like(uncond_input_ids)
        if uncond_input_ids.shape[0] != batch:
            raise ValueError(f"{uncond_input_ids.shape[0]} unconditional prompts for {batch} prompts")
        width = max(input_ids.shape[1], uncond_input_ids.shape[1])
        ids = torch.cat([_pad_to(input_ids, width, special.pad), _pad_to(uncond_input_ids, width, special.pad)])
        mask = torch.cat([_pad_to(attention_mask, width, 0), _pad_to(uncond_attention_mask, width, 0)])
    state = prefill(model, ids, mask, pix, repeat_images=2 if guided else 1)
    rows = state.key_valid.shape[0]
    lengths = attention_mask.sum(dim=1)
    last_token = input_ids[torch.arange(batch, device=device), lengths - 1]
    pending_image = last_token == special.im_start  # (B,)
    history = [input_ids[b, : lengths[b]].tolist() for b in range(batch)]
    out = GenerationOutput([[] for _ in range(batch)], [[] for _ in range(batch)], [[] for _ in range(batch)],
                           [[] for _ in range(batch)])
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    counter = torch.zeros(batch, dtype=torch.long, device=device)
    just_imaged = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = num_inference_steps
    first_image = True
    channels = model.config.latent_channels
    while not bool(done.all()):
        make = pending_image & ~done
        if bool(make.any()):
            if edit_image:
                steps = int(steps * 0.9) if not first_image else steps
                ts = edit_schedule(steps, alpha)
                steps_used = ts.shape[0]
            else:
                ts = schedule(steps, alpha)
                steps_used = steps
            if latents is not None and first_image:
                noise = latents.to(device=device, dtype=state.last_logits.dtype)
            else:
                noise = randn_rows((batch, channels, *latent_grid), generator, device)
            dtype = next(model.parameters()).dtype
            noise = noise.to(dtype)
            x = edit_start(model.model.vae_model.encode(pixel_values.to(dtype)), noise) if edit_image else noise
            sampler = ImageSampler(model, state, cfg_scale if guided else None, make)
            step_gates: list[torch.Tensor] = []

            def velocity(x_t: torch.Tensor, t: torch.Tensor, n: int, sampler=sampler, step_gates=step_gates):
                v, gate = sampler.guided_velocity(x_t, t)
                if return_gates:
                    step_gates.append(gate)
                return v

            final = euler_sample(velocity, x, ts.to(device), final_step=final_step, callback=callback)
            pixels = model.model.vae_model.decode(final)
            for b in torch.nonzero(make).flatten().tolist():
                out.images[b].append(pixels[b])
                out.latents[b].append(final[b])
                if return_gates:
                    out.gates[b].append(torch.stack([g[b] for g in step_gates]))
            counter = counter + make.long() * (latent_grid[0] * latent_grid[1] // 4)
            logger.debug("generated an image in %d steps for rows %s", steps_used, make.tolist())
            just_imaged, pending_image, first_image = make, pending_image & ~make, False
        active = ~done
        picked = pick_tokens(state.last_logits, history + (history if guided else []), sampling,
                             generator + generator if isinstance(generator, list) and guided else generator)
        token = picked[:batch].clone()
        token[just_imaged] = special.im_end
        counter = counter + (active & ~just_imaged).long()
        for b in torch.nonzero(active).flatten().tolist():
            out.sequences[b].append(int(token[b]))
            history[b].append(int(token[b]))
            if token_callback is not None:
                token_callback(b, int(token[b]))
        stop = (token == special.eos) | (counter > max_length)
        stop |= torch.tensor([len(h) > max_total_ids for h in history], device=device)
        pending_image = pending_image | (active & ~stop & (token == special.im_start))
        feed = token if not guided else torch.cat([token, torch.where(just_imaged, special.im_end, picked[batch:])])
        just_imaged = torch.zeros_like(just_imaged)
        done = done | (active & stop)
        if bool(done.all()):
            break
        feed_active = active & ~done
        feed_active = torch.cat([feed_active, feed_active]) if guided else feed_active
        embeds = model.model.language_model.embed_tokens(feed[:, None])  # (R, 1, Dt)
        hidden = extend(model, state, embeds, feed_active, bidirectional=False)
        state.last_logits = model.lm_head(hidden[:, -1])
        assert state.last_logits.shape[0] == rows
    return out


