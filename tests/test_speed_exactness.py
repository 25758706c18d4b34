"""The optimised sampler (shared tokenizer, one batch for both guidance branches) equals the release-style
loop."""

from __future__ import annotations

import pytest
import torch

from cheers.generation import generate
from cheers.models.vae_fast import install_fast_vae
from cheers.reference_loop import release_style_sample
from cheers.sampling import ImageSampling

from model_helpers import t2i_prompt, tiny_model


@pytest.mark.slow
def test_batched_guidance_equals_release_style_loop():
    model = tiny_model(seed=7)
    fast = install_fast_vae(model)  # ours runs the pipeline's VAE path; the release-style loop sets it aside
    prompt, dummy = t2i_prompt([9, 10, 11]), torch.rand(1, 3, 64, 64)  # 64 px keeps it fast
    noise = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    for cfg in (None, 3.0):
        ref = release_style_sample(
            model, prompt, dummy, noise, num_inference_steps=4, guidance_scale=cfg, shift=0.5
        )
        ours = generate(
            model,
            prompt,
            None,
            dummy,
            image_sampling=ImageSampling(4, guidance_scale=cfg, shift=0.5),
            latents=noise,
            stop_after_image=True,
        ).images[0][0]
        assert (ours - ref[0]).abs().max() < 1e-4
    with torch.no_grad():
        assert (fast.nbytes > 0) == fast.applies(noise)  # ours decoded into the buffers (where oneDNN allows)
    assert "forward" in vars(model.model.vae_model.decoder)  # still installed after the release-style loop


def test_channels_last_option_keeps_the_outputs():
    from model_helpers import tiny_pipeline

    pipe = tiny_pipeline(seed=2)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt", height=64, width=64)
    ref = pipe.generate("red", generator=torch.Generator().manual_seed(0), **kw).images[0]
    fast = (
        pipe.optimize(channels_last=True)
        .generate("red", generator=torch.Generator().manual_seed(0), **kw)
        .images[0]
    )
    assert (fast - ref).abs().max() < 1e-4


def test_channels_last_keeps_the_latents_of_flat_images():
    """Flat images give constant channels, where the CPU's channels-last GroupNorm loses the variance to
    cancellation (a random tiny model's latent 29 % off): the encoder stays NCHW, the decoders agree."""
    model = tiny_model(seed=2).eval()
    images = torch.cat([torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)])
    vae = model.model.vae_model
    with torch.no_grad():
        z = vae.encode(images)
        noise = torch.randn_like(z)
        pixels = vae.decode(noise)
        tokens = model.model.vae_decoder_projector(z)
        model.to_channels_last()
        assert model.model.vae_decoder_projector.decoder.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last
        )
        torch.testing.assert_close(vae.encode(images), z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vae.decode(noise), pixels, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.model.vae_decoder_projector(z), tokens, rtol=1e-4, atol=1e-5)


def test_fast_vae_keeps_the_pipelines_outputs_and_frees_its_buffers():
    from model_helpers import tiny_pipeline

    pipe = tiny_pipeline(seed=2)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt", height=64, width=64)
    ref = pipe.generate("red", generator=torch.Generator().manual_seed(0), **kw).images[0]  # reference layers
    fast = pipe.enable_fast_vae().fast_vae
    assert pipe.enable_fast_vae().fast_vae is fast  # once
    out = pipe.generate("red", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert (out - ref).abs().max() < 1e-4 and fast.nbytes == 0  # freed after the call
    pipe.disable_fast_vae()
    assert pipe.fast_vae is None and "forward" not in vars(pipe.model.model.vae_model.decoder)
    assert torch.equal(pipe.generate("red", generator=torch.Generator().manual_seed(0), **kw).images[0], ref)
