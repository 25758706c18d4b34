"""DPG-Bench runner: one 2x2 grid per prompt file, sharded and resumable; the bundled prompt set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cheers.eval.dpg import grid_shape, run_dpg, tile, untile
from cheers.eval.prompts import dpg_prompts
from cheers.eval.runner import SamplingSettings, Shard, image_seed, seeded_images

from model_helpers import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=5)


@pytest.mark.slow
def test_grids_are_sharded_tiled_2x2_and_resumed(pipe, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a_first.txt").write_text("A red circle above a blue square.\n")
    (prompts / "b_second.txt").write_text("Three green stars on a gray background.")
    out = tmp_path / "out"
    settings = SamplingSettings(num_images=4, num_inference_steps=1, guidance_scale=1.0)
    made = {}
    for rank in (0, 1):
        summary = run_dpg(
            pipe,
            out,
            prompts,
            settings,
            model_name="tiny",
            shard=Shard(rank, 2),
            on_grid=lambda i, name, path, rank=rank: made.setdefault(rank, []).append(name),
            progress=False,
        )
        assert summary.generated == 1
    assert made == {0: ["a_first"], 1: ["b_second"]}
    assert sorted(p.name for p in out.iterdir()) == ["a_first.png", "b_second.png", "manifest.json"]
    with Image.open(out / "b_second.png") as grid:
        assert grid.size == (256, 256)  # 2 x 2 tiles of 128 px, no gaps (the scorer crops at --resolution)
        meta = json.loads(grid.text["cheers"])
        tiles = [np.asarray(t) for t in untile(grid.convert("RGB"), 4)]
    assert meta["seeds"] == [image_seed(0, 1, k) for k in range(4)]
    assert not any(np.array_equal(tiles[0], t) for t in tiles[1:])  # four different samples
    alone = seeded_images(
        pipe, "Three green stars on a gray background.", [image_seed(0, 1, 3)], settings.resolved(pipe)
    )[0]
    assert np.abs(np.asarray(alone).astype(int) - tiles[3].astype(int)).max() <= 1  # tile 3 = image k = 3
    again = run_dpg(pipe, out, prompts, settings, model_name="tiny", shard=Shard(), progress=False)
    assert (again.generated, again.skipped) == (0, 2)
    with pytest.raises(ValueError, match="num_images"):
        run_dpg(
            pipe,
            out,
            prompts,
            SamplingSettings(num_images=1, num_inference_steps=1, guidance_scale=1.0),
            model_name="tiny",
            shard=Shard(),
            progress=False,
        )


def test_tile_layout():
    images = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(4)]
    grid = tile(images)
    assert grid.size == (16, 12) and grid.getpixel((9, 7)) == (120, 0, 0)  # row-major: image 3 bottom right
    assert [np.asarray(t).tolist() for t in untile(grid, 4)] == [np.asarray(i).tolist() for i in images]
    assert grid_shape(1) == (1, 1) and grid_shape(4) == (2, 2) and grid_shape(9) == (3, 3)
    with pytest.raises(ValueError, match="one size"):
        tile([Image.new("RGB", (8, 8)), Image.new("RGB", (4, 4))])


def test_bundled_prompts(tmp_path):
    prompts = dpg_prompts()
    assert len(prompts) == 1065 and len({n for n, _ in prompts}) == 1065
    assert all(text == text.strip() and len(text) > 20 for _, text in prompts)
    with pytest.raises(FileNotFoundError):
        dpg_prompts(tmp_path)
