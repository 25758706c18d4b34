"""DPG-Bench: one image grid per prompt file, for ELLA's scorer (``dpg_bench/compute_dpg_bench.py``).

Layout: ``<outdir>/<name>.png`` for the prompt file ``<name>.txt``, holding the prompt's N images (default
4) tiled row-major with no gaps - 2 x 2 for 4 images, as the scorer's ``--pic-num 4`` crops them back at
``--resolution`` (the generated image side). Prompt i (in name order) is sharded and seeded as in
:mod:`cheers.eval.runner`; a grid is written only when all its images exist, so a grid is the unit of
resuming.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from .prompts import dpg_prompts
from .runner import (
    RunSummary,
    SamplingSettings,
    Shard,
    build_manifest,
    format_prompt,
    image_seed,
    prepare_run,
    progress_bar,
    remove_stale_temps,
    save_png_atomic,
    seeded_images,
    text_sha256,
)

logger = logging.getLogger(__name__)

GridCallback = Callable[[int, str, Path], None]  # (prompt index, name, path) after each saved grid


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the grid for n images: as square as possible, 2 x 2 for 4."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def tile(images: Sequence[Image.Image]) -> Image.Image:
    """Tile same-size images row-major into a (rows x cols) grid without gaps (black where a row is short)."""
    if not images:
        raise ValueError("tile needs at least one image")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError(f"grid images must share one size, got {sorted({im.size for im in images})}")
    rows, cols = grid_shape(len(images))
    grid = Image.new("RGB", (cols * w, rows * h))
    for n, im in enumerate(images):
        r, c = divmod(n, cols)
        grid.paste(im.convert("RGB"), (c * w, r * h))
    return grid


def untile(grid: Image.Image, n: int) -> list[Image.Image]:
    """The n images of a grid written by :func:`tile` (what the scorer's crop does)."""
    rows, cols = grid_shape(n)
    w, h = grid.width // cols, grid.height // rows
    return [
        grid.crop(((i % cols) * w, (i // cols) * h, (i % cols + 1) * w, (i // cols + 1) * h))
        for i in range(n)
    ]


def run_dpg(
    pipe,
    outdir: str | Path,
    prompts_dir: str | Path | None = None,
    settings: SamplingSettings | None = None,
    *,
    model_name: str,
    shard: Shard | None = None,
    limit: int | None = None,
    on_grid: GridCallback | None = None,
    progress: bool = True,
) -> RunSummary:
    """Generate this process's share of the DPG-Bench grids (missing ones only).

    Args:
        pipe: a CheersPipeline.
        outdir: the run folder.
        prompts_dir: a folder of DPG ``*.txt`` prompt files (default: the bundled 1065).
        settings: sampling settings (default 4 images per prompt).
        model_name: what the manifest records as the model.
        shard: this process's rank and world size (default: from the environment).
        limit: only the first ``limit`` prompts in name order.
        on_grid: called after each saved grid.
        progress: show a progress bar (rank 0).

    Raises:
        ValueError: ``outdir`` holds a run with other settings.
    """
    outdir = Path(outdir)
    shard = shard or Shard.from_env()
    settings = (settings or SamplingSettings()).resolved(pipe)
    prompts = dpg_prompts(prompts_dir)
    digest = text_sha256([f"{name}\t{text}" for name, text in prompts])
    manifest = build_manifest(
        "dpg",
        model_name,
        pipe,
        settings,
        {
            "name": "bundled" if prompts_dir is None else Path(prompts_dir).name,
            "sha256": digest,
            "count": len(prompts),
        },
        shard,
    )
    outdir.mkdir(parents=True, exist_ok=True)
    prepare_run(outdir, manifest, shard)
    count = len(prompts) if limit is None else min(limit, len(prompts))
    mine = [i for i in range(count) if shard.owns(i)]
    summary = RunSummary(outdir, owned=len(mine))
    bar = progress_bar(len(mine), f"dpg {shard.rank}/{shard.world_size}", shard, progress)
    started = time.perf_counter()
    try:
        for i in mine:
            name, text = prompts[i]
            target = outdir / f"{name}.png"
            if target.is_file():
                summary.skipped += 1
                bar.update(1)
                continue
            remove_stale_temps(outdir, target.name)  # all ranks write here: only this grid's leftovers
            seeds = [image_seed(settings.seed, i, k) for k in range(settings.num_images)]
            prompt = format_prompt(settings.prompt_template, text)
            images = seeded_images(pipe, prompt, seeds, settings)
            save_png_atomic(
                tile(images), target, {"prompt": prompt, "name": name, "index": i, "seeds": seeds}
            )
            summary.generated += 1
            summary.images += len(images)
            bar.update(1)
            if on_grid is not None:
                on_grid(i, name, target)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
    logger.info(
        "dpg rank %d/%d: %d grids generated, %d already done in %.1fs",
        shard.rank,
        shard.world_size,
        summary.generated,
        summary.skipped,
        summary.seconds,
    )
    return summary
