"""ShapesBench: a perfect stand-in model scores full marks (the wiring is right); the tiny model runs end to
end."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cheers.data.shapes import make_sample, render_scene
from cheers.eval.runner import format_prompt
from cheers.eval.shapes_bench import (
    PROMPT_TEMPLATE,
    TASKS,
    ShapesBenchConfig,
    edit_items,
    geneval_items,
    mark,
    run_shapes_bench,
    vqa_items,
)
from cheers.pipeline import ChatOutput, CheersPipeline, ImagePipelineOutput
from cheers.processor import CheersProcessor

from model_helpers import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

RES = 128


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def pipe():
    processor = CheersProcessor(make_tiny_tokenizer(), image_size=RES, patch_size=16)
    model = tiny_model(seed=5)
    model.special = processor.special
    return CheersPipeline(model, processor, progress=False)


class Oracle:
    """A perfect model: draws each prompt's reference scene, applies each edit exactly, answers every
    question.

    It looks the right output up by the exact input it receives, so a mix-up in the benchmark's wiring
    (prompt template, which image goes with which question, which edit with which source) fails the test.
    """

    def __init__(self, pipe, n, dense):
        self.model, self.processor, self.defaults, self.device = (
            pipe.model,
            pipe.processor,
            pipe.defaults,
            pipe.device,
        )
        self.scenes = {
            format_prompt(PROMPT_TEMPLATE, spec["prompt"]): scene for spec, scene in geneval_items(n, dense)
        }
        self.answers = {
            (render_scene(scene, RES).tobytes(), q["question"]): q["answer"]
            for _, scene, qs in vqa_items(n)
            for q in qs
        }
        self.edits = {
            (render_scene(e.source, RES).tobytes(), e.instruction): e.target for _, e in edit_items(n)
        }

    def generate(self, prompt, num_images_per_prompt=1, **kwargs):
        image = render_scene(self.scenes[prompt], RES)
        return ImagePipelineOutput([image] * num_images_per_prompt, [prompt] * num_images_per_prompt, {})

    def edit(self, image, instruction, **kwargs):
        return ImagePipelineOutput(
            [render_scene(self.edits[(image.tobytes(), instruction)], RES)], [instruction], {}
        )

    def chat(self, conversations, images, **kwargs):
        texts = [
            self.answers[(im.tobytes(), conv[0]["content"][1]["text"])]
            for conv, im in zip(conversations, images)
        ]
        return ChatOutput(texts)


@pytest.mark.slow
def test_a_perfect_model_scores_full_marks(pipe, tmp_path):
    n = 3
    report = run_shapes_bench(
        Oracle(pipe, n, dense=True),
        tmp_path,
        ShapesBenchConfig(n=n, num_images=2, dense=True, prompt_gain_n=0),
        model_name="oracle",
        progress=False,
    )
    geneval = report["geneval"]
    assert geneval["n_prompts"] == 7 * n and geneval["n_images"] == 14 * n  # six GenEval tags + dense
    assert all(v == 1.0 for v in geneval["summary"].values()), geneval["summary"]
    assert geneval["hf_fidelity"] == pytest.approx(1.0)
    # the same perfect images judged against other prompts of their tags score far lower
    assert geneval["other_prompt"]["overall"] <= 0.5, geneval["other_prompt"]
    dense = geneval["dense_background"]  # every dense prompt's background drawn: n dense prompts x 2 images
    assert dense["accuracy"] == 1.0 and dense["n"] == 2 * n and dense["se"] == 0.0, dense
    assert geneval["prompt_gain"] is None and geneval["overall_se"] == 0.0
    assert "Background colour on the" in (tmp_path / "report.md").read_text()
    assert "against another prompt" in (tmp_path / "report.md").read_text()
    vqa = report["vqa"]["report"]
    assert vqa["overall"] == vqa["yes_no_f1"] == vqa["ocr_accuracy"] == 1.0
    assert {"exists", "where", "count", "background", "ocr"} <= set(vqa["accuracy"])
    assert report["edit"]["summary"]["correct"] == 1.0


@pytest.mark.slow
def test_the_tiny_model_runs_end_to_end(pipe, tmp_path):
    cfg = ShapesBenchConfig(
        n=1,
        num_images=1,
        steps=1,
        guidance=1.0,
        edit_steps=2,
        edit_guidance=1.0,
        max_new_tokens=4,
        seed=0,
        prompt_gain_n=2,
    )
    report = run_shapes_bench(pipe, tmp_path, cfg, model_name="tiny", progress=False)
    saved = json.loads((tmp_path / "shapes_bench.json").read_text())
    assert set(TASKS) <= set(saved) and saved["model"] == "tiny" and saved == json.loads(json.dumps(report))
    assert 0.0 <= saved["geneval"]["summary"]["overall"] <= 1.0
    assert saved["geneval"]["other_prompt"] is None  # one prompt per tag: no other prompt to judge against
    assert saved["geneval"]["dense_background"] is None  # no dense prompts asked for
    assert saved["geneval"]["prompt_gain"]["n"] == 2 and "relative_gain" in saved["geneval"]["prompt_gain"]
    assert {"yes_no_f1", "ocr_accuracy", "overall"} <= set(saved["vqa"]["report"])
    assert all({"prediction", "correct", "type"} <= set(it) for it in saved["vqa"]["items"])
    for sample in saved["geneval"]["samples"] + saved["edit"]["items"]:
        assert (tmp_path / sample["path"]).is_file()
    md = (tmp_path / "report.md").read_text()
    for heading in (
        "## ShapesGenEval",
        "## ShapesVQA",
        "POPE-style yes/no",
        "## ShapesEdit",
        "geneval_sheet.png",
    ):
        assert heading in md
    with Image.open(tmp_path / "geneval_sheet.png") as sheet:  # 6 tags x 1 image, 4 columns, 4 px gaps
        assert sheet.size == (4 * RES + 5 * 4, 2 * RES + 3 * 4)
    with Image.open(tmp_path / "edit_sheet.png") as sheet:  # source | edited | target
        assert sheet.size == (3 * RES + 4 * 4, RES + 2 * 4)
    # a rerun resumes the generated GenEval folder and rewrites the same report
    again = run_shapes_bench(
        pipe,
        tmp_path,
        ShapesBenchConfig(**{**cfg.__dict__, "tasks": ("geneval",)}),
        model_name="tiny",
        progress=False,
    )
    assert again["geneval"]["summary"] == report["geneval"]["summary"]


def test_marks_and_config_checks():
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    assert mark(im, True).getpixel((0, 0)) != mark(im, False).getpixel((0, 0))
    assert mark(im, True, "x").getpixel((32, 32)) == (128, 128, 128)  # the image itself is kept
    with pytest.raises(ValueError, match="tasks"):
        ShapesBenchConfig(tasks=("geneval", "draw"))
    with pytest.raises(ValueError, match="n must"):
        ShapesBenchConfig(n=0)
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesBenchConfig(split="train")
    with pytest.raises(ValueError, match="prompt_gain_n"):
        ShapesBenchConfig(prompt_gain_n=1)


def test_validation_split_draws_other_scenes_than_test():
    """Settings are chosen on --split val without seeing the test items the scorecard reports."""
    test_seeds = {seed for seed, _, _ in vqa_items(5)} | {seed for seed, _ in edit_items(5)}
    val_seeds = {seed for seed, _, _ in vqa_items(5, "val")} | {seed for seed, _ in edit_items(5, "val")}
    assert len(val_seeds) == 5 and not test_seeds & val_seeds
    test_prompts = [spec for spec, _ in geneval_items(3)]
    assert test_prompts != [spec for spec, _ in geneval_items(3, split="val")]
    assert test_prompts == [spec for spec, _ in geneval_items(3, split="test")]


def test_prompts_are_in_the_training_format():
    for seed in range(20):
        sample = make_sample(seed, "generation", render=False)
        assert format_prompt(PROMPT_TEMPLATE, sample["spec"]["prompt"]) == sample["conversations"][0]["value"]
