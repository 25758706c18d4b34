"""Editing triples: (source scene, instruction, target scene) with exactly one edit applied.

Kinds: recolor, remove, add, move, background. Source and target come from one graph, so everything
the instruction does not mention is identical (same jitter, same texture, same text). The spec
{"kind", "instruction", "source", "target"} is what scoring.score_edit reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .palette import SIZES
from .prompts import cell_phrase, object_phrase
from .questions import referable_objects, referring_phrase
from .world import ALL_CELLS, Scene, ShapeObject, WorldConfig, boxes_overlap, jitter_center, sample_scene

EDIT_KINDS: tuple[str, ...] = ("recolor", "remove", "add", "move", "background")


@dataclass(frozen=True)
class EditSample:
    kind: str
    instruction: str
    source: Scene
    target: Scene

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "instruction": self.instruction,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
        }


def _free_cells(
    scene: Scene, size: str, rng: np.random.Generator
) -> list[tuple[tuple[int, int], tuple[float, float]]]:
    """Free cells (with a jittered centre) where an object of ``size`` would not touch the text."""
    used = {o.cell for o in scene.objects}
    out = []
    for cell in ALL_CELLS:
        if cell in used:
            continue
        center = jitter_center(rng, cell, size)
        probe = ShapeObject("circle", "red", size, cell, center)
        if scene.text is None or not boxes_overlap(probe.bbox, scene.text.bbox, margin=2 / 64):
            out.append((cell, center))
    return out


def apply_edit(
    scene: Scene, kind: str, rng: np.random.Generator, cfg: WorldConfig | None = None
) -> EditSample | None:
    """Apply one edit of ``kind`` to ``scene``; None when the scene does not allow it (e.g. nothing
    to remove, no free cell, no object with a unique description)."""
    cfg = cfg or WorldConfig()
    ref = referable_objects(scene)
    objs = list(scene.objects)
    bg = scene.background
    if kind in ("recolor", "remove", "move"):
        if not ref or (kind == "remove" and len(objs) < 2):
            return None
        o, uniq = ref[int(rng.integers(len(ref)))]
        i = objs.index(o)
        name = referring_phrase(o, uniq)
        if kind == "recolor":
            taken = {x.color for x in objs if x.shape == o.shape} | {bg.color}
            colors = [c for c in cfg.colors if c not in taken]
            if not colors:
                return None
            c = str(rng.choice(colors))
            objs[i] = replace(o, color=c)
            text = f"Make {name} {c}."
        elif kind == "remove":
            objs.pop(i)
            text = f"Remove {name}."
        else:
            free = _free_cells(scene, o.size, rng)
            if not free:
                return None
            cell, center = free[int(rng.integers(len(free)))]
            objs[i] = replace(o, cell=cell, center=center)
            text = f"Move {name} to the {_cell_name(cell)}."
        target = replace(scene, objects=tuple(objs))
    elif kind == "add":
        size = str(rng.choice(SIZES))
        free = _free_cells(scene, size, rng)
        if not free:
            return None
        cell, center = free[int(rng.integers(len(free)))]
        present = {(x.shape, x.color) for x in objs}
        pairs = [(s, c) for s in cfg.shapes for c in cfg.colors if c != bg.color and (s, c) not in present]
        s, c = pairs[int(rng.integers(len(pairs)))]
        target = replace(scene, objects=(*objs, ShapeObject(s, c, size, cell, center)))
        text = f"Add {object_phrase(s, c, size)} {cell_phrase(cell)}."
    elif kind == "background":
        used = {x.color for x in objs} | ({scene.text.color} if scene.text else set())
        colors = [c for c in cfg.backgrounds if c != bg.color and c not in used]
        if not colors:
            return None
        c = str(rng.choice(colors))
        target = replace(scene, background=replace(bg, color=c))
        text = f"Change the background to {c}."
    else:
        raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
    return EditSample(kind, text, scene, target)


def _cell_name(cell: tuple[int, int]) -> str:
    return cell_phrase(cell).removeprefix("at the ").removeprefix("in the ")


def sample_edit(
    rng: np.random.Generator, cfg: WorldConfig | None = None, kind: str | None = None
) -> EditSample:
    """A random scene and one applicable edit (of ``kind`` if given); retries scenes until one fits."""
    cfg = cfg or WorldConfig()
    if kind is not None and kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
    for _ in range(100):
        scene = sample_scene(rng, cfg)
        k = kind or str(rng.choice(EDIT_KINDS))
        out = apply_edit(scene, k, rng, cfg)
        if out is not None:
            return out
    raise RuntimeError(f"no scene allowed a {kind!r} edit in 100 tries with {cfg}")
