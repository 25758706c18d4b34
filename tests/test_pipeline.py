"""CheersPipeline and the CLI on a tiny random model with a tiny tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.cli import main
from cheers.models.pretrained import save_pretrained
from cheers.pipeline import CheersPipeline

from model_helpers import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, pipe):
    directory = tmp_path_factory.mktemp("tiny")
    save_pretrained(pipe.model, directory)
    pipe.processor.save_pretrained(directory)
    return directory


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_generate_returns_images_with_settings(pipe):
    out = pipe.generate("two red circles", num_inference_steps=2, guidance_scale=2.0, generator=gen(0))
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (128, 128)
    assert out.settings["num_inference_steps"] == 2 and out.prompts == ["two red circles"]
    again = pipe.generate("two red circles", num_inference_steps=2, guidance_scale=2.0, generator=gen(0))
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))  # seeded = reproducible


def test_batched_prompts_equal_single_runs(pipe):
    prompts = ["a small blue square at the top left", "red"]
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    batched = pipe.generate(prompts, generator=[gen(1), gen(2)], **kw).images
    for i, p in enumerate(prompts):
        alone = pipe.generate(p, generator=[gen(1 + i)], **kw).images[0]
        assert torch.allclose(batched[i], alone, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_output_types_negative_prompt_and_hfi_maps(pipe):
    kw = dict(num_inference_steps=2, guidance_scale=3.0)
    lat = pipe.generate("x", output_type="latent", generator=gen(0), **kw).images[0]
    assert lat.shape == (32, 8, 8)
    arr = pipe.generate("x", output_type="np", generator=gen(0), **kw).images[0]
    assert arr.shape == (128, 128, 3) and 0 <= arr.min() and arr.max() <= 1
    neg = pipe.generate("x", negative_prompt="blurry", output_type="np", generator=gen(0), **kw)
    assert not np.allclose(arr, neg.images[0])
    maps = pipe.generate("x", return_hfi_maps=True, generator=gen(0), **kw).hfi_maps
    assert maps[0].shape == (2, 8, 8)
    wide = pipe.generate("x", width=256, height=128, generator=gen(0), **kw).images[0]
    assert wide.size == (256, 128)


def test_edit_and_chat(pipe):
    image = Image.fromarray((np.random.default_rng(0).random((100, 60, 3)) * 255).astype(np.uint8))
    edited = pipe.edit(image, "make it blue", num_inference_steps=3, generator=gen(0)).images[0]
    assert edited.size == (128, 128)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    out = pipe.chat(msgs, images=[image], max_new_tokens=6)
    assert isinstance(out.texts[0], str) and 1 <= len(out.token_ids[0]) <= 6
    streamed = "".join(pipe.chat(msgs, images=[image], max_new_tokens=6, stream=True))
    assert streamed == out.texts[0]
    beams = pipe.chat(msgs, images=[image], max_new_tokens=4, num_beams=3)
    assert len(beams.token_ids[0]) <= 4
    batch = pipe.chat([msgs, [{"role": "user", "content": "hello there"}]], images=[image], max_new_tokens=3)
    assert len(batch.texts) == 2


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=10**9), "num_inference_steps"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(height=100), "height"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(shift=0.0), "shift"),
    ],
)
def test_bad_parameters_raise(pipe, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        pipe.generate("x", **kwargs)


def test_empty_prompt_raises(pipe):
    with pytest.raises(ValueError, match="empty"):
        pipe.generate("   ")


def test_pipeline_loads_from_a_directory(model_dir):
    loaded = CheersPipeline.from_pretrained(model_dir, device="cpu", progress=False)
    assert loaded.processor.image_size == 128
    out = loaded.generate("red", num_inference_steps=1, guidance_scale=1.0, generator=gen(0))
    assert out.images[0].size == (128, 128)


def test_cli_generate_ask_and_info(model_dir, tmp_path, capsys):
    target = tmp_path / "img.png"
    assert (
        main(
            [
                "generate",
                "two red circles",
                "--model",
                str(model_dir),
                "--steps",
                "2",
                "--out",
                str(target),
                "--seed",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    meta = json.loads(Image.open(target).text["cheers"])
    assert meta["prompt"] == "two red circles" and meta["seed"] == 3 and meta["num_inference_steps"] == 2
    assert json.loads(target.with_suffix(".json").read_text())["seed"] == 3
    assert (
        main(["ask", str(target), "How many?", "--model", str(model_dir), "--max-new-tokens", "3", "--quiet"])
        == 0
    )
    assert main(["info", "--model", str(model_dir)]) == 0
    assert "parameters:" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["ask", str(bad), "?", "--model", str(model_dir)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["ask", str(target), "?", "--model", str(model_dir), "--device", "cpu", "--cuda-graph"]) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
