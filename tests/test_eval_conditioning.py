"""The prompt-gain probe tells a generator that reads its prompt from one that ignores it."""

from __future__ import annotations

import json

import pytest

from cheers.eval.conditioning import (
    object_prompt_gain,
    prompt_gain,
    rung_records_by_background,
    shapes_generation_records,
)
from cheers.processor import CheersProcessor

from model_helpers import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
TIMES = (0.2, 0.7)


@pytest.fixture(scope="module")
def parts():
    processor = CheersProcessor(make_tiny_tokenizer(), image_size=128, patch_size=16)
    model = tiny_model(seed=3)
    model.special = processor.special
    return model, processor, shapes_generation_records(4)


@pytest.mark.slow
def test_a_model_that_reads_the_prompt_has_a_gain(parts):
    model, processor, records = parts
    result = prompt_gain(model, processor, records, TIMES, batch_size=3)  # two batches
    assert result.n == 4 and result.times == TIMES
    assert max(abs(g) for g in result.gain) > 2e-5, result
    assert result.unconditional != result.own
    assert set(result.as_dict()) >= {"own", "other", "unconditional", "gain", "relative_gain"}
    assert "relative prompt gain" in result.table()
    json.dumps(result.as_dict())


@pytest.mark.slow
def test_a_model_blind_to_its_prompt_has_none(parts, monkeypatch):
    import cheers.models.cheers as cheers_module
    from cheers.models.sequence import hybrid_mask

    def image_sees_only_images(image_flags, valid):  # image queries may not attend to any text key
        text_keys = image_flags[:, :, None] & ~image_flags[:, None, :]
        return hybrid_mask(image_flags, valid) & ~text_keys[:, None]

    model, processor, records = parts
    with monkeypatch.context() as m:
        m.setattr(cheers_module, "hybrid_mask", image_sees_only_images)
        result = prompt_gain(model, processor, records, TIMES)
    assert max(abs(g) for g in result.gain) < 1e-6, result.gain
    same = [records[0]] * 3  # one prompt everywhere: swapping changes nothing, exactly
    assert prompt_gain(model, processor, same, TIMES).gain == (0.0, 0.0)


def test_objects_only_gain_swaps_prompts_between_samples_of_one_background():
    groups = rung_records_by_background("L2", 3)
    assert set(groups) == {"gray", "white", "black"} and all(len(g) == 3 for g in groups.values())
    for bg, records in groups.items():
        prompts = [r["conversations"][0]["value"] for r, _ in records]
        assert all(p.startswith(f"A plain {bg} background.") for p in prompts) and len(set(prompts)) > 1
    short = rung_records_by_background("L2", 3, short=True)  # the same images, no background sentence
    for bg, records in short.items():
        assert [i[0].tobytes() for _, i in records] == [i[0].tobytes() for _, i in groups[bg]]
        assert not any("background" in r["conversations"][0]["value"] for r, _ in records)
    with pytest.raises(ValueError, match="rung L1 or L2"):
        rung_records_by_background("L0", 3)


@pytest.mark.slow
def test_objects_only_gain_is_zero_for_a_model_that_reads_only_the_background(parts, monkeypatch):
    import cheers.eval.conditioning as conditioning

    model, processor, _ = parts
    result = object_prompt_gain(model, processor, "L1", n=2, times=TIMES)
    assert result.n == 6 and max(abs(g) for g in result.gain) > 2e-5  # an untrained model reads every word

    def background_only(model, processor, records, *args, **kwargs):  # a group's prompts made its first
        return real(model, processor, [(records[0][0], images) for _, images in records], *args, **kwargs)

    real = conditioning.prompt_gain
    monkeypatch.setattr(conditioning, "prompt_gain", background_only)
    assert object_prompt_gain(model, processor, "L1", n=2, times=TIMES).gain == (0.0, 0.0)


def test_the_routing_probe_sees_the_prompt_in_the_image_states_and_nothing_when_images_cannot_read_it(
    parts, monkeypatch
):
    import cheers.models.cheers as cheers_module
    from cheers.eval.conditioning import routing_probe
    from cheers.models.sequence import hybrid_mask

    model, processor, records = parts
    reads = routing_probe(model, processor, records, 0.2, batch_size=3)  # two batches
    assert reads.n == 4 and reads.t == 0.2
    assert reads.image_states > 1e-4 and reads.stage1 > 0 and reads.velocity > 0, reads
    assert reads.token_norm > 0 and reads.text_norm > 0
    assert "LLM image states" in reads.table()
    json.dumps(reads.as_dict())

    def image_sees_only_images(image_flags, valid):
        text_keys = image_flags[:, :, None] & ~image_flags[:, None, :]
        return hybrid_mask(image_flags, valid) & ~text_keys[:, None]

    with monkeypatch.context() as m:
        m.setattr(cheers_module, "hybrid_mask", image_sees_only_images)
        blind = routing_probe(model, processor, records, 0.2)
    assert blind.image_states < 1e-5 and blind.velocity < 1e-5  # rounding only: no text reaches the images
    assert blind.token_norm == pytest.approx(reads.token_norm)
    with pytest.raises(ValueError, match="at least 2 records"):
        routing_probe(model, processor, records[:1])


def test_bad_inputs_are_named(parts):
    model, processor, records = parts
    with pytest.raises(ValueError, match="at least 2 records"):
        prompt_gain(model, processor, records[:1])
    with pytest.raises(ValueError, match="times must be"):
        prompt_gain(model, processor, records, (0.5, 1.0))
    from cheers.data.shapes import make_sample

    und = make_sample(5, "understanding")
    images = und.pop("images")
    with pytest.raises(ValueError, match="text-to-image"):
        prompt_gain(model, processor, [records[0], (und, images)])


def _velocity_as(model, monkeypatch, make):
    """Make ``model``'s predicted velocity ``make(z1, x0)`` (both (n, C, h, w)), whatever it computed."""
    from einops import rearrange

    forward = type(model).forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        x0 = kwargs["x0"].float()
        grid = x0.shape[-1]
        z1 = rearrange(out.target_velocity.float(), "n (h w) c -> n c h w", h=grid) + x0
        out.pred_velocity = make(z1, x0)
        return out

    monkeypatch.setattr(type(model), "forward", patched)


def test_the_noise_readout_is_one_for_the_exact_velocity_and_zero_for_a_noise_blind_one(parts, monkeypatch):
    from cheers.eval.conditioning import noise_readout

    model, processor, records = parts
    records = records[:2]
    with monkeypatch.context() as m:
        _velocity_as(model, m, lambda z1, x0: z1 - x0)
        exact = noise_readout(model, processor, records, TIMES)
    assert exact.noise == pytest.approx((1.0, 1.0)) and exact.clean == pytest.approx((1.0, 1.0))
    with monkeypatch.context() as m:
        _velocity_as(model, m, lambda z1, x0: 0.9 * z1)  # what a generator that cannot see z_t's noise gives
        blind = noise_readout(model, processor, records, TIMES)
    assert max(abs(v) for v in blind.noise) < 0.1 and blind.clean == pytest.approx((0.9, 0.9), abs=1e-4)
    assert blind.n == 2 and "noise read" in blind.table()
    json.dumps(blind.as_dict())
    with pytest.raises(ValueError, match="times"):
        noise_readout(model, processor, records, (1.0,))
