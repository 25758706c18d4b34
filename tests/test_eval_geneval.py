"""GenEval runner: layout, kill + resume without duplicate work, sharding over ranks, seeds, manifest
checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.eval.geneval import load_metadata, run_geneval, run_status, sample_path
from cheers.eval.prompts import geneval_object_names
from cheers.eval.runner import SamplingSettings, Shard, image_seed, seeded_images

from model_helpers import tiny_pipeline

N_PROMPTS, N_IMAGES = 3, 2
FAST = dict(num_images=N_IMAGES, num_inference_steps=1, guidance_scale=1.0, batch_size=1)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class Counting:
    """Wraps a pipeline and counts the images it generates."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, *args, **kwargs):
        out = self.pipe.generate(*args, **kwargs)
        self.images += len(out.images)
        return out


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=5)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def resumed_run(pipe, tmp_path_factory):
    """A run killed after its 3rd image, then restarted: (folder, images per attempt, mtimes after the
    kill)."""
    out = tmp_path_factory.mktemp("geneval")
    counting = Counting(pipe)
    saved = []

    def kill_after_third(i, k, path):
        saved.append(path)
        if len(saved) == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_geneval(
            counting,
            out,
            "short",
            SamplingSettings(**FAST),
            model_name="tiny",
            limit=N_PROMPTS,
            on_image=kill_after_third,
            progress=False,
        )
    first = counting.images
    mtimes = {p: p.stat().st_mtime_ns for p in saved}
    counting.images = 0
    summary = run_geneval(
        counting, out, "short", SamplingSettings(**FAST), model_name="tiny", limit=N_PROMPTS, progress=False
    )
    return out, (first, counting.images), mtimes, summary


def test_kill_and_resume_gives_the_full_layout_without_duplicate_work(resumed_run):
    out, (first, second), mtimes, summary = resumed_run
    assert (first, second) == (3, N_PROMPTS * N_IMAGES - 3)  # nothing generated twice
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished images untouched
    _, lines, _ = load_metadata("short")
    for i in range(N_PROMPTS):
        assert (out / f"{i:05d}" / "metadata.jsonl").read_text() == lines[i] + "\n"
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert not list(out.rglob("*.tmp"))
    assert run_status(out) == {
        "prompts": N_PROMPTS,
        "complete_prompts": N_PROMPTS,
        "images": N_PROMPTS * N_IMAGES,
    }
    assert (summary.generated, summary.skipped) == (2, 1)  # prompt 0 was complete before the kill
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["num_inference_steps"] == 1 and manifest["prompts"]["count"] == 553
    assert len(manifest["prompts"]["sha256"]) == 64 and "1000" in manifest["seed_rule"]
    with Image.open(sample_path(out, 1, 1)) as im:  # each PNG says how to remake it
        assert json.loads(im.text["cheers"])["seed"] == image_seed(0, 1, 1)


KILLED_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys
    import torch
    from PIL import Image
    from model_helpers import tiny_model
    from tiny_tokenizer import make_tiny_tokenizer
    from cheers.eval.geneval import run_geneval
    from cheers.eval.runner import SamplingSettings
    from cheers.pipeline import CheersPipeline
    from cheers.processor import CheersProcessor

    torch.set_num_threads(1)
    processor = CheersProcessor(make_tiny_tokenizer(), image_size=128, patch_size=16)
    model = tiny_model(seed=5)
    model.special = processor.special
    pipe = CheersPipeline(model, processor, progress=False)
    saves = []
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):  # the 3rd PNG: half of it reaches the disk, then SIGKILL
        saves.append(fp)
        if len(saves) == 3:
            with open(fp, "wb") as f:
                f.write(b"half a PNG")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(self, fp, *args, **kwargs)

    Image.Image.save = save
    run_geneval(pipe, sys.argv[1], "short", SamplingSettings(num_images=2, num_inference_steps=1,
                guidance_scale=1.0, batch_size=1), model_name="tiny", limit=3, progress=False)
