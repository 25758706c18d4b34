"""Interleaved generation with a KV cache: prefill, image sampling (flow ODE) and text decoding
(reference §10).

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
from dataclasses import dataclass, field, replace

import torch

from cheers.lm_state import LMState, StaticDecoder, extend, prefill, to_static
from cheers.models.cheers import Cheers
from cheers.sampling import (
    ImageSampling,
    apply_guidance,
    check_guidance_interval,
    edit_start,
    edit_steps,
    in_guidance_interval,
    sample,
)
from cheers.text_sampling import TextSampling, pick_tokens
from cheers.tokens import unconditional_ids

logger = logging.getLogger(__name__)

__all__ = [
    "GenerationOutput",
    "ImageSampler",
    "ImageSampling",
    "LMState",
    "StaticDecoder",
    "TextSampling",
    "decode_step",
    "extend",
    "generate",
    "guided_batch",
    "prefill",
    "randn_rows",
    "sample_image",
    "to_static",
]


class ImageSampler:
    """Velocity of a latent given the cached prompt(s), with optional guidance (reference §10.1).

    Args:
        model: the Cheers model.
        state: the cache after the prompt; R = B, or 2B with guidance (conditional rows first).
        guidance_scale: guidance scale, or None for none.
        active: (B,) rows that are generating an image; the others' entries are invalidated.
        guidance_interval: ``(t_lo, t_hi)``: guide only there; elsewhere the unconditional rows are not run.
    """

    def __init__(
        self,
        model: Cheers,
        state: LMState,
        guidance_scale: float | None,
        active: torch.Tensor,
        guidance_interval: tuple[float, float] | None = None,
    ) -> None:
        self.model, self.state, self.guidance_scale = model, state, guidance_scale
        self.guidance_interval = check_guidance_interval(guidance_interval)
        self.guided = state.key_valid.shape[0] == 2 * active.shape[0]
        self.active = torch.cat([active, active]) if self.guided else active
        self.prefix_length = state.length
        self.prefix_pos = state.next_pos.clone()
        self.evaluated = False
        self.partial: LMState | None = None  # the conditional rows' state after a conditional-only evaluation

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, guide: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
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
            hidden = extend(
                self.model, self.partial, tokens, self.active[:b], bidirectional=True
            )  # (B, N, Dt)
        else:
            hidden = extend(self.model, self.state, tokens, self.active, bidirectional=True)  # (R, N, Dt)
        temb1, temb2 = core.time_embed(t.reshape(1).to(x.device))
        v, gate = core.velocity_head(
            hidden, temb1.expand(rows, -1, -1), temb2.expand(rows, -1, -1), pixel_hat, tuple(x.shape[-2:])
        )
        if not both:
            return v, None, gate
        return v[:b], v[b:], gate[:b]

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocity the sampler integrates (guidance applied inside the interval) and the gate map."""
        v_cond, v_uncond, gate = self.velocity(x, t, guide=in_guidance_interval(t, self.guidance_interval))
        if v_uncond is None:
            return v_cond, gate
        return apply_guidance(v_cond, v_uncond, self.guidance_scale), gate

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
            self.state.cache.update(
                torch.cat([k, torch.zeros_like(k)]), torch.cat([v, torch.zeros_like(v)]), i
            )
        self.state.key_valid = torch.cat(
            [
                self.partial.key_valid,
                torch.cat([self.state.key_valid[b:], self.state.key_valid.new_zeros(b, new)], dim=1),
            ]
        )
        self.state.next_pos = torch.cat([self.partial.next_pos, self.state.next_pos[b:]])
        self.partial = None


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # per prompt: generated ids (IM_END first after an image)
    images: list[list[torch.Tensor]]  # per prompt: decoded images (3, H, W), unclamped
    latents: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt: final latents (C, h, w)
    gates: list[list[torch.Tensor]] = field(
        default_factory=list
    )  # per prompt, per image: (S, h, w) gate maps


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


