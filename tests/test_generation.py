"""Generation behaviour: KV cache, batching, decoding strategies, interleaving, checkpoints."""

from __future__ import annotations

import pytest
import torch

from cheers.beam_search import beam_search
from cheers.generation import generate
from cheers.models.pretrained import from_pretrained, save_pretrained
from cheers.sampling import ImageSampling
from cheers.text_sampling import TextSampling, filter_logits, penalize_repetition

from model_helpers import TINY_SPECIAL, image_hungry_model, t2i_prompt, tiny_model

S = TINY_SPECIAL


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def understanding_prompt(words):
    ids = [
        S.chat_start,
        102,
        S.newline,
        S.im_start,
        S.image_marker,
        S.im_end,
        *words,
        S.chat_end,
        S.newline,
        S.chat_start,
        103,
        S.newline,
    ]
    return torch.tensor([ids])


def test_kv_cached_decoding_equals_uncached(model):
    ids, image = understanding_prompt([40, 41, 42]), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = generate(model, ids, None, image, max_new_tokens=6)
        tokens = out.sequences[0]
        assert len(tokens) == 6  # a row stops once it has generated max_new_tokens
        seq = ids
        for tok in tokens:
            logits = model(seq, None, image).logits[0, -1]
            assert int(logits.argmax()) == tok
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)


def test_padded_batch_gives_each_prompt_its_own_result(model):
    prompts = [t2i_prompt([11, 12, 13, 14, 15]), t2i_prompt([21])]
    dummy = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        image_sampling=ImageSampling(num_inference_steps=3, guidance_scale=2.5, shift=0.7),
        max_new_tokens=16 + 4,
    )
    alone = [
        generate(
            model, p, None, dummy[i : i + 1], generator=[torch.Generator().manual_seed(10 + i)], **kwargs
        )
        for i, p in enumerate(prompts)
    ]
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((2, width), S.pad)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : p.shape[1]], mask[i, : p.shape[1]] = p[0], 1
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batched = generate(model, ids, mask, dummy, generator=gens, **kwargs)
    for i in range(2):
        assert batched.sequences[i] == alone[i].sequences[0]
        assert torch.allclose(batched.images[i][0], alone[i].images[0][0], atol=1e-5)
    assert not torch.allclose(batched.images[0][0], batched.images[1][0])  # different prompts differ


def test_guidance_one_equals_no_guidance(model):
    p, dummy, noise = t2i_prompt([5, 6]), torch.rand(1, 3, 128, 128), torch.randn(1, 32, 8, 8)

    def run(scale):
        return generate(
            model,
            p,
            None,
            dummy,
            image_sampling=ImageSampling(2, guidance_scale=scale),
            latents=noise,
            stop_after_image=True,
        )

    a, b, c = run(1.0), run(None), run(4.0)
    assert torch.equal(run(0.0).images[0][0], b.images[0][0])  # 0, like 1 and None, turns guidance off
    assert torch.equal(a.images[0][0], b.images[0][0])
    assert not torch.allclose(a.images[0][0], c.images[0][0])


def test_exact_final_step_stops_at_t1(model):
    p, dummy, noise = t2i_prompt([5]), torch.rand(1, 3, 128, 128), torch.randn(1, 32, 8, 8)
    xs = []
    out = generate(
        model,
        p,
        None,
        dummy,
        image_sampling=ImageSampling(3, final_step="exact"),
        latents=noise,
        stop_after_image=True,
        callback=lambda n, t, x, v: xs.append(x),
    )
    assert torch.equal(out.latents[0][0], xs[-1][0])
    rel = generate(
        model, p, None, dummy, image_sampling=ImageSampling(3), latents=noise, stop_after_image=True
    )
    assert not torch.equal(rel.latents[0][0], out.latents[0][0])


def test_interleaved_images_and_text(model):
    biased = image_hungry_model(seed=3)
    n = 16
    out = generate(
        biased,
        t2i_prompt([5]),
        None,
        torch.rand(1, 3, 128, 128),
        image_sampling=ImageSampling(2),
        max_new_tokens=2 * n + 2,
        return_gates=True,
    )
    assert out.sequences[0] == [S.im_end, S.im_start, S.im_end, S.im_start]
    assert len(out.images[0]) == 2 and out.images[0][0].shape == (3, 128, 128)
    assert out.gates[0][0].shape == (2, 8, 8)


def test_beam_search(model):
    ids, image = understanding_prompt([40, 41]), torch.rand(1, 3, 128, 128)
    greedy = generate(model, ids, None, image, max_new_tokens=5).sequences[0]
    assert beam_search(model, ids, None, image, num_beams=1, max_new_tokens=5)[0] == greedy[:5]

    def logprob(seq):
        full = torch.cat([ids, torch.tensor([seq])], dim=1)
        logp = model(full, None, image).logits[0].log_softmax(-1)
        start = logp.shape[0] - len(seq) - 1
        return sum(float(logp[start + i, tok]) for i, tok in enumerate(seq))

    with torch.no_grad():
        best = beam_search(model, ids, None, image, num_beams=4, max_new_tokens=5, length_penalty=0.0)[0]
        assert logprob(best) >= logprob(greedy[: len(best)]) - 1e-4


def test_sampling_settings():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[True, False, False, True]]
    assert filter_logits(logits, top_p=0.5).isinf().tolist() == [[True, False, True, True]]
    pen = penalize_repetition(logits, [[1, 3]], 2.0)
    assert pen.tolist() == [[1.0, 1.5, 2.0, -2.0]]
    g = torch.Generator().manual_seed(0)
    from cheers.text_sampling import pick_tokens

    assert pick_tokens(logits, [[]], TextSampling(temperature=1.0, top_k=1), g).tolist() == [1]
    with pytest.raises(ValueError, match="temperature"):
        TextSampling(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        TextSampling(top_p=0.0)


def test_save_load_round_trip_is_exact(tmp_path, model):
    save_pretrained(model, tmp_path / "single")
    save_pretrained(model, tmp_path / "sharded", max_shard_size=2_000_000)
    assert (tmp_path / "sharded/model.safetensors.index.json").exists()
    for name in ("single", "sharded"):
        loaded = from_pretrained(tmp_path / name)
        assert loaded.special == model.special
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k
        assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    half = from_pretrained(tmp_path / "single", dtype="bfloat16")
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert half.model.vae_model.bn.num_batches_tracked.dtype == torch.long


def test_non_finite_velocity_names_the_step():
    from cheers.sampling import euler_sample, schedule

    def velocity(x, t, n):
        return x * float("nan") if n == 2 else x

    with pytest.raises(FloatingPointError, match="step 2"):
        euler_sample(velocity, torch.ones(1, 4, 2, 2), schedule(5))
