"""The optimised sampler (shared tokenizer, one batch for both guidance branches) equals the release-style loop."""

from __future__ import annotations

import torch

from cheers.generation import generate
from cheers.reference_loop import release_style_sample

from model_helpers import t2i_prompt, tiny_model


def test_batched_guidance_equals_release_style_loop():
    model = tiny_model(seed=7)
    prompt, dummy = t2i_prompt([9, 10, 11]), torch.rand(1, 3, 64, 64)  # 64 px keeps it fast
    noise = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    for cfg in (None, 3.0):
        ref = release_style_sample(model, prompt, dummy, noise, num_inference_steps=4, cfg_scale=cfg, alpha=0.5)
        ours = generate(model, prompt, None, dummy, num_inference_steps=4, cfg_scale=cfg, alpha=0.5,
                        latents=noise, max_length=0).images[0][0]
        assert (ours - ref[0]).abs().max() < 1e-4


def test_channels_last_option_keeps_the_outputs():
    from model_helpers import tiny_pipeline

    pipe = tiny_pipeline(seed=2)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt", height=64, width=64)
    ref = pipe.generate("red", generator=torch.Generator().manual_seed(0), **kw).images[0]
    fast = pipe.optimize(channels_last=True).generate("red", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert (fast - ref).abs().max() < 1e-4
