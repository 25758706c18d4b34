"""Scene graphs of ShapesWorld and how to sample them from a seed.

A scene is resolution-free: positions are fractions of the canvas, so one graph renders at 64, 128,
256 or 512 px. Objects sit one per cell of a 3x3 grid, jittered inside their cell with a margin, so
they never overlap and never touch. Text, when present, is placed on a 64 x 64 "font grid" (one font
pixel is ``resolution // 64`` canvas pixels) in a cell no object uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .glyphs import text_extent
from .palette import (
    BACKGROUND_COLORS,
    CELL_NAMES,
    OBJECT_COLORS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    TEXTURES,
    WORDS,
)

CELL_FILL = 0.88
"""Objects stay inside this central fraction of their cell, leaving a gap of >= 12% of a cell."""
FONT_GRID = 64
ALL_CELLS: tuple[tuple[int, int], ...] = tuple(CELL_NAMES)


@dataclass(frozen=True)
class ShapeObject:
    """One object. center: (x, y) as fractions of the canvas; cell: (col, row) of the 3x3 grid."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    center: tuple[float, float]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
        if self.color not in OBJECT_COLORS:
            raise ValueError(f"unknown object colour {self.color!r}; known: {tuple(OBJECT_COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known: {SIZES}")
        if tuple(self.cell) not in CELL_NAMES:
            raise ValueError(f"cell must be (col, row) with entries in 0..2, got {self.cell}")

    @property
    def extent(self) -> float:
        """Side of the object's box as a fraction of the canvas."""
        return SIZE_FRACTION[self.size] / 3.0

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions of the canvas."""
        h = self.extent / 2
        return (self.center[0] - h, self.center[1] - h, self.center[0] + h, self.center[1] + h)

    @property
    def where(self) -> str:
        return CELL_NAMES[self.cell]


@dataclass(frozen=True)
class Background:
    """Background: a base colour and a texture. period is in 1/128ths of the canvas; seed drives noise."""

    color: str = "gray"
    texture: str = "flat"
    period: int = 6
    orientation: str = "vertical"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.color not in BACKGROUND_COLORS:
            raise ValueError(f"unknown background colour {self.color!r}; known: {tuple(BACKGROUND_COLORS)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; known: {TEXTURES}")
        if self.period < 4:
            raise ValueError(f"texture period must be >= 4 (1/128ths of the canvas), got {self.period}")
        if self.orientation not in ("vertical", "horizontal", "diagonal"):
            raise ValueError(f"unknown stripe orientation {self.orientation!r}")


@dataclass(frozen=True)
class TextItem:
    """Text written on the canvas. origin: top-left corner on the 64 x 64 font grid."""

    text: str
    color: str
    origin: tuple[int, int]

    def __post_init__(self) -> None:
        if self.color not in OBJECT_COLORS:
            raise ValueError(f"unknown text colour {self.color!r}")
        w, h = text_extent(self.text)  # also validates the characters
        x, y = self.origin
        if x < 0 or y < 0 or x + w > FONT_GRID or y + h > FONT_GRID:
            raise ValueError(f"text {self.text!r} at {self.origin} does not fit the {FONT_GRID}-grid")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        w, h = text_extent(self.text)
        x, y = self.origin
        return (x / FONT_GRID, y / FONT_GRID, (x + w) / FONT_GRID, (y + h) / FONT_GRID)

    @property
    def cell(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.bbox
        return (min(int((x0 + x1) / 2 * 3), 2), min(int((y0 + y1) / 2 * 3), 2))


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: Background = field(default_factory=Background)
    text: TextItem | None = None

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        for o in self.objects:
            if o.color == self.background.color:
                raise ValueError(f"object {o.shape} has the background's colour {o.color!r}")
        if self.text is not None and self.text.color == self.background.color:
            raise ValueError(f"text has the background's colour {self.text.color!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": [
                {**asdict(o), "cell": list(o.cell), "center": [float(c) for c in o.center]}
                for o in self.objects
            ],
            "background": asdict(self.background),
            "text": None if self.text is None else {**asdict(self.text), "origin": list(self.text.origin)},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = tuple(
            ShapeObject(o["shape"], o["color"], o["size"], tuple(o["cell"]), tuple(o["center"]))
            for o in d["objects"]
        )
        t = d.get("text")
        text = None if t is None else TextItem(t["text"], t["color"], tuple(t["origin"]))
        return cls(objs, Background(**d["background"]), text)


@dataclass(frozen=True)
class WorldConfig:
    """Which parts of the vocabulary a world uses and how busy its scenes are."""

    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(OBJECT_COLORS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUND_COLORS)
    textures: tuple[str, ...] = TEXTURES
    min_objects: int = 1
    max_objects: int = 4
    text_prob: float = 0.3

    def __post_init__(self) -> None:
        for name, got, known in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, tuple(OBJECT_COLORS)),
            ("backgrounds", self.backgrounds, tuple(BACKGROUND_COLORS)),
            ("textures", self.textures, TEXTURES),
        ):
            bad = [x for x in got if x not in known]
            if bad or not got:
                raise ValueError(f"WorldConfig.{name} has unknown or no entries {bad or got}; known: {known}")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 9, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.0 <= self.text_prob <= 1.0:
            raise ValueError(f"text_prob must be in [0, 1], got {self.text_prob}")


def jitter_center(rng: np.random.Generator, cell: tuple[int, int], size: str) -> tuple[float, float]:
    """A centre inside ``cell`` such that the object stays in the cell's central CELL_FILL part."""
    slack = max(CELL_FILL - SIZE_FRACTION[size], 0.0) / 2  # in cells
    dx, dy = rng.uniform(-slack, slack, size=2)
    # Round to 1/4096 of the canvas: exact binary fractions keep the scene json-exact.
    return (round(((cell[0] + 0.5 + dx) / 3) * 4096) / 4096, round(((cell[1] + 0.5 + dy) / 3) * 4096) / 4096)