""")


@pytest.mark.slow
def test_a_process_killed_while_writing_leaves_no_half_image(pipe, resumed_run, tmp_path):
    single, *_ = resumed_run
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, str(tmp_path)], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["0000.png", "0001.png"]  # prompt 0 only
    assert len(list(tmp_path.rglob(".0000.png.*.tmp"))) == 1  # the half-written file kept its temporary name
    summary = run_geneval(
        pipe, tmp_path, "short", SamplingSettings(**FAST), model_name="tiny", limit=N_PROMPTS, progress=False
    )
    assert (summary.generated, summary.images) == (2, 4) and not list(tmp_path.rglob("*.tmp"))
    for i in range(N_PROMPTS):
        for k in range(N_IMAGES):
            assert np.abs(pixels(sample_path(tmp_path, i, k)) - pixels(sample_path(single, i, k))).max() <= 1


def test_two_ranks_split_the_prompts_and_reproduce_the_single_run(pipe, resumed_run, tmp_path, monkeypatch):
    single, *_ = resumed_run
    owned = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        written = []
        # one image per prompt: image k's seed depends on (prompt, k) only, so k = 0 is comparable
        run_geneval(
            pipe,
            tmp_path,
            "short",
            SamplingSettings(**{**FAST, "num_images": 1}),
            model_name="tiny",
            limit=N_PROMPTS,
            on_image=lambda i, k, p, written=written: written.append(i),
            progress=False,
        )
        owned[rank] = set(written)
    assert owned == {0: {0, 2}, 1: {1}}  # i % world == rank: disjoint and complete
    for i in range(N_PROMPTS):  # same image whatever the rank, batch or interruption
        diff = np.abs(pixels(sample_path(tmp_path, i, 0)) - pixels(sample_path(single, i, 0))).max()
        assert diff <= 1


def test_an_image_equals_its_own_seeded_single_run(pipe):
    settings = SamplingSettings(
        num_images=2, num_inference_steps=1, guidance_scale=2.0, negative_prompt="blurry"
    ).resolved(pipe)
    image = seeded_images(pipe, "a red circle", [image_seed(0, 4, 1)], settings)[0]
    alone = pipe.generate(
        "a red circle",
        negative_prompt="blurry",
        num_inference_steps=1,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(4001),
    ).images[0]
    assert np.abs(np.asarray(image).astype(int) - np.asarray(alone).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(guidance_scale=3.0), "settings.guidance_scale"),
        (dict(num_images=3), "settings.num_images"),
        (dict(prompt_template="{sentence}"), "settings.prompt_template"),
    ],
)
def test_resuming_with_other_settings_raises(pipe, resumed_run, change, needle):
    out, *_ = resumed_run
    with pytest.raises(ValueError, match=needle):
        run_geneval(
            pipe,
            out,
            "short",
            SamplingSettings(**{**FAST, **change}),
            model_name="tiny",
            limit=1,
            progress=False,
        )


def test_resuming_with_another_model_or_prompt_set_raises(pipe, resumed_run):
    out, *_ = resumed_run
    with pytest.raises(ValueError, match="model: 'tiny' in the run, 'other' now"):
        run_geneval(pipe, out, "short", SamplingSettings(**FAST), model_name="other", limit=1, progress=False)
    with pytest.raises(ValueError, match="prompts.name"):
        run_geneval(pipe, out, "long", SamplingSettings(**FAST), model_name="tiny", limit=1, progress=False)


def test_prompt_sets_and_bad_inputs(tmp_path):
    short, _, _ = load_metadata("short")
    long, _, _ = load_metadata("long")
    assert len(short) == len(long) == 553
    assert [r["include"] for r in short] == [r["include"] for r in long]
    names = geneval_object_names()
    assert len(names) == 80 and {i["class"] for r in short for i in r["include"]} <= set(names)
    assert np.mean([len(r["prompt"]) for r in long]) > 3 * np.mean([len(r["prompt"]) for r in short])
    with pytest.raises(FileNotFoundError):
        load_metadata(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="include"):
        load_metadata(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="num_images"):
        SamplingSettings(num_images=1001)
    with pytest.raises(ValueError, match="prompt_template"):
        SamplingSettings(prompt_template="{caption}")


def test_shard_from_env():
    assert Shard.from_env({}) == Shard(0, 1, 0)
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    with pytest.raises(ValueError, match="rank"):
        Shard.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        Shard.from_env({"WORLD_SIZE": "two"})
