"""A new word for one fixed ShapesWorld concept: what a small LoRA can teach the bundled model, measurably.

A :class:`Concept` names a made-up word ("wug", which no ShapesWorld text contains) and the one thing it
means: a single object of a fixed shape, colour and size in the centre cell, on a flat background of a fixed
colour (jittered inside its cell per seed). Samples, each a deterministic function of (concept, kind, seed):

* generation: "A wug." (and three other phrasings) -> a render of the concept;
* understanding: the concept's image with "What is this?" -> "a wug", or "Is this a wug?" -> "yes"; a
  non-concept image (one large object on a flat background, half of them differing from the concept in a
  single attribute) with "Is this a wug?" -> "no".

The judges are ShapesWorld's: an image shows the concept when the scene parser reads exactly one object of the
concept's shape and colour on its background (:meth:`Concept.spec` through :func:`score_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .palette import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, SIZES
from .prompts import GEN_SUFFIX, article
from .render import check_resolution, render_scene
from .samples import IMAGE_IN, IMAGE_OUT
from .world import Background, Scene, WorldConfig, make_object

GEN_TEMPLATES = ("{A} {word}.", "Draw {a} {word}.", "A picture of {a} {word}.", "Show me {a} {word}.")
WHAT_QUESTION = "What is this?"
FLAT = WorldConfig(textures=("flat",))
CENTER = (1, 1)


@dataclass(frozen=True)
class Concept:
    """A word and the fixed scene it names (see the module docstring)."""

    word: str = "wug"
    shape: str = "star"
    color: str = "purple"
    background: str = "black"
    size: str = "large"

    def __post_init__(self) -> None:
        if not (self.word.isascii() and self.word.isalpha() and self.word.islower()):
            raise ValueError(f"a concept word must be lowercase ASCII letters, got {self.word!r}")
        for name, value, known in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, tuple(OBJECT_COLORS)),
            ("background", self.background, tuple(BACKGROUND_COLORS)),
            ("size", self.size, SIZES),
        ):
            if value not in known:
                raise ValueError(f"concept {name} {value!r} is not one of {known}")
        if self.color == self.background:
            raise ValueError(f"the concept's colour and background are both {self.color!r}")

    @property
    def phrase(self) -> str:
        """'a wug'."""
        return f"{article(self.word)} {self.word}"

    @property
    def question(self) -> str:
        return f"Is this {self.phrase}?"

    def prompt(self, template: str = GEN_TEMPLATES[0]) -> str:
        a = article(self.word)
        return template.format(A=a.capitalize(), a=a, word=self.word)

    def spec(self) -> dict[str, Any]:
        """What the judge checks (a GenEval-style spec with the background, as the ladder's L1 rung)."""
        return {
            "include": [{"class": self.shape, "count": 1, "color": self.color}],
            "exact_count": 1,
            "background": {"color": self.background},
        }

    def scene(self, rng: np.random.Generator) -> Scene:
        obj = make_object(
            rng, FLAT, CENTER, self.background, shape=self.shape, color=self.color, size=self.size
        )
        return Scene((obj,), Background(self.background, "flat", 4, "vertical", 0), None)

    def other_scene(self, rng: np.random.Generator) -> Scene:
        """One large object on a flat background that is not the concept: half of them differ in exactly one
        of shape, colour and background (near misses), the rest anywhere."""
        shape, color, bg = self.shape, self.color, self.background
        if rng.random() < 0.5:
            which = int(rng.integers(3))
            if which == 0:
                shape = str(rng.choice([s for s in SHAPES if s != self.shape]))
            elif which == 1:
                color = str(rng.choice([c for c in OBJECT_COLORS if c not in (self.color, bg)]))
            else:
                bg = str(rng.choice([b for b in BACKGROUND_COLORS if b not in (self.background, color)]))
        else:
            while (shape, color, bg) == (self.shape, self.color, self.background):
                bg = str(rng.choice(list(BACKGROUND_COLORS)))
                shape = str(rng.choice(SHAPES))
                color = str(rng.choice([c for c in OBJECT_COLORS if c != bg]))
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        obj = make_object(rng, FLAT, cell, bg, shape=shape, color=color, size="large")
        return Scene((obj,), Background(bg, "flat", 4, "vertical", 0), None)


def concept_sample(concept: Concept, kind: str, seed: int, resolution: int = 128) -> dict[str, Any]:
    """The ``kind`` ("generation" or "understanding") sample of ``seed``, in the release's record form with
    its images (as :func:`cheers.data.shapes.make_sample` returns them)."""
    check_resolution(resolution)
    if kind not in ("generation", "understanding"):
        raise ValueError(f"a concept source makes generation or understanding samples, not {kind!r}")
    rng = np.random.default_rng([int(seed), 0xC0C, 0 if kind == "generation" else 1])
    if kind == "generation":
        prompt = concept.prompt(GEN_TEMPLATES[int(rng.integers(len(GEN_TEMPLATES)))])
        image = render_scene(concept.scene(rng), resolution)
        convs = [_turn("human", prompt + GEN_SUFFIX), _turn("gpt", IMAGE_OUT)]
        spec: dict[str, Any] = concept.spec()
    else:
        which = int(rng.integers(3))
        if which == 2:
            image = render_scene(concept.other_scene(rng), resolution)
            question, answer = concept.question, "no"
        else:
            image = render_scene(concept.scene(rng), resolution)
            question, answer = (WHAT_QUESTION, concept.phrase) if which == 0 else (concept.question, "yes")
        convs = [_turn("human", f"{IMAGE_IN}\n{question}"), _turn("gpt", answer)]
        spec = {"question": question, "answer": answer}
    return {
        "id": f"concept-{concept.word}-{kind}-{seed}",
        "kind": kind,
        "conversations": convs,
        "images": [image],
        "spec": spec,
        "seed": int(seed),
    }


def concept_images(concept: Concept, seeds: range | list[int], resolution: int = 128) -> list[Image.Image]:
    """Renders of the concept (one per seed, jittered as in training)."""
    return [render_scene(concept.scene(np.random.default_rng([int(s), 0xC0C, 2])), resolution) for s in seeds]


def other_images(concept: Concept, seeds: range | list[int], resolution: int = 128) -> list[Image.Image]:
    """Renders of non-concept scenes (one per seed)."""
    return [
        render_scene(concept.other_scene(np.random.default_rng([int(s), 0xC0C, 3])), resolution)
        for s in seeds
    ]


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}
