"""Write ShapesWorld in the release's on-disk layout, so it trains through the same path as real data.

Layout under ``out_dir``::

    images/understanding/<id>.png
    images/generation/<id>.png
    images/editing/<id>_src.png, <id>_tgt.png
    understanding.jsonl  generation.jsonl  editing.jsonl  text.jsonl   (release records, image paths
                                                                        relative to images/)
    geneval_prompts.jsonl   (one GenEval metadata line per generation record: the prompt spec)

Each record keeps its seed and judge spec under the extra key "meta" (records.py keeps unknown keys).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..records import Record, Turn, parse_record, write_records
from .samples import KINDS, make_sample, split_seeds
from .world import WorldConfig

logger = logging.getLogger(__name__)

IMAGE_DIR = "images"


@dataclass(frozen=True)
class ExportSummary:
    out_dir: Path
    image_root: Path
    files: dict[str, Path]
    counts: dict[str, int]


def export_shapes(
    out_dir: str | Path,
    counts: dict[str, int],
    resolution: int = 128,
    split: str = "train",
    start: int = 0,
    world: WorldConfig | None = None,
    with_meta: bool = True,
) -> ExportSummary:
    """Render and write ``counts[kind]`` samples of each kind.

    Args:
        out_dir: destination folder (created).
        counts: samples per kind, keys from samples.KINDS (missing kinds write nothing).
        resolution: image side.
        split: seed split ("train", "val", "test"); sample i of every kind uses seed split[start + i].
        world: vocabulary and scene sizes.
        with_meta: add {"meta": {"seed", "spec"}} to each record.
    Returns:
        ExportSummary with the jsonl paths and counts written.
    """
    bad = [k for k in counts if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kinds {bad}; known: {KINDS}")
    out = Path(out_dir)
    root = out / IMAGE_DIR
    seeds = split_seeds(split)
    files: dict[str, Path] = {}
    written: dict[str, int] = {}
    prompts = []
    for kind in KINDS:
        n = int(counts.get(kind, 0))
        if n <= 0:
            continue
        if kind != "text":
            (root / kind).mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            seed = int(seeds[start + i])
            s = make_sample(seed, kind, resolution, world)
            paths = []
            suffixes = ["_src", "_tgt"] if kind == "editing" else [""]
            for im, suf in zip(s["images"], suffixes):
                p = root / kind / f"{s['id']}{suf}.png"
                im.save(p)
                paths.append(p)
            extra = {"meta": {"seed": seed, "spec": s["spec"]}} if with_meta else {}
            turns = tuple(Turn(t["from"], t["value"]) for t in s["conversations"])
            records.append(Record(s["id"], kind, turns, tuple(paths), extra))  # type: ignore[arg-type]
            if kind == "generation":
                prompts.append(s["spec"])
        # Validate before writing: what we export must be what the reader accepts.
        for r in records:
            parse_record(r.to_json(root), root, check_images=True, where=f"export:{r.id}")
        files[kind] = out / f"{kind}.jsonl"
        write_records(files[kind], records, root)
        written[kind] = n
        logger.info("wrote %d %s records to %s", n, kind, files[kind])
    if prompts:
        files["geneval_prompts"] = out / "geneval_prompts.jsonl"
        with files["geneval_prompts"].open("w", encoding="utf-8") as f:
            for spec in prompts:
                f.write(json.dumps(spec) + "\n")
    return ExportSummary(out, root, files, written)
