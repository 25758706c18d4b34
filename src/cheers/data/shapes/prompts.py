"""Generation prompts with structured specs (GenEval's six categories plus dense prompts), and captions.

A spec is GenEval's metadata dict, so the same scorer logic applies::

    {"tag": "position", "prompt": "a circle left of a square",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}]}

``include[i]["position"] = [rel, j]`` means "objects of item i are <rel> objects of item j". Counting
specs carry GenEval's ``exclude`` (count + 1), which makes counts exact. Dense specs extend the format
with per-item ``size`` and ``cell``, a ``background`` colour, a ``text`` item and ``exact_count`` (no
other objects allowed). Every sampler returns the spec together with a scene that satisfies it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .palette import CELL_NAMES, NUMBER_WORDS, RELATIONS, plural
from .scoring import relative_position
from .world import (
    ALL_CELLS,
    Scene,
    ShapeObject,
    WorldConfig,
    make_object,
    place_text,
    random_text,
    sample_background,
)

GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
PROMPT_TAGS: tuple[str, ...] = (*GENEVAL_TAGS, "dense")
TEXTURE_WORDS: dict[str, str] = {
    "flat": "plain",
    "stripes": "striped",
    "checkerboard": "checkered",
    "noise": "speckled",
    "dots": "dotted",
}
GEN_SUFFIX = "\nBased on the above description, generate an image."


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(shape: str, color: str | None = None, size: str | None = None, count: int = 1) -> str:
    """'a red circle', 'a large star', 'three blue squares'."""
    words = [w for w in (size, color) if w]
    noun = shape if count == 1 else plural(shape)
    body = " ".join([*words, noun])
    return f"{article(body)} {body}" if count == 1 else f"{NUMBER_WORDS[count]} {body}"


def cell_phrase(cell: tuple[int, int]) -> str:
    """'at the top left', 'in the center'."""
    name = CELL_NAMES[tuple(cell)]
    return "in the center" if name == "center" else f"at the {name}"


def background_phrase(scene: Scene) -> str:
    bg = scene.background
    return f"{article(TEXTURE_WORDS[bg.texture])} {TEXTURE_WORDS[bg.texture]} {bg.color} background"


def _cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    return [ALL_CELLS[int(i)] for i in rng.choice(9, size=n, replace=False)]


def _relation_cells(rng: np.random.Generator, rel: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(cell of the subject, cell of the reference) with the subject strictly <rel> the reference:
    the offset along the relation's axis is larger than across it."""
    while True:
        a, b = _cells(rng, 2)
        dx, dy = a[0] - b[0], a[1] - b[1]
        along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[
            rel
        ]
        if along > abs(across):
            return a, b


