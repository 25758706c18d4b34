"""The opt-in static (pre-allocated) KV cache gives what the default dynamic cache gives."""

from __future__ import annotations

import pytest
import torch

from cheers.generation import StaticDecoder, extend, generate, prefill, to_static
from cheers.sampling import ImageSampling

from model_helpers import TINY_SPECIAL, image_hungry_model, t2i_prompt, tiny_model

S = TINY_SPECIAL


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=6)


def padded_understanding_prompts():
    rows = [
        [S.chat_start, S.im_start, S.image_marker, S.im_end, *words, S.chat_end, S.newline, S.chat_start]
        for words in ([40, 41, 42, 43, 44], [50])
    ]
    width = max(map(len, rows))
    ids, mask = torch.full((2, width), S.pad), torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_static_decode_steps_match_the_dynamic_ones(model):
    ids, mask, images = padded_understanding_prompts()
    with torch.no_grad():
        dynamic = prefill(model, ids, mask, images)
        static = to_static(model, prefill(model, ids, mask, images), dynamic.length + 8)
        active = torch.ones(2, dtype=torch.bool)
        token = dynamic.last_logits.argmax(-1)
        for _ in range(6):
            embeds = model.model.language_model.embed_tokens(token[:, None])
            a = extend(model, dynamic, embeds, active, bidirectional=False)
            b = extend(model, static, embeds, active, bidirectional=False)
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
            token = model.lm_head(a[:, -1]).argmax(-1)
        assert static.length == dynamic.length and torch.equal(
            static.key_valid[:, : static.length], dynamic.key_valid
        )
        with pytest.raises(RuntimeError, match="static KV cache is full"):
            extend(
                model,
                static,
                model.model.language_model.embed_tokens(token[:, None]).expand(-1, 3, -1),
                active,
                bidirectional=False,
            )


def test_static_decoder_buffers_give_extend_with_one_token(model):
    """The fixed-buffer step (what a CUDA graph replays) against extend, with a row inactive and a crop
    between."""
    ids, mask, images = padded_understanding_prompts()
    with torch.no_grad():
        plain = to_static(model, prefill(model, ids, mask, images), 40)
        fixed = to_static(model, prefill(model, ids, mask, images), 40)
        decoder = StaticDecoder(model, fixed)
        token = plain.last_logits.argmax(-1)
        for step in range(6):
            if step == 3:  # crops reset the write position in place; the decoder must follow
                for st in (plain, fixed):
                    st.crop(st.length - 2, st.next_pos - 1)
            active = torch.tensor([True, step % 2 == 0])
            embeds = model.model.language_model.embed_tokens(token[:, None])
            want = model.lm_head(extend(model, plain, embeds, active, bidirectional=False)[:, -1])
            got = decoder.step(embeds, active)
            assert got is fixed.last_logits and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
            assert fixed.used == plain.used and torch.equal(fixed.key_valid, plain.key_valid)
            assert torch.equal(fixed.next_pos, plain.next_pos)
            assert all(int(layer.cumulative_length) == fixed.used for layer in fixed.cache.layers)
            token = want.argmax(-1)
        fixed.used = 40
        with pytest.raises(RuntimeError, match="static KV cache is full"):
            decoder.step(embeds, active)
    with pytest.raises(ValueError, match="static cache"):
        StaticDecoder(model, prefill(model, ids, mask, images))


def test_cuda_graph_decoding_is_refused_off_cuda(model):
    ids, mask, images = padded_understanding_prompts()
    with pytest.raises(ValueError, match="CUDA device"):
        generate(model, ids, mask, images, max_new_tokens=5, latent_grid=(4, 4), cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_gives_the_same_answers(model):
    ids, mask, images = padded_understanding_prompts()
    gpu = model.cuda()
    try:
        kw = dict(max_new_tokens=13, latent_grid=(4, 4))
        assert (
            generate(gpu, ids.cuda(), mask.cuda(), images.cuda(), cuda_graph=True, **kw).sequences
            == generate(gpu, ids.cuda(), mask.cuda(), images.cuda(), **kw).sequences
        )
    finally:
        model.cpu()


def test_generate_with_a_static_cache_gives_the_same_answers(model):
    ids, mask, images = padded_understanding_prompts()
    kw = dict(max_new_tokens=13, latent_grid=(4, 4))
    assert (
        generate(model, ids, mask, images, static_cache=True, **kw).sequences
        == generate(model, ids, mask, images, **kw).sequences
    )


def test_static_cache_through_images_guidance_and_intervals():
    """Interleaved images (crops of the static cache) with guidance, partly over an interval."""
    biased = image_hungry_model(seed=6)
    noise = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    dummy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for interval in (None, (0.0, 0.6)):  # (0, 0.6): the last evaluation of each image is conditional only
        kw = dict(
            image_sampling=ImageSampling(2, guidance_scale=2.0, guidance_interval=interval),
            max_new_tokens=2 * 4 + 2,
            latents=noise,
            generator=torch.Generator().manual_seed(1),
        )
        dyn = generate(biased, t2i_prompt([5]), None, dummy, **kw)
        kw["generator"] = torch.Generator().manual_seed(1)
        sta = generate(biased, t2i_prompt([5]), None, dummy, static_cache=True, **kw)
        assert sta.sequences == dyn.sequences == [[S.im_end, S.im_start, S.im_end, S.im_start]]
        for a, b in zip(sta.latents[0], dyn.latents[0]):
            assert torch.allclose(a, b, atol=1e-4)


def test_pipeline_chat_with_a_static_cache():
    from model_helpers import tiny_pipeline

    pipe = tiny_pipeline(seed=5)
    image = torch.rand(3, 64, 64)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert (
        pipe.chat(msgs, images=[image], max_new_tokens=5, static_cache=True).token_ids
        == pipe.chat(msgs, images=[image], max_new_tokens=5).token_ids
    )
