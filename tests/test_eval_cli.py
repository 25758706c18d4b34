"""`cheers eval ...` and `cheers plot ...` through an argparse harness (add_eval_parser / add_plot_parser)."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from cheers.eval.cli import add_eval_parser, add_plot_parser, main
from cheers.models.pretrained import save_pretrained
from cheers.processor import CheersProcessor

from model_helpers import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

FAST = ["--steps", "1", "--guidance", "1.0", "--num-images", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    processor = CheersProcessor(make_tiny_tokenizer(), image_size=128, patch_size=16)
    model = tiny_model(seed=5)
    model.special = processor.special
    directory = tmp_path_factory.mktemp("tiny")
    save_pretrained(model, directory)
    processor.save_pretrained(directory)
    return str(directory)


def test_parsers_register_on_any_subparsers():
    parser = argparse.ArgumentParser(prog="cheers")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_plot_parser(sub)
    args = parser.parse_args(["eval", "geneval", "--out", "x", "--prompts", "long", "--limit", "5"])
    assert (args.prompts, args.limit, args.num_images, args.seed, args.model) == ("long", 5, 4, 0, "default")
    args = parser.parse_args(["plot", "curves", "run_a", "run_b", "--keys", "shapes_geneval"])
    assert args.runs == ["run_a", "run_b"] and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "mmbench"])


def test_eval_geneval_as_rank_1_of_2_and_a_mismatched_resume(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "geneval"
    assert main(["eval", "geneval", "--model", model_dir, "--out", str(out), "--limit", "2", *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00001", "manifest.json"]  # rank 1 of 2: prompt 1 only
    assert "1 prompts generated" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["model"] == model_dir
    assert (
        main(
            [
                "eval",
                "geneval",
                "--model",
                model_dir,
                "--out",
                str(out),
                "--limit",
                "2",
                *FAST[:-3],
                "--num-images",
                "2",
                "--quiet",
            ]
        )
        == 2
    )
    assert "settings.num_images: 1 in the run, 2 now" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_dpg_and_shapes(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "p1.txt").write_text("A red circle.")
    assert (
        main(
            [
                "eval",
                "dpg",
                "--model",
                model_dir,
                "--out",
                str(tmp_path / "dpg"),
                "--prompts",
                str(prompts),
                *FAST,
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "dpg" / "p1.png") as im:
        assert im.size == (128, 128)  # one image: a 1 x 1 grid
    assert (
        main(
            [
                "eval",
                "shapes",
                "--model",
                model_dir,
                "--out",
                str(tmp_path / "sb"),
                "--n",
                "1",
                "--tasks",
                "vqa",
                "--max-new-tokens",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert "ShapesVQA overall" in capsys.readouterr().out
    gain_file = tmp_path / "gain.json"
    assert (
        main(
            [
                "eval",
                "prompt-gain",
                "--model",
                model_dir,
                "--n",
                "2",
                "--times",
                "0.5",
                "--noise",
                "--routing",
                "--out",
                str(gain_file),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "relative prompt gain" in printed and "noise read" in printed
    numbers = json.loads(gain_file.read_text())
    assert numbers["times"] == [0.5] and numbers["noise_readout"]["times"] == [0.0, 0.5]
    assert numbers["routing"]["t"] == 0.5 and "LLM image states" in printed
    with pytest.raises(SystemExit, match="--times"):
        main(["eval", "prompt-gain", "--model", model_dir, "--times", "half"])
    with pytest.raises(SystemExit, match="--objects"):
        main(["eval", "prompt-gain", "--model", model_dir, "--short"])
    assert json.loads((tmp_path / "sb" / "shapes_bench.json").read_text())["vqa"]["n_scenes"] == 1


@pytest.mark.slow
def test_plot_commands(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1 / s, "shapes_accuracy": s / 10}) + "\n" for s in range(1, 6))
    )
    assert main(["plot", "curves", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    maps = tmp_path / "maps.pt"
    assert (
        main(
            [
                "plot",
                "hfi",
                "--model",
                model_dir,
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--guidance",
                "1",
                "--save-maps",
                str(maps),
                "--out",
                str(tmp_path / "hfi.png"),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["plot", "hfi", "--maps", str(maps), "--out", str(tmp_path / "hfi_again.png")]) == 0
    for name in ("curves.png", "hfi.png", "hfi_again.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG"
    assert main(["plot", "hfi", "--out", str(tmp_path / "none.png")]) == 2
    assert "--prompt" in capsys.readouterr().err
