"""Validate the judge on rendered ground truth, clean and degraded, per resolution.

A low ShapesGenEval score must mean a bad generator, not a bad judge; these figures say how far the
parser can be trusted. For every seed, the scene is rendered, degraded (perturb.py) and parsed back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .judge import parse_image
from .perturb import PERTURBATIONS, perturbation
from .render import RESOLUTIONS, render_array
from .world import WorldConfig, sample_scene

VALIDATION_WORLD = WorldConfig(text_prob=0.5)
"""Scenes for validation: the default world with text in half of them, so OCR gets enough cases."""


@dataclass(frozen=True)
class JudgeAccuracy:
    """Accuracy of the parser on one (resolution, perturbation) cell.

    scene: every object's shape, colour and cell right and the count exact.
    size: scene, plus every object's size. background: the background colour.
    ocr: exact text among scenes with text (n_text of them). full: size, background and text all right.
    """

    resolution: int
    perturbation: str
    n: int
    scene: float
    size: float
    background: float
    n_text: int
    ocr: float
    full: float
    seconds_per_image: float


def judge_accuracy(
    seeds: Sequence[int],
    resolutions: Sequence[int] = RESOLUTIONS,
    perturbations: Sequence[str] = PERTURBATIONS,
    world: WorldConfig = VALIDATION_WORLD,
) -> list[JudgeAccuracy]:
    """Render ``seeds`` at each resolution, degrade with each perturbation, parse, and compare.

    Returns:
        one JudgeAccuracy per (resolution, perturbation), in argument order.
    """
    scenes = [sample_scene(int(s), world) for s in seeds]
    out = []
    for res in resolutions:
        clean = [render_array(sc, res) for sc in scenes]
        for name in perturbations:
            t0 = time.perf_counter()
            hits = {"scene": 0, "size": 0, "background": 0, "ocr": 0, "full": 0}
            n_text = 0
            for seed, sc, arr in zip(seeds, scenes, clean):
                parsed = parse_image(perturbation(name, res, int(seed))(arr))
                objects_ok = parsed.object_keys() == sorted((o.shape, o.color, o.cell) for o in sc.objects)
                sizes_ok = objects_ok and sorted((o.cell, o.size) for o in parsed.objects) == sorted(
                    (o.cell, o.size) for o in sc.objects
                )
                bg_ok = parsed.background == sc.background.color
                text_ok = parsed.text == (sc.text.text if sc.text is not None else None)
                hits["scene"] += objects_ok
                hits["size"] += sizes_ok
                hits["background"] += bg_ok
                hits["full"] += sizes_ok and bg_ok and text_ok
                if sc.text is not None:
                    n_text += 1
                    hits["ocr"] += text_ok
            n = len(scenes)
            out.append(
                JudgeAccuracy(
                    resolution=res,
                    perturbation=name,
                    n=n,
                    scene=hits["scene"] / n,
                    size=hits["size"] / n,
                    background=hits["background"] / n,
                    n_text=n_text,
                    ocr=hits["ocr"] / n_text if n_text else 0.0,
                    full=hits["full"] / n,
                    seconds_per_image=(time.perf_counter() - t0) / n,
                )
            )
    return out


def format_accuracy_table(rows: Sequence[JudgeAccuracy]) -> str:
    """A markdown table: resolution x perturbation with scene / size / background / OCR / full accuracy."""
    lines = [
        "| res | perturbation | scenes | exact scene | + size | background | OCR (n) | full | ms/image |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.resolution} | {r.perturbation} | {r.n} | {r.scene:.2%} | {r.size:.2%} | "
            f"{r.background:.2%} | "
            f"{r.ocr:.2%} ({r.n_text}) | {r.full:.2%} | {r.seconds_per_image * 1000:.1f} |"
        )
    return "\n".join(lines)
