"""A plain re-statement of the release's text-to-image loop, kept as the baseline for speed and exactness.

It does what the release does, one sample at a time: the conditional and the unconditional prompt each have
their own KV cache, and at every step each branch decodes z_t, runs the ViT and the projector, extends its
cache by N tokens and runs the flow head, serially. :func:`cheers.generation.generate` computes the same
numbers with the tokenizer shared between branches and both branches in one batch; ``bench/`` measures the
ratio and ``tests/test_speed_exactness.py`` checks that the outputs agree.
"""

from __future__ import annotations

import torch

from cheers.generation import ImageSampler, prefill
from cheers.models.cheers import Cheers
from cheers.models.vae_fast import reference_layers
from cheers.sampling import apply_guidance, euler_sample, schedule
from cheers.tokens import unconditional_ids


@torch.no_grad()
def release_style_sample(
    model: Cheers,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    noise: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float | None,
    shift: float,
) -> torch.Tensor:
    """Text-to-image for one prompt (1, L) with its dummy image; returns the decoded image (1, 3, H, W).

    The VAE layers run as the release's do: any faster form installed on the model
    (:func:`cheers.models.vae_fast.install_fast_vae`) is set aside for the call
    (:func:`cheers.models.vae_fast.reference_layers`), so the decoders interpolate, then convolve, out of
    place."""
    if input_ids.shape[0] != 1:
        raise ValueError("the release-style loop handles one prompt at a time")
    with reference_layers(model):
        return _release_style_sample(
            model, input_ids, pixel_values, noise, num_inference_steps, guidance_scale, shift
        )


def _release_style_sample(
    model: Cheers,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    noise: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float | None,
    shift: float,
) -> torch.Tensor:
    special = model.require_special()
    ones = torch.ones_like(input_ids)
    active = torch.ones(1, dtype=torch.bool, device=input_ids.device)
    cond = ImageSampler(model, prefill(model, input_ids, ones, pixel_values), None, active)
    uncond = None
    if guidance_scale is not None and guidance_scale != 1:
        uncond_ids = unconditional_ids(input_ids, special)
        uncond = ImageSampler(model, prefill(model, uncond_ids, ones, pixel_values), None, active)

    def velocity(x: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
        v, _, _ = cond.velocity(x, t)
        if uncond is None:
            return v
        v_u, _, _ = uncond.velocity(x, t)  # the tokenizer runs again for this branch, as in the release
        return apply_guidance(v, v_u, guidance_scale)

    latent = euler_sample(velocity, noise, schedule(num_inference_steps, shift).to(noise.device))
    return model.model.vae_model.decode(latent)
