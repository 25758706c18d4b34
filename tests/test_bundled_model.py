"""The bundled ShapesWorld model is a trained model: it answers ShapesWorld questions far better than
chance."""

from __future__ import annotations

import pytest
import torch

from cheers.assets import BUNDLED_DIR, has_bundled_model
from cheers.eval.scorecard import agreement, load_scorecard
from cheers.eval.shapes_bench import ShapesBenchConfig, run_shapes_bench, shapes_vqa
from cheers.models.cheers import Cheers
from cheers.pipeline import CheersPipeline

MIN_PROMPT_GAIN = 0.05
"""The relative prompt gain the issue asks of the shipped model (the previous one measured +0.0002)."""

pytestmark = [
    pytest.mark.skipif(not has_bundled_model(), reason="the bundled model is not installed"),
    pytest.mark.usefixtures("one_cpu_thread"),
]


@pytest.mark.slow
def test_bundled_model_beats_an_untrained_one_on_shapes_vqa():
    trained = CheersPipeline.from_pretrained(BUNDLED_DIR, device="cpu", progress=False)
    torch.manual_seed(0)
    untrained = CheersPipeline(
        Cheers(trained.model.config, special=trained.model.special).eval(),
        trained.processor,
        trained.defaults,
        progress=False,
    )
    cfg = ShapesBenchConfig(n=3, tasks=("vqa",), max_new_tokens=8)
    res = trained.processor.image_size
    good = shapes_vqa(trained, cfg, res)["report"]["overall"]
    bad = shapes_vqa(untrained, cfg, res)["report"]["overall"]
    assert good >= bad + 0.3, (good, bad)


def test_bundled_model_is_the_default_and_draws_an_image():
    pipe = CheersPipeline.from_pretrained("default", device="cpu", progress=False)
    assert pipe.model.config.image_size == 128 and pipe.defaults.num_inference_steps == 20
    image = pipe.generate(
        "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (128, 128)


@pytest.mark.slow
def test_shapesbench_reproduces_the_shipped_scorecard(tmp_path):
    """The README's scorecard (assets/cheers-tiny-shapes/scorecard.json, per-item verdicts of the full run)
    is reproduced item by item by a quick rerun over its first items."""
    card = load_scorecard(BUNDLED_DIR)
    pipe = CheersPipeline.from_pretrained(BUNDLED_DIR, device="cpu", progress=False)
    settings = {
        k: card["config"][k]
        for k in ("num_images", "steps", "guidance", "shift", "split", "seed", "dense")
        if k in card["config"]
    }
    cfg = ShapesBenchConfig(n=3, tasks=tuple(card["config"]["tasks"]), prompt_gain_n=0, **settings)
    report = run_shapes_bench(pipe, tmp_path, cfg, model_name="bundled", progress=False)
    agree, compared = agreement(card, report)
    assert compared >= 30 and agree >= 0.9, (agree, compared)


@pytest.mark.slow
def test_vae_ceiling_of_a_directory_matches_the_models_own_vae(tmp_path):
    from cheers.data.shapes import render_scene
    from cheers.eval.shapes_bench import geneval_items, load_vae_model, vae_ceiling, vae_ceiling_of

    pipe = CheersPipeline.from_pretrained(BUNDLED_DIR, device="cpu", progress=False)
    items = geneval_items(2)
    res = pipe.processor.image_size
    direct = vae_ceiling(pipe.model.model.vae_model, items, [render_scene(s, res) for _, s in items])
    assert vae_ceiling_of(BUNDLED_DIR, n=2) == direct and 0 <= direct["overall"] <= 1
    (tmp_path / "config.json").write_text('{"vae_encoder_config": {"ch": 7}}')
    with pytest.raises(ValueError, match="vae_decoder_config"):
        load_vae_model(tmp_path)


@pytest.mark.xfail(
    strict=True,
    reason="issue #18: the shipped generator does not read its prompt yet (gain +0.0002); "
    "a retrained model that does makes this pass and the marker must go",
)
@pytest.mark.slow
def test_bundled_generator_reads_its_prompt():
    """Issue #18: the shipped generator's flow loss is lower with each image's own prompt than with another
    image's (held-out validation prompts) at a noisy and a middle flow time: it does not ignore the text."""
    from cheers.eval.conditioning import prompt_gain, shapes_generation_records

    pipe = CheersPipeline.from_pretrained(BUNDLED_DIR, device="cpu", progress=False)
    gain = prompt_gain(pipe.model, pipe.processor, shapes_generation_records(16, "val"), times=(0.1, 0.5))
    assert gain.relative_gain >= MIN_PROMPT_GAIN, gain.table()
    assert all(g > 0 for g in gain.gain), gain.table()
