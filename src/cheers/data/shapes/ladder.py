"""The learnability ladder: ShapesWorld sub-worlds from "one colour fills the image" up to the full world.

Each rung is a generator of text-to-image samples and a judge for what a model draws from their prompts:

* ``L0`` the background colour alone: "A plain red background." over a solid image in one of the nine palette
  colours (the eight object colours and gray). Judged by the colour nearest the image's mean.
* ``L1`` one large object, colour and shape, on a flat background: "A plain gray background. A large red
  circle." Judged by the ShapesWorld parser: the object's shape and colour and the background colour.
* ``L2`` two objects, counts and positions on flat backgrounds (GenEval's two_object / counting / position
  tags with the background named). Judged by the GenEval-style spec plus the background colour.
* ``L3`` the full world: the generation samples the bundled model is trained on (random textures, dense
  prompts). Judged by their spec.

A conditional generator that works learns L0 in minutes; one that ignores its prompt scores chance there
(1/9). Every sample is a deterministic function of (rung, seed); the training and held-out seeds are the
ShapesWorld splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .judge import parse_image
from .palette import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES
from .prompts import GEN_SUFFIX, object_phrase, sample_generation
from .render import check_resolution, render_scene
from .samples import IMAGE_OUT, _sentence, make_sample
from .scoring import score_spec
from .world import Background, Scene, WorldConfig, make_object

RUNGS: tuple[str, ...] = ("L0", "L1", "L2", "L3")
RUNG_TITLES = {
    "L0": "background colour alone",
    "L1": "one large object (colour + shape), flat background",
    "L2": "two objects, counts, positions, flat background",
    "L3": "the full world",
}
L0_COLORS: dict[str, tuple[int, int, int]] = {**OBJECT_COLORS, "gray": BACKGROUND_COLORS["gray"]}
"""The nine palette colours an L0 image can have."""
L2_TAGS = ("two_object", "counting", "position")
FLAT = WorldConfig(textures=("flat",))


@dataclass(frozen=True)
class RungSample:
    """One text-to-image sample of a rung: the prompt as trained (``record``), its image and its spec."""

    prompt: str  # the description, without the generation suffix
    image: Image.Image
    spec: dict[str, Any]

    @property
    def record(self) -> dict[str, Any]:
        """The release-format conversation the trainer reads."""
        return {
            "conversations": [
                {"from": "human", "value": self.prompt + GEN_SUFFIX},
                {"from": "gpt", "value": IMAGE_OUT},
            ]
        }


def rung_sample(
    rung: str,
    seed: int,
    resolution: int = 128,
    zoom: float | tuple[float, float] = 1.0,
    short: bool = False,
) -> RungSample:
    """The sample of ``rung`` for ``seed`` (same arguments, same sample).

    Args:
        zoom: L1 / L2: show the scene magnified by this factor, or by a factor drawn uniformly from
            ``(lo, hi)`` per sample; the prompt is unchanged. At 1 an L1 object spans ~1/4 of the image side
            (~5 % of its area at most), so the loss that its colour and shape explain is small; zooming
            enlarges that share. L1 shows the centre (its object is always in the centre cell); L2 shows
            the box around its objects, the factor capped so that every object stays whole in view (with a
            margin of ``ZOOM_MARGIN``), so counts and left/right/above/below relations still hold.
        short: L1 / L2 only: the prompt without its background sentence (and L1's without "large"), in
            ShapesGenEval's own form ("A red circle.", "Two blue squares."); the image is the same, its
            background colour then unnamed (and not judged). A model trained only on the long form reads
            the background sentence and may never learn to read a prompt that lacks it.
    """
    check_short(rung, short)
    rng = np.random.default_rng([int(seed), 7919, RUNGS.index(check_rung(rung))])
    factor = zoom_factor(rung, zoom, seed)
    if rung != "L0":  # solid colours need no renderer; any size the model takes (a multiple of 32) works
        check_resolution(resolution)
    if rung == "L0":
        names = list(L0_COLORS)
        color = names[int(rng.integers(len(names)))]
        image = Image.new("RGB", (resolution, resolution), L0_COLORS[color])
        return RungSample(f"A plain {color} background.", image, {"background": {"color": color}})
    if rung == "L1":
        bg = str(rng.choice(list(BACKGROUND_COLORS)))
        shape = str(rng.choice(SHAPES))
        color = str(rng.choice([c for c in OBJECT_COLORS if c != bg]))
        obj = make_object(rng, FLAT, (1, 1), bg, shape=shape, color=color, size="large")
        scene = Scene((obj,), Background(bg, "flat", 4, "vertical", 0), None)
        spec = {"include": [{"class": shape, "count": 1, "color": color}], "exact_count": 1}
        if short:
            prompt = _sentence(object_phrase(shape, color))
        else:
            spec["background"] = {"color": bg}
            prompt = f"A plain {bg} background. {_sentence(object_phrase(shape, color, 'large'))}"
        return RungSample(prompt, _render_zoomed(scene, resolution, factor), spec)
    if rung == "L2":
        tag = str(rng.choice(L2_TAGS))
        spec, scene = sample_generation(rng, tag, FLAT)
        image = _render_zoomed(scene, resolution, *objects_view(scene, factor))
        if short:
            return RungSample(_sentence(spec["prompt"]), image, spec)
        bg = scene.background.color
        spec = {**spec, "background": {"color": bg}}
        prompt = f"A plain {bg} background. {_sentence(spec['prompt'])}"
        return RungSample(prompt, image, spec)
    sample = make_sample(int(seed), "generation", resolution=resolution)
    prompt = sample["conversations"][0]["value"].removesuffix(GEN_SUFFIX)
    return RungSample(prompt, sample["images"][0], sample["spec"])


MAX_ZOOM = 2.8
"""An L1 object (0.74 of a cell, its centre within 0.07 cells of the middle) stays whole up to ~3x."""

ZOOM_RUNGS = ("L1", "L2")
"""The rungs that can be magnified (objects on a flat background)."""

ZOOM_MARGIN = 0.04
"""The canvas fraction kept on each side of L2's objects when the view is magnified."""


def zoom_factor(rung: str, zoom: float | tuple[float, float] | list[float], seed: int) -> float:
    """The magnification of ``rung``'s sample ``seed`` for a ``zoom`` setting (raises on a bad setting)."""
    lo, hi = (float(zoom), float(zoom)) if isinstance(zoom, (int, float)) else (float(z) for z in zoom)
    if not 1.0 <= lo <= hi <= MAX_ZOOM:
        raise ValueError(f"zoom must be a factor or a (lo, hi) range within [1, {MAX_ZOOM}], got {zoom!r}")
    if hi > 1.0 and rung not in ZOOM_RUNGS:
        raise ValueError(f"zoom applies to rungs L1 and L2 (objects on a flat background), not {rung!r}")
    if lo == hi:
        return lo
    return float(np.random.default_rng([int(seed), 7919, 101]).uniform(lo, hi))


def objects_view(scene: Scene, factor: float) -> tuple[float, tuple[float, float]]:
    """The magnification (``factor`` at most) and the view's centre (canvas fractions) that keep every object
    of ``scene`` whole in view, ``ZOOM_MARGIN`` from the view's edge: the view is centred on the objects' box
    and moved back inside the canvas where it would leave it."""
    if factor == 1.0:
        return 1.0, (0.5, 0.5)
    boxes = np.array([o.bbox for o in scene.objects])
    x0, y0 = np.clip(boxes[:, :2].min(0) - ZOOM_MARGIN, 0.0, 1.0)
    x1, y1 = np.clip(boxes[:, 2:].max(0) + ZOOM_MARGIN, 0.0, 1.0)
    factor = float(max(1.0, min(factor, 1.0 / max(x1 - x0, y1 - y0))))
    half = 0.5 / factor
    centre = (float(np.clip((x0 + x1) / 2, half, 1 - half)), float(np.clip((y0 + y1) / 2, half, 1 - half)))
    return factor, centre


def _render_zoomed(
    scene: Scene, resolution: int, factor: float, centre: tuple[float, float] = (0.5, 0.5)
) -> Image.Image:
    """The view of ``scene`` around ``centre`` (canvas fractions), ``factor`` times magnified, at
    ``resolution`` (rendered larger, then cropped)."""
    if factor == 1.0:
        return render_scene(scene, resolution)
    big = -(-int(np.ceil(resolution * factor)) // 64) * 64  # a renderable side covering the zoomed view
    side = big / factor
    left, top = centre[0] * big - side / 2, centre[1] * big - side / 2
    image = render_scene(scene, big)
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BILINEAR)


SHORT_RUNGS = ("L1", "L2")
"""The rungs whose prompts have a short form (no background sentence)."""


def check_short(rung: str | None, short: bool) -> None:
    if short and rung not in SHORT_RUNGS:
        raise ValueError(f"short prompts are a form of rungs L1 and L2, not {rung!r}")


def check_rung(rung: str) -> str:
    if rung not in RUNGS:
        raise ValueError(f"unknown ladder rung {rung!r}; choose one of {RUNGS}")
    return rung


def nearest_palette_color(image: Image.Image | np.ndarray) -> str:
    """The L0 palette colour nearest (RGB distance) to the image's mean colour."""
    mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
    names = list(L0_COLORS)
    dist = ((np.array([L0_COLORS[n] for n in names], dtype=np.float32) - mean) ** 2).sum(-1)
    return names[int(np.argmin(dist))]


def judge(rung: str, image: Image.Image, spec: dict[str, Any]) -> tuple[bool, str]:
    """(does ``image`` satisfy ``spec``?, what the judge read)."""
    if check_rung(rung) == "L0":
        got = nearest_palette_color(image)
        return got == spec["background"]["color"], got
    parsed = parse_image(image)
    result = score_spec(parsed, spec)
    seen = ", ".join(f"{o.color} {o.shape}" for o in parsed.objects) or "no objects"
    return result.correct, f"{parsed.background} bg; {seen}"
