"""Plots: score-vs-step curves from metrics.jsonl and the HFI gate intensity figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.eval.plots import (
    ema,
    hfi_intensity,
    plot_curves,
    plot_hfi,
    plot_scorecards,
    read_metrics,
    score_keys,
    scorecard_figures,
    series,
)
from cheers.pipeline import CheersPipeline
from cheers.processor import CheersProcessor

from model_helpers import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def write_run(directory, scores, partial_tail=True):
    directory.mkdir(parents=True)
    lines = []
    for step in range(1, 41):
        lines.append(json.dumps({"step": step, "loss": 3.0 / step, "lr": 1e-4}))
        if step in scores:
            lines.append(
                json.dumps(
                    {"step": step, "shapes_geneval": scores[step], "shapes_accuracy": scores[step] / 2}
                )
            )
    text = "\n".join(lines) + "\n" + ('{"step": 41, "loss"' if partial_tail else "")  # a run being written
    (directory / "metrics.jsonl").write_text(text)
    return directory


def test_curves_from_metrics_jsonl(tmp_path):
    a = write_run(tmp_path / "with_hfi", {10: 0.2, 20: 0.5, 30: 0.7, 40: 0.8})
    b = write_run(tmp_path / "without_hfi", {10: 0.1, 20: 0.3, 30: 0.4, 40: 0.45})
    records = read_metrics(a)
    assert len(records) == 44 and score_keys(records) == ["shapes_geneval", "shapes_accuracy"]
    steps, values = series(records, "shapes_geneval")
    assert steps.tolist() == [10, 20, 30, 40] and values.tolist() == [0.2, 0.5, 0.7, 0.8]
    out = plot_curves([a, b / "metrics.jsonl"], tmp_path / "fig" / "curves.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400
    plot_curves([a], tmp_path / "loss.png", keys=["loss"], smooth=0.6)
    with pytest.raises(ValueError, match="none of the keys"):
        plot_curves([a], tmp_path / "x.png", keys=["mmbench"])
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nothing")


def card(geneval, vqa, edit=None):
    c = {"geneval": {"summary": {"overall": geneval}}, "vqa": {"overall": vqa, "ocr_accuracy": 0.0}}
    if edit is not None:
        c["edit"] = {"correct": edit}
    return c


def test_scorecard_curve_reads_the_headline_figures(tmp_path):
    assert scorecard_figures(card(0.1, 0.5, 0.2)) == {
        "ShapesGenEval": 0.1,
        "ShapesVQA": 0.5,
        "OCR": 0.0,
        "ShapesEdit": 0.2,
    }
    assert scorecard_figures({"vqa": {"overall": 0.4}}) == {"ShapesVQA": 0.4}  # tasks not run are left out
    out = plot_scorecards(
        [(381_280, card(0.13, 0.48)), (315_136, card(0.075, 0.46, 0.0))], tmp_path / "c.png"
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400
    with pytest.raises(ValueError, match="no ShapesBench figure|none of the scorecards"):
        plot_scorecards([(1, {"model": "x"})], tmp_path / "d.png")
    with pytest.raises(ValueError, match="no scorecards"):
        plot_scorecards([], tmp_path / "e.png")


def test_plot_scorecards_cli(tmp_path, capsys):
    from cheers.cli import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(card(0.07, 0.46)))
    b.write_text(json.dumps(card(0.13, 0.48)))
    out = tmp_path / "curve.png"
    assert (
        main(["plot", "scorecards", "--point", f"315_136={a}", "--point", f"381280={b}", "--out", str(out)])
        == 0
    )
    assert out.is_file() and str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit, match="SAMPLES=SCORECARD"):
        main(["plot", "scorecards", "--point", str(a), "--out", str(out)])
    with pytest.raises(SystemExit, match="no scorecard at"):
        main(["plot", "scorecards", "--point", f"5={tmp_path / 'missing.json'}", "--out", str(out)])


def test_ema_is_debiased_and_checked():
    assert np.allclose(ema(np.array([2.0, 2.0, 2.0]), 0.9), 2.0)
    assert np.array_equal(ema(np.array([1.0, 5.0]), 0.0), [1.0, 5.0])
    with pytest.raises(ValueError):
        ema(np.ones(3), 1.0)


def test_hfi_plot_from_pipeline_maps(tmp_path):
    processor = CheersProcessor(make_tiny_tokenizer(), image_size=128, patch_size=16)
    model = tiny_model(seed=5)
    model.special = processor.special
    pipe = CheersPipeline(model, processor, progress=False)
    out = pipe.generate(
        ["a red circle", "two blue squares"],
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        return_hfi_maps=True,
        output_type="latent",
    )
    intensity = hfi_intensity(out.hfi_maps)
    assert intensity.shape == (2, 2)
    assert np.allclose(intensity[1, 1], out.hfi_maps[1][1].mean().item())
    path = plot_hfi(out.hfi_maps, tmp_path / "hfi.png", title="tiny")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.height > 300
    with pytest.raises(ValueError, match="no HFI maps"):
        hfi_intensity([])
    with pytest.raises(ValueError, match="one S"):
        hfi_intensity([torch.zeros(3, 4, 4), torch.zeros(2, 4, 4)])


@pytest.mark.slow
def test_settings_grid_draws_one_picture_per_setting(tmp_path):
    from PIL import Image

    from cheers.eval.settings_grid import settings_grid

    from model_helpers import tiny_pipeline

    out = settings_grid(
        tiny_pipeline(),
        "two red circles",
        tmp_path / "grid.png",
        steps=(1, 2),
        guidance=(1.0, 2.0),
        shift=(1.0,),
    )
    assert Image.open(out).size[0] > 300
