"""``cheers train`` through a tiny argparse harness: overrides, errors, and the ShapesWorld chain
(stage 0 -> model)."""

from __future__ import annotations

import argparse

import pytest

from cheers.models.pretrained import from_pretrained
from cheers.processor import CheersProcessor
from cheers.training.cli import add_train_parser
from cheers.training.monitor import read_metrics
from test_training_fixtures import SIZE, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def cheers(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cheers")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_print_recipe_applies_overrides(capsys):
    assert (
        cheers(
            "train",
            "--recipe",
            "stage1",
            "--set",
            "train.lr=2e-5",
            "--set",
            "train.steps=9",
            "--print-recipe",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "lr: 2.0e-05" in out and "steps: 9" in out and "stage: I" in out


def test_recipe_errors_exit_with_a_message(capsys):
    assert cheers("train", "--recipe", "stage1", "--set", "train.lrr=1") == 2
    assert "train.lrr" in capsys.readouterr().err
    assert cheers("train", "--recipe", "nope") == 2
    assert "stage1" in capsys.readouterr().err  # lists the packaged recipes
    with pytest.raises(SystemExit):
        cheers("train")  # --recipe is required


@pytest.mark.slow
def test_shapesworld_chain_stage0_then_model_with_resume(tmp_path, capsys):
    tiny = [
        "--set",
        f"model.overrides={{vision.image_size: {SIZE}}}",
        "--set",
        "data.num_workers=0",
        "--set",
        "log.progress=false",
        "--set",
        "log.tensorboard=false",
        "--set",
        "engine.device=cpu",
        "--set",
        "log.every=1",
    ]
    assert (
        cheers(
            "train",
            "--recipe",
            "stage0_vae",
            "--out",
            str(tmp_path / "vae-run"),
            *tiny,
            "--set",
            "train.steps=2",
            "--set",
            "train.micro_batch=2",
            "--set",
            "train.global_batch=2",
            "--set",
            "vae.fit_samples=4",
            "--set",
            "checkpoint.every=0",
        )
        == 0
    )
    vae = tmp_path / "vae-run" / "vae"
    assert (vae / "model.safetensors").is_file()
    model_args = [
        "train",
        "--recipe",
        "tiny-shapes",
        "--out",
        str(tmp_path / "run"),
        *tiny,
        "--set",
        f"init.vae={vae}",
        "--set",
        "train.steps=2",
        "--set",
        "train.micro_batch=2",
        "--set",
        "train.global_batch=4",
        "--set",
        "log.sample_every=0",
        "--set",
        "log.score_every=0",
    ]
    assert cheers(*model_args, "--stop-after", "1") == 0
    assert "trained to step 1" in capsys.readouterr().out
    assert cheers(*model_args, "--resume") == 0
    assert "release-layout model" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    export = tmp_path / "run" / "export"
    model = from_pretrained(export)
    processor = CheersProcessor.from_pretrained(export)
    assert model.special == processor.special and processor.image_size == SIZE
