"""Scorers: GenEval rules on parsed objects, ShapesVQA metrics, ShapesEdit, the fidelity figure."""

import numpy as np
import pytest

from cheers.data.shapes import (
    Background,
    Scene,
    ShapeObject,
    hf_fidelity,
    high_frequency_fraction,
    normalize_answer,
    parse_image,
    relative_position,
    render_array,
    render_scene,
    sample_scene,
    score_spec,
    score_vqa,
    summarize_geneval,
)
from cheers.data.shapes.perturb import gaussian_blur


def _scene(*objs):
    return Scene(
        tuple(
            ShapeObject(s, c, "large", cell, ((cell[0] + 0.5) / 3, (cell[1] + 0.5) / 3))
            for s, c, cell in objs
        ),
        Background("gray"),
    )


def test_relative_position_follows_geneval():
    left, right = (0.0, 0.0, 0.2, 0.2), (0.5, 0.0, 0.7, 0.2)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((0.0, 0.5, 0.2, 0.7), left) == {"below"}
    assert relative_position(left, (0.05, 0.0, 0.25, 0.2)) == set()  # overlapping centres: no relation


def test_score_spec_rules():
    parsed = parse_image(
        render_scene(
            _scene(("circle", "red", (0, 1)), ("circle", "blue", (2, 1)), ("square", "green", (1, 0))), 128
        )
    )
    ok = {"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    assert score_spec(parsed, ok).correct
    assert not score_spec(
        parsed, {"include": [{"class": "circle", "count": 1}], "exclude": [{"class": "circle", "count": 2}]}
    ).correct
    assert score_spec(parsed, {"include": [{"class": "circle", "count": 1, "color": "blue"}]}).correct
    assert not score_spec(parsed, {"include": [{"class": "square", "count": 1, "color": "blue"}]}).correct
    pos = {
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "color": "red", "position": ["below", 0]},
        ]
    }
    assert score_spec(parsed, pos).correct
    pos["include"][1]["position"] = ["above", 0]
    res = score_spec(parsed, pos)
    assert not res.correct and "above" in res.reasons[0]
    # Every matched circle must hold the relation: the blue one is right of, the red one left of the square.
    both = {
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ]
    }
    assert not score_spec(parsed, both).correct
    assert not score_spec(parsed, {"include": [{"class": "star", "count": 1}]}).correct
    assert not score_spec(parsed, {"include": [{"class": "circle", "count": 1}], "exact_count": 2}).correct
    assert score_spec(
        parsed,
        {"include": [{"class": "circle", "count": 1, "cell": [2, 1]}], "background": {"color": "gray"}},
    ).correct
    with pytest.raises(ValueError, match="include"):
        score_spec(parsed, {"prompt": "x"})


def test_summarize_geneval_averages_tags():
    s = summarize_geneval([("a", True), ("a", False), ("b", True)])
    assert s == {"a": 0.5, "b": 1.0, "overall": 0.75}


def test_vqa_normalisation_and_metrics():
    assert normalize_answer("The Red.") == "red"
    assert normalize_answer("Three") == "3"
    items = [
        {"type": "color", "answer": "red", "prediction": "Red."},
        {"type": "count", "answer": "2", "prediction": "two"},
        {"type": "ocr", "answer": "CAT", "prediction": "cat"},
        {"type": "ocr", "answer": "DOG", "prediction": "D0G"},
        {"type": "multiple_choice", "answer": "B", "prediction": "B. orange"},
        {"type": "exists", "answer": "yes", "prediction": "Yes, there is."},
        {"type": "exists", "answer": "yes", "prediction": "no"},
        {"type": "exists", "answer": "no", "prediction": "no"},
        {"type": "relation", "answer": "no", "prediction": "yes"},
        {"type": "relation", "answer": "no", "prediction": "maybe"},
    ]
    r = score_vqa(items)
    assert r.accuracy["color"] == r.accuracy["count"] == r.accuracy["multiple_choice"] == 1.0
    assert r.ocr_accuracy == 0.5 and r.n == 10
    # yes/no: tp=1, fn=1, fp=1, tn=2 (the unparseable "maybe" counts as "no" and as wrong for accuracy).
    assert r.yes_no_accuracy == pytest.approx(2 / 5)
    assert r.yes_no_precision == pytest.approx(0.5) and r.yes_no_recall == pytest.approx(0.5)
    assert r.yes_no_f1 == pytest.approx(0.5) and r.yes_ratio == pytest.approx(2 / 5)


def test_high_frequency_fidelity():
    flat = render_array(Scene((), Background("gray", "flat")), 128)
    stripes = render_array(Scene((), Background("gray", "stripes", period=4)), 128)
    assert high_frequency_fraction(flat) == 0.0
    assert high_frequency_fraction(stripes) > 0.5
    refs = [render_array(sample_scene(s), 128) for s in range(12)]
    assert hf_fidelity(refs, refs) == pytest.approx(1.0)
    blurred = [gaussian_blur(a, 1.5) for a in refs]
    assert hf_fidelity(blurred, refs) < 0.5
    noisy = [
        np.clip(a + np.random.default_rng(0).normal(0, 20, a.shape), 0, 255).astype(np.uint8) for a in refs
    ]
    assert hf_fidelity(noisy, refs) > 1.0
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_fraction(flat, cutoff=0.0)