def sample_generation(
    rng: np.random.Generator, tag: str, cfg: WorldConfig | None = None
) -> tuple[dict[str, Any], Scene]:
    """A prompt spec of category ``tag`` and a scene satisfying it (unspecified attributes are random).

    Args:
        rng: the sample's generator.
        tag: one of PROMPT_TAGS.
        cfg: world vocabulary (shapes/colours/backgrounds used).
    Returns:
        (spec, scene); spec["prompt"] is the prompt text.
    """
    cfg = cfg or WorldConfig()
    if tag == "dense":
        return _dense(rng, cfg)
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"unknown prompt tag {tag!r}; known: {PROMPT_TAGS}")
    bg = sample_background(rng, cfg)
    colors = [c for c in cfg.colors if c != bg.color]
    shapes = list(cfg.shapes)

    def obj(cell: tuple[int, int], shape: str, color: str | None = None) -> ShapeObject:
        return make_object(rng, cfg, cell, bg.color, shape=shape, color=color)

    if tag == "single_object":
        s = str(rng.choice(shapes))
        spec = {"include": [{"class": s, "count": 1}], "prompt": object_phrase(s)}
        objects = [obj(_cells(rng, 1)[0], s)]
    elif tag == "two_object":
        a, b = (str(x) for x in rng.choice(shapes, size=2, replace=False))
        spec = {
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"{object_phrase(a)} and {object_phrase(b)}",
        }
        objects = [obj(c, s) for c, s in zip(_cells(rng, 2), (a, b))]
    elif tag == "counting":
        s, n = str(rng.choice(shapes)), int(rng.integers(1, 5))
        spec = {
            "include": [{"class": s, "count": n}],
            "exclude": [{"class": s, "count": n + 1}],
            "prompt": object_phrase(s, count=n) if n > 1 else f"one {s}",
        }
        objects = [obj(c, s) for c in _cells(rng, n)]
    elif tag == "colors":
        s, c = str(rng.choice(shapes)), str(rng.choice(colors))
        spec = {"include": [{"class": s, "count": 1, "color": c}], "prompt": object_phrase(s, c)}
        objects = [obj(_cells(rng, 1)[0], s, c)]
    elif tag == "position":
        ref, sub = (str(x) for x in rng.choice(shapes, size=2, replace=False))
        rel = str(rng.choice(RELATIONS))
        spec = {
            "include": [{"class": ref, "count": 1}, {"class": sub, "count": 1, "position": [rel, 0]}],
            "prompt": f"{object_phrase(sub)} {rel} {object_phrase(ref)}",
        }
        while True:  # jitter can blur a two-step diagonal: redraw until GenEval's test agrees
            a_cell, b_cell = _relation_cells(rng, rel)
            objects = [obj(b_cell, ref), obj(a_cell, sub)]
            if rel in relative_position(objects[1].bbox, objects[0].bbox):
                break
    else:  # color_attr
        a, b = (str(x) for x in rng.choice(shapes, size=2, replace=False))
        ca, cb = (str(x) for x in rng.choice(colors, size=2, replace=False))
        spec = {
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"{object_phrase(a, ca)} and {object_phrase(b, cb)}",
        }
        objects = [obj(c, s, col) for c, s, col in zip(_cells(rng, 2), (a, b), (ca, cb))]
    return {"tag": tag, **spec}, Scene(tuple(objects), bg, None)


def _dense(rng: np.random.Generator, cfg: WorldConfig) -> tuple[dict[str, Any], Scene]:
    bg = sample_background(rng, cfg)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = tuple(make_object(rng, cfg, c, bg.color) for c in _cells(rng, n))
    text = None
    if rng.random() < cfg.text_prob:
        color = str(rng.choice([c for c in cfg.colors if c != bg.color]))
        text = place_text(rng, objects, random_text(rng), color)
    scene = Scene(objects, bg, text)
    return dense_spec(scene), scene


def dense_spec(scene: Scene) -> dict[str, Any]:
    """The exhaustive spec (and DPG-like prompt) describing every object, the background and the text."""
    include = [
        {"class": o.shape, "count": 1, "color": o.color, "size": o.size, "cell": list(o.cell)}
        for o in scene.objects
    ]
    spec: dict[str, Any] = {
        "tag": "dense",
        "include": include,
        "exact_count": len(scene.objects),
        "background": {"color": scene.background.color, "texture": scene.background.texture},
        "prompt": detailed_caption(scene),
    }
    if scene.text is not None:
        spec["text"] = {"text": scene.text.text, "color": scene.text.color}
    return spec


def short_caption(scene: Scene) -> str:
    """One sentence: the objects by colour and shape, and the background colour."""
    parts = [object_phrase(o.shape, o.color) for o in scene.objects]
    objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f", with the text {scene.text.text}" if scene.text is not None else ""
    return (
        f"{objs[0].upper()}{objs[1:]} on {article(scene.background.color)} "
        f"{scene.background.color} background{text}."
    )


def detailed_caption(scene: Scene) -> str:
    """Every object with size, colour and cell, the textured background and the text's colour and place."""
    s = [f"{background_phrase(scene)[0].upper()}{background_phrase(scene)[1:]}."]
    for o in scene.objects:
        p = object_phrase(o.shape, o.color, o.size)
        s.append(f"{p[0].upper()}{p[1:]} {cell_phrase(o.cell)}.")
    if scene.text is not None:
        s.append(
            f"The text {scene.text.text} is written in {scene.text.color} {cell_phrase(scene.text.cell)}."
        )
    return " ".join(s)
