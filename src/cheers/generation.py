"""Interleaved generation with a KV cache: prefill, image sampling (flow ODE) and text decoding (reference §10).

Dimension legend: B prompts, R cache rows (B, or 2B with guidance: conditional rows first), T cache length,
N tokens per image, C latent channels, h×w latent grid, V vocabulary.

Unlike the release (batch of one, row 0 only), every row is independent: rows of different lengths are
right-padded, each row has its own positions and its own valid keys, so each gives what it gives alone.
Guidance runs the conditional and unconditional prompts as one batch and tokenizes each latent once.
The cache itself (prefill, extend, crop; dynamic or static) is :mod:`cheers.lm_state`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cheers.lm_state import LMState, StaticDecoder, extend, prefill, to_static
from cheers.models.cheers import Cheers
from cheers.models.vae import scratch
from cheers.sampling import (
    apply_guidance,
    check_guidance_interval,
    check_solver,
    edit_schedule,
    edit_start,
    edit_steps,
    in_guidance_interval,
    sample,
    schedule,
)
from cheers.text_sampling import TextSampling, pick_tokens
from cheers.tokens import unconditional_ids

logger = logging.getLogger(__name__)

__all__ = ["GenerationOutput", "ImageSampler", "LMState", "StaticDecoder", "extend", "generate", "prefill",
           "randn_rows", "to_static"]


class ImageSampler:
    """Velocity of a latent given the cached prompt(s), with optional guidance (reference §10.1).

    Args:
        model: the Cheers model.
        state: the cache after the prompt; R = B, or 2B with guidance (conditional rows first).
        cfg_scale: guidance scale, or None for none.
        active: (B,) rows that are generating an image; the others' entries are invalidated.
        guidance_interval: ``(t_lo, t_hi)``: guide only there; elsewhere the unconditional rows are not run.
    """

    def __init__(self, model: Cheers, state: LMState, cfg_scale: float | None, active: torch.Tensor,
                 guidance_interval: tuple[float, float] | None = None) -> None:
        self.model, self.state, self.cfg_scale = model, state, cfg_scale
        self.guidance_interval = check_guidance_interval(guidance_interval)
        self.guided = state.key_valid.shape[0] == 2 * active.shape[0]
        self.active = torch.cat([active, active]) if self.guided else active
        self.prefix_length = state.length
        self.prefix_pos = state.next_pos.clone()
        self.evaluated = False
        self.partial: LMState | None = None  # the conditional rows' state after a conditional-only evaluation

    def velocity(self, x: torch.Tensor, t: torch.Tensor,
                 guide: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """x (B, C, h, w), t 0-d -> (conditional velocity, unconditional velocity or None, gate (B, h, w)).

        With ``guide`` False only the conditional rows go through the LLM and the flow head.
        """
        core = self.model.model
        if self.evaluated:  # each evaluation sees only the prompt plus its own image tokens
            self.state.crop(self.prefix_length, self.prefix_pos)
        self.evaluated, self.partial = True, None
        b = x.shape[0]
        both = self.guided and guide
        tokens, pixel_hat = core.tokenize_latent(x)  # computed once for both guidance branches
        if both:
            tokens, pixel_hat = torch.cat([tokens, tokens]), torch.cat([pixel_hat, pixel_hat])
        rows = tokens.shape[0]
        if self.guided and not guide:
            self.partial = self.state.first_rows(b)
            hidden = extend(self.model, self.partial, tokens, self.active[:b], bidirectional=True)  # (B, N, Dt)
        else:
            hidden = extend(self.model, self.state, tokens, self.active, bidirectional=True)  # (R, N, Dt)
        temb1, temb2 = core.time_embed(t.reshape(1).to(x.device))
        v, gate = core.velocity_head(hidden, temb1.expand(rows, -1, -1), temb2.expand(rows, -1, -1), pixel_hat,
                                     tuple(x.shape[-2:]))
        if not both:
            return v, None, gate
        return v[:b], v[b:], gate[:b]

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocity the sampler integrates (guidance applied inside the interval) and the gate map."""
        v_cond, v_uncond, gate = self.velocity(x, t, guide=in_guidance_interval(t, self.guidance_interval))
        if v_uncond is None:
            return v_cond, gate
        return apply_guidance(v_cond, v_uncond, self.cfg_scale), gate

    def finish(self) -> None:
        """Leave the cache as after a full evaluation of the last latent, for the text that may follow.

        If that evaluation ran the conditional rows only, their new entries are appended to the shared cache;
        the unconditional rows get placeholders marked invalid (they did not see this image).
        """
        if self.partial is None:
            return
        b, length = self.partial.key_valid.shape[0], self.partial.length
        new = length - self.prefix_length
        if self.state.static:  # the conditional rows' entries are already in the shared memory
            for layer in self.state.cache.layers:
                layer.cumulative_length.fill_(length)
            self.state.key_valid = torch.cat([self.partial.key_valid, self.state.key_valid[b:]])
            self.state.used = length
            self.state.next_pos = torch.cat([self.partial.next_pos, self.state.next_pos[b:]])
            self.partial = None
            return
        for i, layer in enumerate(self.partial.cache.layers):
            k, v = layer.keys[..., -new:, :], layer.values[..., -new:, :]  # (B, H, N, Dh)
            self.state.cache.update(torch.cat([k, torch.zeros_like(k)]), torch.cat([v, torch.zeros_like(v)]), i)
        self.state.key_valid = torch.cat([self.partial.key_valid,
                                          torch.cat([self.state.key_valid[b:],
                                                     self.state.key_valid.new_zeros(b, new)], dim=1)])
        self.state.next_pos = torch.cat([self.partial.next_pos, self.state.next_pos[b:]])
        self.partial = None


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
             uncond_attention_mask: torch.Tensor | None = None, solver: str = "euler",
             guidance_interval: tuple[float, float] | None = None,
             static_cache: bool = False, cuda_graph: bool = False) -> GenerationOutput:
    """The release's ``generate`` loop, batched: text decoding, and an image whenever a row's last token is
    ``<im_start>`` (reference §10.2).

    Args:
        input_ids, attention_mask: (B, L) prompts (right-padded), typically ending in ``<im_start>``.
        pixel_values: (n, 3, H, W) the prompts' images: one per marker, plus one per marker-less row (the
            release's dummy image, prepended). With ``edit_image`` there is one image per row, which is also
            the editing start.
        num_inference_steps: grid points S (editing runs int(0.9·S) from t = 0.1).
        cfg_scale: guidance scale; None or 1 disables guidance.
        alpha: the release's time shift (α < 1 spends more steps near the noise end).
        max_length: stop once the count (N per image + 1 per text token) exceeds this.
        sampling: text sampling settings (greedy by default).
        latents: (B, C, h, w) the start noise of the first image (else drawn from ``generator``).
        latent_grid: (h, w) of generated images; default: the grid of ``pixel_values``.
        final_step: ``"release"`` (overshoot by 1/S) or ``"exact"`` (stop at t = 1).
        callback: ``callback(step, t, x, v)`` after the velocity evaluation at each grid point.
        return_gates: also return the HFI gate map of every grid point of every image.
        token_callback: ``token_callback(row, token_id)`` for each generated token, as it is chosen (streaming).
        uncond_input_ids, uncond_attention_mask: the unconditional prompts for guidance (e.g. a negative
            prompt); default: the release's rule (every id but the image-block tokens becomes ``<no_mean>``).
        solver: the ODE solver, one of :data:`cheers.sampling.SOLVERS` (``"euler"``: the release's).
        guidance_interval: ``(t_lo, t_hi)``: apply guidance only for t in that interval; outside it the
            unconditional branch is not computed. None: guide at every step.
        static_cache: after the prefill, decode into a pre-allocated KV cache (:func:`to_static`) sized from
            ``max_length``; the dynamic cache's tokens (values equal up to float rounding). Text steps then go
            through fixed buffers (:class:`cheers.lm_state.StaticDecoder`).
        cuda_graph: (implies ``static_cache``) capture the text decode step in a CUDA graph once and replay it
            for every token; CUDA devices only (a ``ValueError`` elsewhere).
    """
    special = model.require_special()
    sampling = sampling or TextSampling()
    device = input_ids.device
    batch = input_ids.shape[0]
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    guided = cfg_scale is not None and cfg_scale != 1
    check_solver(solver)
    guidance_interval = check_guidance_interval(guidance_interval)
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
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model and inputs on a CUDA device, not {device.type!r}")
    static_cache = static_cache or cuda_graph
    state = prefill(model, ids, mask, pix, repeat_images=2 if guided else 1)
    decoder = None
    if static_cache:
        # a text token adds 1 entry and 1 to the count; an image adds N (plus N transient while sampling) and its
        # uncounted <im_end> 1; the count may pass max_length by one image: at most 2·(max_length + 2N) + 2
        n_image = latent_grid[0] * latent_grid[1] // 4
        state = to_static(model, state, state.length + 2 * (max_length + 2 * n_image) + 2 + (2 if cuda_graph else 0))
        decoder = StaticDecoder(model, state, cuda_graph=cuda_graph)
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
                steps = edit_steps(steps) if not first_image else steps
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
            sampler = ImageSampler(model, state, cfg_scale if guided else None, make, guidance_interval)
            step_gates: list[torch.Tensor] = []
            last_gate: list[torch.Tensor] = []

            def velocity(x_t: torch.Tensor, t: torch.Tensor, n: int, sampler=sampler, last_gate=last_gate):
                v, gate = sampler.guided_velocity(x_t, t)
                last_gate[:] = [gate]
                return v

            def on_step(n, t, x_t, v, step_gates=step_gates, last_gate=last_gate):
                if return_gates:  # the gate of the grid point's evaluation (solvers may evaluate in between)
                    step_gates.append(last_gate[0])
                if callback is not None:
                    callback(n, t, x_t, v)

            with scratch():  # the VAE decoders reuse their activation buffers across the steps (CPU)
                final = sample(velocity, x, ts.to(device), solver=solver, final_step=final_step, callback=on_step)
                sampler.finish()
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
        if decoder is not None:
            decoder.step(embeds, feed_active)
        else:
            hidden = extend(model, state, embeds, feed_active, bidirectional=False)
            state.last_logits = model.lm_head(hidden[:, -1])
        assert state.last_logits.shape[0] == rows
    return out


