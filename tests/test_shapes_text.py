"""Prompts, questions and edits agree with the scenes they come with (checked through the judge)."""

from collections import Counter

import numpy as np
import pytest

from cheers.data.shapes import (
    EDIT_KINDS,
    PROMPT_TAGS,
    apply_edit,
    parse_image,
    render_scene,
    sample_edit,
    sample_generation,
    sample_scene,
    scene_questions,
    score_edit,
    score_spec,
    text_only_sample,
)
from cheers.data.shapes.palette import CELL_NAMES


@pytest.mark.parametrize("tag", PROMPT_TAGS)
def test_generated_scenes_satisfy_their_specs(tag):
    rng = np.random.default_rng(123)
    for _ in range(25):
        spec, scene = sample_generation(rng, tag)
        assert spec["tag"] == tag and isinstance(spec["prompt"], str) and spec["include"]
        result = score_spec(parse_image(render_scene(scene, 128)), spec)
        assert result.correct, (spec, result.reasons)


def test_geneval_spec_format():
    rng = np.random.default_rng(0)
    spec, _ = sample_generation(rng, "counting")
    (inc,) = spec["include"]
    assert spec["exclude"] == [{"class": inc["class"], "count": inc["count"] + 1}]
    spec, _ = sample_generation(rng, "position")
    assert spec["include"][1]["position"][1] == 0
    assert spec["prompt"].split(" ")[1] == spec["include"][1]["class"]
    with pytest.raises(ValueError, match="bogus"):
        sample_generation(rng, "bogus")


def test_question_answers_match_the_scene():
    rng = np.random.default_rng(1)
    seen = Counter()
    for seed in range(150):
        scene = sample_scene(seed)
        for q in scene_questions(scene, rng):
            seen[q["type"]] += 1
            if q["type"] == "count":
                shape = q["question"].split()[2]
                assert int(q["answer"]) == sum(
                    o.shape + ("es" if o.shape.endswith("s") else "s") == shape for o in scene.objects
                )
            elif q["type"] == "background":
                assert q["answer"] == scene.background.color
            elif q["type"] == "where":
                assert q["answer"] in {CELL_NAMES[o.cell] for o in scene.objects}
            elif q["type"] == "ocr":
                assert q["answer"] == scene.text.text
            elif q["type"] == "multiple_choice":
                assert q["choices"]["ABCD".index(q["answer"])] in {o.color for o in scene.objects}
    assert set(seen) == {
        "color",
        "background",
        "count",
        "exists",
        "where",
        "relation",
        "ocr",
        "multiple_choice",
    }


def test_yes_no_questions_are_balanced():
    rng = np.random.default_rng(2)
    answers = Counter()
    for seed in range(300):
        for q in scene_questions(sample_scene(seed), rng):
            if q["type"] in ("exists", "relation"):
                answers[q["type"], q["answer"]] += 1
    assert answers["exists", "yes"] == answers["exists", "no"]
    assert 0.4 < answers["relation", "yes"] / (answers["relation", "yes"] + answers["relation", "no"]) < 0.6


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edits_change_only_what_they_say(kind):
    rng = np.random.default_rng(5)
    for _ in range(8):
        edit = sample_edit(rng, kind=kind)
        src, tgt = edit.source, edit.target
        assert edit.kind == kind and edit.instruction.endswith(".")
        assert src.text == tgt.text
        if kind == "background":
            assert src.objects == tgt.objects and src.background.color != tgt.background.color
            assert src.background.texture == tgt.background.texture
        else:
            assert src.background == tgt.background
            changed = set(src.objects) ^ set(tgt.objects)
            assert len(changed) == {"recolor": 2, "remove": 1, "add": 1, "move": 2}[kind]
        spec = edit.spec()
        assert score_edit(parse_image(render_scene(tgt, 128)), spec).correct
        on_source = score_edit(parse_image(render_scene(src, 128)), spec)
        assert not on_source.correct and not on_source.target_ok


def test_edit_returns_none_when_impossible():
    scene = sample_scene(0)  # a single object: nothing may be removed
    assert len(scene.objects) == 1
    assert apply_edit(scene, "remove", np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="warp"):
        apply_edit(scene, "warp", np.random.default_rng(0))


def test_text_only_samples():
    rng = np.random.default_rng(3)
    pairs = [text_only_sample(rng) for _ in range(100)]
    assert all(q.endswith("?") and a for q, a in pairs)
    for q, a in pairs:
        if q.startswith("What is") and "plus" in q:
            x, y = q.removeprefix("What is ").removesuffix("?").split(" plus ")
            assert int(a) == int(x) + int(y)