def make_object(
    rng: np.random.Generator,
    cfg: WorldConfig,
    cell: tuple[int, int],
    bg_color: str,
    shape: str | None = None,
    color: str | None = None,
    size: str | None = None,
) -> ShapeObject:
    """An object in ``cell`` with the given attributes, drawing the unspecified ones from ``cfg``."""
    shape = shape or str(rng.choice(cfg.shapes))
    if color is None:
        color = str(rng.choice([c for c in cfg.colors if c != bg_color]))
    size = size or str(rng.choice(SIZES))
    return ShapeObject(shape, color, size, cell, jitter_center(rng, cell, size))


def sample_background(rng: np.random.Generator, cfg: WorldConfig, avoid: tuple[str, ...] = ()) -> Background:
    """A background whose colour is none of ``avoid`` (falls back to all of cfg.backgrounds)."""
    colors = [c for c in cfg.backgrounds if c not in avoid] or list(cfg.backgrounds)
    return Background(
        color=str(rng.choice(colors)),
        texture=str(rng.choice(cfg.textures)),
        period=int(rng.choice([4, 6, 8])),
        orientation=str(rng.choice(["vertical", "horizontal", "diagonal"])),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def random_text(rng: np.random.Generator) -> str:
    """A word from palette.WORDS or a number of 1-3 digits (half the time each)."""
    if rng.random() < 0.5:
        return str(rng.choice(WORDS))
    digits = int(rng.integers(1, 4))
    return str(int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits)))


def place_text(
    rng: np.random.Generator, objects: tuple[ShapeObject, ...], text: str, color: str
) -> TextItem | None:
    """Place ``text`` centred in a free cell without touching any object; None when nothing fits."""
    w, h = text_extent(text)
    used = {o.cell for o in objects}
    free = [c for c in ALL_CELLS if c not in used]
    for k in rng.permutation(len(free)):
        col, row = free[int(k)]
        gx = int(np.clip(round((col + 0.5) / 3 * FONT_GRID - w / 2), 1, FONT_GRID - 1 - w))
        gy = int(np.clip(round((row + 0.5) / 3 * FONT_GRID - h / 2), 1, FONT_GRID - 1 - h))
        item = TextItem(text, color, (gx, gy))
        if all(not boxes_overlap(item.bbox, o.bbox, margin=2 / FONT_GRID) for o in objects) and item.cell == (
            col,
            row,
        ):
            return item
    return None


def boxes_overlap(a: tuple[float, ...], b: tuple[float, ...], margin: float) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def sample_scene(seed: int | np.random.Generator, cfg: WorldConfig | None = None) -> Scene:
    """A random scene; the same seed gives the same scene everywhere.

    Args:
        seed: an int (a fresh numpy Generator is made from it) or a Generator to draw from.
        cfg: the world's vocabulary and scene sizes (default WorldConfig()).
    """
    cfg = cfg or WorldConfig()
    rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
    bg = sample_background(rng, cfg)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = [ALL_CELLS[int(i)] for i in rng.choice(9, size=n, replace=False)]
    objects = tuple(make_object(rng, cfg, c, bg.color) for c in cells)
    text = None
    if rng.random() < cfg.text_prob:
        color = str(rng.choice([c for c in cfg.colors if c != bg.color]))
        text = place_text(rng, objects, random_text(rng), color)
    return Scene(objects, bg, text)


def with_objects(scene: Scene, objects: tuple[ShapeObject, ...]) -> Scene:
    """The scene with its objects replaced (text kept; validated again)."""
    return replace(scene, objects=tuple(objects))