@dataclass
class _Rows:
    """Per-row progress of the generation loop (B rows)."""

    history: list[list[int]]  # prompt and generated ids, for repetition penalties and the id cap
    pending_image: torch.Tensor  # (B,) the row's last token was <im_start>: an image comes next
    done: torch.Tensor  # (B,)
    count: torch.Tensor  # (B,) generated tokens: N per image, 1 per text token
    just_imaged: torch.Tensor  # (B,) an image was made at this step (its <im_end> is the next token)
    images_made: int = 0


def guided_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    uncond_input_ids: torch.Tensor | None,
    uncond_attention_mask: torch.Tensor | None,
    special,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2B rows guidance runs as one batch: the prompts, then their unconditional prompts (default: the
    release's rule, every id but the image-block tokens made ``<no_mean>``), padded to one width."""
    batch = input_ids.shape[0]
    if uncond_input_ids is None:
        uncond_input_ids, uncond_attention_mask = unconditional_ids(input_ids, special), attention_mask
    elif uncond_attention_mask is None:
        uncond_attention_mask = torch.ones_like(uncond_input_ids)
    if uncond_input_ids.shape[0] != batch:
        raise ValueError(f"{uncond_input_ids.shape[0]} unconditional prompts for {batch} prompts")
    width = max(input_ids.shape[1], uncond_input_ids.shape[1])
    ids = torch.cat([_pad_to(input_ids, width, special.pad), _pad_to(uncond_input_ids, width, special.pad)])
    mask = torch.cat([_pad_to(attention_mask, width, 0), _pad_to(uncond_attention_mask, width, 0)])
    return ids, mask


def sample_image(
    model: Cheers,
    state: LMState,
    rows: torch.Tensor,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    settings: ImageSampling,
    callback: StepCallback | None = None,
    return_gates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Integrate the flow ODE from ``x`` (B, C, h, w) over ``timesteps`` for the ``rows`` (B,) that make an
    image, with the prompt(s) in ``state``; leaves the cache as after the final latent.

    Returns the final latents (B, C, h, w), their pixels (B, 3, H, W) and, with ``return_gates``, the HFI gate
    map (B, h, w) of every grid point.
    """
    sampler = ImageSampler(
        model, state, settings.guidance_scale if settings.guided else None, rows, settings.guidance_interval
    )
    step_gates: list[torch.Tensor] = []
    last_gate: list[torch.Tensor] = []

    def velocity(x_t: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
        v, gate = sampler.guided_velocity(x_t, t)
        last_gate[:] = [gate]
        return v

    def on_step(n: int, t: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor) -> None:
        if return_gates:  # the gate of the grid point's evaluation (solvers may evaluate in between)
            step_gates.append(last_gate[0])
        if callback is not None:
            callback(n, t, x_t, v)

    final = sample(
        velocity,
        x,
        timesteps.to(x.device),
        solver=settings.solver,
        final_step=settings.final_step,
        callback=on_step,
    )
    sampler.finish()
    return final, model.model.vae_model.decode(final), step_gates


@torch.no_grad()
def generate(
    model: Cheers,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    image_sampling: ImageSampling | None = None,
    text_sampling: TextSampling | None = None,
    max_new_tokens: int = 1024,
    stop_after_image: bool = False,
    max_total_ids: int = 1024,
    edit_image: bool = False,
    generator: Generators = None,
    latents: torch.Tensor | None = None,
    latent_grid: tuple[int, int] | None = None,
    callback: StepCallback | None = None,
    return_gates: bool = False,
    token_callback: Callable[[int, int], None] | None = None,
    uncond_input_ids: torch.Tensor | None = None,
    uncond_attention_mask: torch.Tensor | None = None,
    static_cache: bool = False,
    cuda_graph: bool = False,
) -> GenerationOutput:
    """The release's ``generate`` loop, batched: text decoding, and an image whenever a row's last token is
    ``<im_start>`` (reference §10.2).

    Args:
        input_ids, attention_mask: (B, L) prompts (right-padded), typically ending in ``<im_start>``.
        pixel_values: (n, 3, H, W) the prompts' images: one per marker, plus one per marker-less row (the
            release's dummy image, prepended). With ``edit_image`` there is one image per row, which is also
            the editing start.
        image_sampling: how images are sampled (:class:`cheers.sampling.ImageSampling`; default: 80 Euler
            steps, no guidance, shift 1).
        text_sampling: how text tokens are chosen (:class:`cheers.text_sampling.TextSampling`; greedy).
        max_new_tokens: a row stops once it has generated this many tokens, an image counting N (its tokens)
            and each text token 1. The release's ``max_length`` is ``max_new_tokens - 1``.
        stop_after_image: a row stops right after its first image (and that image's ``<im_end>``).
        max_total_ids: a row also stops once its prompt and output ids pass this many.
        edit_image: the rows' images are also their editing starts (reference §10.2).
        latents: (B, C, h, w) the start noise of the first image (else drawn from ``generator``).
        latent_grid: (h, w) of generated images; default: the grid of ``pixel_values``.
        callback: ``callback(step, t, x, v)`` after the velocity evaluation at each grid point.
        return_gates: also return the HFI gate map of every grid point of every image.
        token_callback: ``token_callback(row, token_id)`` for each generated token, as it is chosen
            (streaming).
        uncond_input_ids, uncond_attention_mask: the unconditional prompts for guidance (e.g. a negative
            prompt); default: the release's rule (every id but the image-block tokens becomes ``<no_mean>``).
        static_cache: after the prefill, decode into a pre-allocated KV cache (:func:`to_static`) sized from
            ``max_new_tokens``; the dynamic cache's tokens (values equal up to float rounding). Text steps
            then go through fixed buffers (:class:`cheers.lm_state.StaticDecoder`).
        cuda_graph: (implies ``static_cache``) capture the text decode step in a CUDA graph once and replay it
            for every token; CUDA devices only (a ``ValueError`` elsewhere).
    """
    special = model.require_special()
    images_cfg = image_sampling or ImageSampling()
    text_cfg = text_sampling or TextSampling()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = input_ids.device
    batch = input_ids.shape[0]
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    guided = images_cfg.guided
    if edit_image and (pixel_values is None or pixel_values.shape[0] != batch):
        raise ValueError(
            f"edit_image needs one input image per prompt: {batch} prompt(s), "
            f"{0 if pixel_values is None else pixel_values.shape[0]} image(s)"
        )
    if latent_grid is None:
        if pixel_values is None:
            raise ValueError(
                "pass latent_grid=(h, w) (or pixel_values) so the size of generated images is known"
            )
        latent_grid = model.model.grid_of(pixel_values)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model and inputs on a CUDA device, not {device.type!r}")
    # 1. prefill: the prompts (and, with guidance, their unconditional rows after them)
    ids, mask = input_ids, attention_mask
    if guided:
        ids, mask = guided_batch(input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, special)
    state = prefill(model, ids, mask, pixel_values, repeat_images=2 if guided else 1)
    n_image = latent_grid[0] * latent_grid[1] // 4  # tokens per image (2x2 patches)
    decoder = None
    if static_cache or cuda_graph:
        # a text token adds 1 entry and 1 to the count; an image adds N (plus N transient while sampling)
        # and its uncounted <im_end> 1; the count may pass the limit by one image: at most
        # 2·(max_new_tokens + 2N) + 2
        state = to_static(
            model, state, state.length + 2 * (max_new_tokens - 1 + 2 * n_image) + 2 + (2 if cuda_graph else 0)
        )
        decoder = StaticDecoder(model, state, cuda_graph=cuda_graph)
    lengths = attention_mask.sum(dim=1)
    last_token = input_ids[torch.arange(batch, device=device), lengths - 1]
    flags = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = _Rows(
        [input_ids[b, : lengths[b]].tolist() for b in range(batch)],
        last_token == special.im_start,
        flags.clone(),
        torch.zeros(batch, dtype=torch.long, device=device),
        flags.clone(),
    )
    out = GenerationOutput(
        [[] for _ in range(batch)],
        [[] for _ in range(batch)],
        [[] for _ in range(batch)],
        [[] for _ in range(batch)],
    )
    steps = images_cfg.num_inference_steps
    while not bool(rows.done.all()):
        # 2. an image for the rows whose last token was <im_start>
        make = rows.pending_image & ~rows.done
        if bool(make.any()):
            if edit_image and rows.images_made:  # as released: every later edit image shrinks the grid again
                steps = edit_steps(steps)
            settings = replace(images_cfg, num_inference_steps=steps)
            ts = settings.timesteps(edit=edit_image)
            if latents is not None and not rows.images_made:
                noise = latents.to(device=device, dtype=state.last_logits.dtype)
            else:
                noise = randn_rows((batch, model.config.latent_channels, *latent_grid), generator, device)
            dtype = next(model.parameters()).dtype
            noise = noise.to(dtype)
            x = (
                edit_start(model.model.vae_model.encode(pixel_values.to(dtype)), noise)
                if edit_image
                else noise
            )
            final, pixels, gates = sample_image(model, state, make, x, ts, settings, callback, return_gates)
            for b in torch.nonzero(make).flatten().tolist():
                out.images[b].append(pixels[b])
                out.latents[b].append(final[b])
                if return_gates:
                    out.gates[b].append(torch.stack([g[b] for g in gates]))
            rows.count = rows.count + make.long() * n_image
            logger.debug("generated an image in %d steps for rows %s", ts.shape[0], make.tolist())
            rows.just_imaged, rows.pending_image = make, rows.pending_image & ~make
            rows.images_made += 1
        # 3. a text token for every active row (<im_end> right after an image)
        if not decode_step(
            model,
            state,
            decoder,
            rows,
            out,
            text_cfg,
            generator,
            guided,
            max_new_tokens,
            stop_after_image,
            max_total_ids,
            token_callback,
        ):
            break
    return out


def decode_step(
    model: Cheers,
    state: LMState,
    decoder: StaticDecoder | None,
    rows: _Rows,
    out: GenerationOutput,
    text_sampling: TextSampling,
    generator: Generators,
    guided: bool,
    max_new_tokens: int,
    stop_after_image: bool,
    max_total_ids: int,
    token_callback: Callable[[int, int], None] | None,
) -> bool:
    """Choose and record one token per active row, update the stops, and feed the tokens to the LLM.

    Returns False once every row is done (nothing was fed).
    """
    special = model.require_special()
    batch = rows.done.shape[0]
    active = ~rows.done
    histories = rows.history + (rows.history if guided else [])
    picked = pick_tokens(
        state.last_logits,
        histories,
        text_sampling,
        generator + generator if isinstance(generator, list) and guided else generator,
    )
    token = picked[:batch].clone()
    token[rows.just_imaged] = special.im_end
    rows.count = rows.count + (active & ~rows.just_imaged).long()
    for b in torch.nonzero(active).flatten().tolist():
        out.sequences[b].append(int(token[b]))
        rows.history[b].append(int(token[b]))
        if token_callback is not None:
            token_callback(b, int(token[b]))
    stop = (token == special.eos) | (rows.count >= max_new_tokens)
    if stop_after_image:
        stop |= rows.just_imaged
    stop |= torch.tensor([len(h) > max_total_ids for h in rows.history], device=token.device)
    rows.pending_image = rows.pending_image | (active & ~stop & (token == special.im_start))
    feed = token
    if guided:  # the unconditional rows take their own choice, and <im_end> after an image too
        feed = torch.cat([token, torch.where(rows.just_imaged, special.im_end, picked[batch:])])
    rows.just_imaged = torch.zeros_like(rows.just_imaged)
    rows.done = rows.done | (active & stop)
    if bool(rows.done.all()):
        return False
    feed_active = active & ~rows.done
    feed_active = torch.cat([feed_active, feed_active]) if guided else feed_active
    embeds = model.model.language_model.embed_tokens(feed[:, None])  # (R, 1, Dt)
    if decoder is not None:
        decoder.step(embeds, feed_active)
    else:
        hidden = extend(model, state, embeds, feed_active, bidirectional=False)
        state.last_logits = model.lm_head(hidden[:, -1])
    return True
