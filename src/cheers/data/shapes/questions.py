"""Questions with answers about a scene (ShapesVQA) and the text-only samples.

Question types: color, background, count, exists (yes/no, POPE-style: every "yes" question comes with
a "no" one about an absent colour/shape pair), where, relation (yes/no, balanced), ocr (read the text),
multiple_choice (MMBench-style A/B/C/D). Only unambiguous questions are asked: an object is referred
to by a description no other object in the scene shares.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .palette import CELL_NAMES, NUMBER_WORDS, OBJECT_COLORS, SHAPES, plural
from .prompts import object_phrase
from .world import Scene, ShapeObject

QUESTION_TYPES: tuple[str, ...] = (
    "color",
    "background",
    "count",
    "exists",
    "where",
    "relation",
    "ocr",
    "multiple_choice",
)
YES_NO_TYPES: tuple[str, ...] = ("exists", "relation")
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def referring_phrase(o: ShapeObject, unique_shape: bool) -> str:
    return f"the {o.shape}" if unique_shape else f"the {o.color} {o.shape}"


def referable_objects(scene: Scene) -> list[tuple[ShapeObject, bool]]:
    """Objects with a unique description, and whether the shape alone already names them."""
    shapes = Counter(o.shape for o in scene.objects)
    pairs = Counter((o.shape, o.color) for o in scene.objects)
    return [(o, shapes[o.shape] == 1) for o in scene.objects if pairs[(o.shape, o.color)] == 1]


def scene_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    """All question types that apply to ``scene``, one question each (two for exists: yes and no).

    Returns:
        dicts {"type", "question", "answer"} (+ "choices" for multiple_choice).
    """
    qs: list[dict[str, Any]] = []
    ref = referable_objects(scene)
    colors = [c for c in OBJECT_COLORS if c != scene.background.color]
    if ref:
        o, uniq = ref[int(rng.integers(len(ref)))]
        if uniq:
            qs.append(_q("color", f"What color is {referring_phrase(o, True)}?", o.color))
        qs.append(_q("where", f"Where is {referring_phrase(o, uniq)}?", CELL_NAMES[o.cell]))
        if uniq:
            options = [o.color, *rng.choice([c for c in colors if c != o.color], size=3, replace=False)]
            order = rng.permutation(4)
            choices = [str(options[int(i)]) for i in order]
            letter = "ABCD"[choices.index(o.color)]
            body = "\n".join(f"{L}. {c}" for L, c in zip("ABCD", choices))
            qs.append(
                {
                    **_q("multiple_choice", f"What color is the {o.shape}?\n{body}{MC_SUFFIX}", letter),
                    "choices": choices,
                }
            )
    qs.append(_q("background", "What color is the background?", scene.background.color))
    shape = str(rng.choice(SHAPES))
    n = sum(x.shape == shape for x in scene.objects)
    qs.append(_q("count", f"How many {plural(shape)} are there?", str(n)))
    present = {(x.shape, x.color) for x in scene.objects}
    yes = scene.objects[int(rng.integers(len(scene.objects)))]
    qs.append(_q("exists", f"Is there {object_phrase(yes.shape, yes.color)}?", "yes"))
    absent = [(s, c) for s in SHAPES for c in colors if (s, c) not in present]
    # POPE's adversarial flavour: half the negatives share a shape with something in the scene.
    near = [p for p in absent if p[0] == yes.shape]
    pool = near if near and rng.random() < 0.5 else absent
    s, c = pool[int(rng.integers(len(pool)))]
    qs.append(_q("exists", f"Is there {object_phrase(s, c)}?", "no"))
    if len(ref) >= 2:
        i, j = rng.choice(len(ref), size=2, replace=False)
        (a, ua), (b, ub) = ref[int(i)], ref[int(j)]
        rel = _cell_relation(a, b, rng)
        if rel is not None:
            text, truth = rel
            qs.append(
                _q(
                    "relation",
                    f"Is {referring_phrase(a, ua)} {text} {referring_phrase(b, ub)}?",
                    "yes" if truth else "no",
                )
            )
    if scene.text is not None:
        qs.append(_q("ocr", "What does the text say?", scene.text.text))
    return qs


def _q(kind: str, question: str, answer: str) -> dict[str, Any]:
    return {"type": kind, "question": question, "answer": answer}


def _cell_relation(a: ShapeObject, b: ShapeObject, rng: np.random.Generator) -> tuple[str, bool] | None:
    """A relation phrase about a vs b decided by grid cells, true or false with equal odds."""
    opts = []
    if a.cell[0] != b.cell[0]:
        opts.append(("left of", "right of") if a.cell[0] < b.cell[0] else ("right of", "left of"))
    if a.cell[1] != b.cell[1]:
        opts.append(("above", "below") if a.cell[1] < b.cell[1] else ("below", "above"))
    if not opts:
        return None
    true_rel, false_rel = opts[int(rng.integers(len(opts)))]
    return (true_rel, True) if rng.random() < 0.5 else (false_rel, False)


def text_only_sample(rng: np.random.Generator) -> tuple[str, str]:
    """A (question, answer) pair needing no image: shape facts, palette facts, arithmetic on counts."""
    kind = int(rng.integers(5))
    if kind == 0:
        s = str(rng.choice(["triangle", "square"]))
        return f"How many corners does a {s} have?", {"triangle": "3", "square": "4"}[s]
    if kind == 1:
        s1, s2 = (str(x) for x in rng.choice(SHAPES, size=2, replace=False))
        a, b = (int(x) for x in rng.integers(1, 5, size=2))
        return (
            f"There are {NUMBER_WORDS[a]} {plural(s1) if a > 1 else s1} and {NUMBER_WORDS[b]} "
            f"{plural(s2) if b > 1 else s2}. How many shapes are there in total?",
            str(a + b),
        )
    if kind == 2:
        c = str(rng.choice(list(OBJECT_COLORS)))
        s1, s2 = (str(x) for x in rng.choice(SHAPES, size=2, replace=False))
        words = [c, s1, s2]
        order = [words[int(i)] for i in rng.permutation(3)]
        return f"Which of these words is a color: {', '.join(order)}?", c
    if kind == 3:
        rel = str(rng.choice(["left", "right", "above", "below", "top", "bottom"]))
        opposite = {
            "left": "right",
            "right": "left",
            "above": "below",
            "below": "above",
            "top": "bottom",
            "bottom": "top",
        }
        return f"What is the opposite of {rel}?", opposite[rel]
    a, b = (int(x) for x in rng.integers(0, 5, size=2))
    return f"What is {a} plus {b}?", str(a + b)
