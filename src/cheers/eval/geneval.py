"""GenEval: images for the official scorer (github.com/djghosh13/geneval), sharded over processes and
resumable.

Layout (what ``geneval/evaluation/evaluate_images.py`` reads)::

    <outdir>/manifest.json                  the run: model, settings, seed rule, prompt file hash, versions
    <outdir>/<i:05d>/metadata.jsonl         line i of the prompt file, as is
    <outdir>/<i:05d>/samples/<k:04d>.png    image k of prompt i

Prompt sets: ``"short"`` (GenEval's 553 prompts, bundled), ``"long"`` (the same 553 specs with rewritten,
longer prompts, bundled) or the path of any file in that format - ShapesGenEval uses its own.
See :mod:`cheers.eval.runner` for sharding, seeds and resuming.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .prompts import geneval_metadata_path
from .runner import (
    RunSummary,
    SamplingSettings,
    Shard,
    build_manifest,
    file_sha256,
    format_prompt,
    image_seed,
    prepare_run,
    progress_bar,
    remove_stale_temps,
    save_png_atomic,
    seeded_images,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

ImageCallback = Callable[[int, int, Path], None]  # (prompt index, k, path) after each saved image


def load_metadata(prompts: str | Path) -> tuple[list[dict[str, Any]], list[str], Path]:
    """Read a GenEval metadata file: ``"short"``, ``"long"`` or a path.

    Returns:
        (records, their raw lines, the file's path). Every record needs ``prompt``, ``tag`` and ``include``.
    """
    path = geneval_metadata_path(str(prompts))
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    records = []
    for n, line in enumerate(lines):
        rec = json.loads(line)
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or "include" not in rec:
            raise ValueError(
                f"{path} line {n + 1}: a GenEval record needs 'prompt' and 'include', got {line[:120]}"
            )
        records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records, lines, path


def prompt_dir(outdir: Path, index: int) -> Path:
    return outdir / f"{index:05d}"


def sample_path(outdir: Path, index: int, k: int) -> Path:
    return prompt_dir(outdir, index) / "samples" / f"{k:04d}.png"


def run_geneval(
    pipe,
    outdir: str | Path,
    prompts: str | Path = "short",
    settings: SamplingSettings | None = None,
    *,
    model_name: str,
    shard: Shard | None = None,
    limit: int | None = None,
    on_image: ImageCallback | None = None,
    progress: bool = True,
) -> RunSummary:
    """Generate this process's share of the GenEval images (missing ones only).

    Args:
        pipe: a CheersPipeline.
        outdir: the run folder (created; may hold an earlier run with the same settings).
        prompts: ``"short"``, ``"long"`` or a metadata jsonl path.
        settings: sampling settings (defaults: 4 images per prompt, the model's sampler defaults).
        model_name: what the manifest records as the model (a hub id or directory).
        shard: this process's rank and world size (default: from the environment).
        limit: only the first ``limit`` prompts (a quick look; indices stay those of the file).
        on_image: called after each saved image.
        progress: show a progress bar (rank 0).

    Returns:
        A RunSummary of this process (items = prompts).

    Raises:
        ValueError: ``outdir`` holds a run with other settings.
    """
    outdir = Path(outdir)
    shard = shard or Shard.from_env()
    settings = (settings or SamplingSettings()).resolved(pipe)
    records, lines, path = load_metadata(prompts)
    name = str(prompts) if str(prompts) in ("short", "long") else path.name
    manifest = build_manifest(
        "geneval",
        model_name,
        pipe,
        settings,
        {"name": name, "sha256": file_sha256(path), "count": len(records)},
        shard,
    )
    outdir.mkdir(parents=True, exist_ok=True)
    prepare_run(outdir, manifest, shard)
    count = len(records) if limit is None else min(limit, len(records))
    mine = [i for i in range(count) if shard.owns(i)]
    summary = RunSummary(outdir, owned=len(mine))
    bar = progress_bar(len(mine), f"geneval {shard.rank}/{shard.world_size}", shard, progress)
    started = time.perf_counter()
    try:
        for i in mine:
            folder = prompt_dir(outdir, i)
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder / "samples")
            meta = folder / "metadata.jsonl"
            if not meta.is_file() or meta.read_text(encoding="utf-8") != lines[i] + "\n":
                write_text_atomic(meta, lines[i] + "\n")
            todo = [k for k in range(settings.num_images) if not sample_path(outdir, i, k).is_file()]
            if not todo:
                summary.skipped += 1
                bar.update(1)
                continue
            text = format_prompt(settings.prompt_template, records[i]["prompt"])
            for start in range(0, len(todo), settings.batch_size):  # save each batch before the next
                ks = todo[start : start + settings.batch_size]
                seeds = [image_seed(settings.seed, i, k) for k in ks]
                for k, seed, image in zip(ks, seeds, seeded_images(pipe, text, seeds, settings)):
                    target = sample_path(outdir, i, k)
                    save_png_atomic(image, target, {"prompt": text, "index": i, "k": k, "seed": seed})
                    summary.images += 1
                    if on_image is not None:
                        on_image(i, k, target)
            summary.generated += 1
            bar.update(1)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
    logger.info(
        "geneval rank %d/%d: %d prompts generated, %d already done, %d images in %.1fs",
        shard.rank,
        shard.world_size,
        summary.generated,
        summary.skipped,
        summary.images,
        summary.seconds,
    )
    return summary


def run_status(outdir: str | Path, num_images: int | None = None) -> dict[str, int]:
    """Count complete prompts and images of a run folder (all ranks together)."""
    outdir = Path(outdir)
    if num_images is None:
        num_images = json.loads((outdir / "manifest.json").read_text())["settings"]["num_images"]
    dirs = [d for d in outdir.iterdir() if d.is_dir() and (d / "metadata.jsonl").is_file()]
    images = sum(len(list((d / "samples").glob("*.png"))) for d in dirs)
    complete = sum(len(list((d / "samples").glob("*.png"))) >= num_images for d in dirs)
    return {"prompts": len(dirs), "complete_prompts": complete, "images": images}


__all__ = ["load_metadata", "run_geneval", "run_status", "sample_path"]
