"""ShapesGenEval over a folder laid out like the GenEval runner's output.

Layout: ``<dir>/<index>/metadata.jsonl`` (one line: the prompt spec) and ``<dir>/<index>/samples/<k>.png``.
Every sample image is parsed and checked against its spec; the summary is per tag plus the mean of
the per-tag accuracies ("overall", as GenEval reports).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .judge import parse_image
from .render import render_scene
from .scoring import score_spec, summarize_geneval
from .world import Scene


@dataclass(frozen=True)
class SampleVerdict:
    index: str
    sample: str
    tag: str
    prompt: str
    correct: bool
    reasons: tuple[str, ...]


def read_spec(prompt_dir: Path) -> dict[str, Any]:
    """The spec on the first non-empty line of ``prompt_dir/metadata.jsonl``."""
    path = prompt_dir / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (expected GenEval layout <index>/metadata.jsonl)")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            spec = json.loads(line)
            if not isinstance(spec, dict) or "include" not in spec:
                raise ValueError(
                    f"{path}: the metadata line is not a prompt spec with 'include': {line[:200]}"
                )
            return spec
    raise ValueError(f"{path} is empty")


def judge_geneval_folder(root: str | Path) -> tuple[list[SampleVerdict], dict[str, float]]:
    """Score every ``<index>/samples/*.png`` under ``root``.

    Returns:
        (per-sample verdicts sorted by index and sample, summary {tag: accuracy, "overall": mean}).
    """
    root = Path(root)
    dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and (p / "metadata.jsonl").exists()), key=lambda p: p.name
    )
    if not dirs:
        raise FileNotFoundError(f"no <index>/metadata.jsonl folders under {root}")
    verdicts = []
    for d in dirs:
        spec = read_spec(d)
        for img_path in sorted((d / "samples").glob("*.png")):
            with Image.open(img_path) as im:
                result = score_spec(parse_image(im), spec)
            verdicts.append(
                SampleVerdict(
                    d.name,
                    img_path.name,
                    spec.get("tag", "untagged"),
                    spec.get("prompt", ""),
                    result.correct,
                    result.reasons,
                )
            )
    return verdicts, summarize_geneval((v.tag, v.correct) for v in verdicts)


def write_geneval_folder(
    root: str | Path, items: Sequence[tuple[dict[str, Any], Scene]], resolution: int = 128
) -> Path:
    """Write ground-truth renders in the GenEval layout (one sample per prompt): a judge sanity check
    and a template for generated folders."""
    root = Path(root)
    for i, (spec, scene) in enumerate(items):
        d = root / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        (d / "metadata.jsonl").write_text(json.dumps(spec) + "\n", encoding="utf-8")
        render_scene(scene, resolution).save(d / "samples" / "0000.png")
    return root
