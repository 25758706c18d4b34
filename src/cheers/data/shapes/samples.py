"""One training sample from one seed, in the release's conversation form.

A sample is a dict::

    {"id": "shapes-generation-17", "kind": "understanding" | "generation" | "editing" | "text",
     "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...],
     "images": [PIL.Image, ...],   # in order of appearance; editing: [source, target]
     "spec": {...} | None,         # what a judge needs (see below)
     "seed": 17}

spec: generation -> the GenEval-style prompt spec (prompts.py); editing -> the edit spec (edits.py);
understanding -> {"scene": scene dict, "questions": [...], "caption": str | None}; text -> None.
Markers follow the release: ``<im_start><image><im_end>`` in the human turn for an input image,
``<im_start><image_gen><im_end>`` as the gpt turn for an image to generate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .edits import sample_edit
from .prompts import GEN_SUFFIX, GENEVAL_TAGS, detailed_caption, sample_generation, short_caption
from .questions import scene_questions, text_only_sample
from .render import check_resolution, render_scene
from .world import WorldConfig, sample_scene

KINDS: tuple[str, ...] = ("understanding", "generation", "editing", "text")
IMAGE_IN = "<im_start><image><im_end>"
IMAGE_OUT = "<im_start><image_gen><im_end>"
DENSE_SHARE = 0.25
"""Share of generation prompts that are dense (the rest is spread over GenEval's six tags)."""
SPLITS: dict[str, range] = {
    "train": range(0, 1 << 30),
    "val": range(1 << 30, (1 << 30) + (1 << 20)),
    "test": range((1 << 30) + (1 << 20), (1 << 30) + (1 << 21)),
}
CAPTION_PROMPTS = {"short": "Describe the image briefly.", "detailed": "Describe the image in detail."}


@dataclass(frozen=True)
class Mix:
    """Relative weights of sample kinds; the paper's pure-text share gives 3 : 6 : 1 (editing 0)."""

    understanding: float = 3.0
    generation: float = 6.0
    text: float = 1.0
    editing: float = 0.0

    def __post_init__(self) -> None:
        w = self.weights()
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"Mix weights must be >= 0 with a positive sum, got {self}")

    def weights(self) -> tuple[float, float, float, float]:
        """Weights in KINDS order (understanding, generation, editing, text)."""
        return (self.understanding, self.generation, self.editing, self.text)

    def kind_for(self, seed: int) -> str:
        """The kind a seed draws under this mix (deterministic)."""
        w = np.asarray(self.weights(), dtype=np.float64)
        u = np.random.default_rng([seed, 0x5EED]).random()
        return KINDS[min(int(np.searchsorted(np.cumsum(w / w.sum()), u, side="right")), len(KINDS) - 1)]


def split_seeds(name: str, n: int | None = None) -> range:
    """The seeds of split ``name`` ("train", "val", "test"), optionally the first ``n``."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; known: {tuple(SPLITS)}")
    r = SPLITS[name]
    if n is None:
        return r
    if not 0 <= n <= len(r):
        raise ValueError(f"split {name!r} has {len(r)} seeds, asked for {n}")
    return r[:n]


def _sentence(prompt: str) -> str:
    p = prompt.strip()
    p = p[0].upper() + p[1:]
    return p if p.endswith(".") else p + "."


def make_sample(
    seed: int, kind: str, resolution: int = 128, world: WorldConfig | None = None, render: bool = True
) -> dict[str, Any]:
    """Build the sample of ``kind`` for ``seed`` (deterministic: same arguments, same sample).

    Args:
        seed: the sample's seed.
        kind: one of KINDS.
        resolution: image side in pixels (a multiple of 64).
        world: vocabulary and scene sizes.
        render: False leaves "images" empty (text and specs only, much faster).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; known: {KINDS}")
    check_resolution(resolution)
    world = world or WorldConfig()
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    scenes = []
    spec: dict[str, Any] | None
    if kind == "understanding":
        scene = sample_scene(rng, world)
        scenes.append(scene)
        u = rng.random()
        if u < 0.3:
            level = "short" if u < 0.15 else "detailed"
            caption = short_caption(scene) if level == "short" else detailed_caption(scene)
            convs = [_turn("human", f"{IMAGE_IN}\n{CAPTION_PROMPTS[level]}"), _turn("gpt", caption)]
            spec = {"scene": scene.to_dict(), "questions": [], "caption": caption}
        else:
            qs = scene_questions(scene, rng)
            picked = [
                qs[int(i)]
                for i in rng.choice(len(qs), size=min(len(qs), int(rng.integers(1, 4))), replace=False)
            ]
            convs = []
            for i, q in enumerate(picked):
                convs.append(_turn("human", f"{IMAGE_IN}\n{q['question']}" if i == 0 else q["question"]))
                convs.append(_turn("gpt", q["answer"]))
            spec = {"scene": scene.to_dict(), "questions": picked, "caption": None}
    elif kind == "generation":
        tag = "dense" if rng.random() < DENSE_SHARE else str(rng.choice(GENEVAL_TAGS))
        spec, scene = sample_generation(rng, tag, world)
        scenes.append(scene)
        convs = [_turn("human", _sentence(spec["prompt"]) + GEN_SUFFIX), _turn("gpt", IMAGE_OUT)]
    elif kind == "editing":
        edit = sample_edit(rng, world)
        scenes.extend([edit.source, edit.target])
        spec = edit.spec()
        convs = [_turn("human", f"{IMAGE_IN}\n{edit.instruction}"), _turn("gpt", IMAGE_OUT)]
    else:
        q, a = text_only_sample(rng)
        spec = None
        convs = [_turn("human", q), _turn("gpt", a)]
    images = [render_scene(s, resolution) for s in scenes] if render else []
    return {
        "id": f"shapes-{kind}-{seed}",
        "kind": kind,
        "conversations": convs,
        "images": images,
        "spec": spec,
        "seed": seed,
    }


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}
