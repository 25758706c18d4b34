"""The closed vocabulary of ShapesWorld: shapes, colours, sizes, grid cells, textures and words.

Every other ShapesWorld module names things through these constants, so the renderer, the text
generators and the judge can never disagree about what "orange" or "top left" means.
"""

from __future__ import annotations

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
"""All shapes the renderer and the judge know; a world may use a prefix of them (see WorldConfig)."""

OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (250, 230, 30),
    "green": (30, 175, 45),
    "blue": (30, 60, 230),
    "purple": (160, 40, 235),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
"""Object and text colours (sRGB). The minimum pairwise distance is ~105, so blur, noise and JPEG
leave an object's core nearest to its own colour."""

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
"""Background base colours. An object never shares its scene's background colour."""

TEXTURES: tuple[str, ...] = ("flat", "stripes", "checkerboard", "noise", "dots")

SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION: dict[str, float] = {"small": 0.48, "large": 0.74}
"""Object extent as a fraction of a grid cell's side (a cell is a third of the canvas)."""

COLS: tuple[str, ...] = ("left", "center", "right")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")

CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (1, 0): "top center",
    (2, 0): "top right",
    (0, 1): "middle left",
    (1, 1): "center",
    (2, 1): "middle right",
    (0, 2): "bottom left",
    (1, 2): "bottom center",
    (2, 2): "bottom right",
}
"""Grid cell (col, row) -> phrase, col 0 = left, row 0 = top."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

WORDS: tuple[str, ...] = (
    "CAT",
    "DOG",
    "SUN",
    "SKY",
    "BOX",
    "ZOO",
    "HI",
    "GO",
    "OK",
    "YES",
    "NO",
    "TOP",
    "STOP",
    "RED",
    "MAP",
    "JAM",
    "FOX",
    "KEY",
    "WAVE",
    "QUIZ",
    "EXIT",
    "OPEN",
    "BUS",
    "VAN",
)
"""Words that can be written in a scene (digits strings of 1-3 digits are drawn too)."""

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)


def plural(shape: str) -> str:
    """English plural of a shape name ("cross" -> "crosses")."""
    return shape + ("es" if shape.endswith("s") else "s")


def nearest_color(rgb: np.ndarray, names: tuple[str, ...] | None = None) -> str:
    """Name of the object/background colour nearest (Euclidean, sRGB 0..255) to ``rgb``.

    Args:
        rgb: (3,) colour in 0..255.
        names: candidate names (keys of OBJECT_COLORS or BACKGROUND_COLORS); all colours by default.
    """
    table = {**BACKGROUND_COLORS, **OBJECT_COLORS}
    cands = names if names is not None else tuple(table)
    ref = np.array([table[n] for n in cands], dtype=np.float64)  # (K, 3)
    d = ((ref - np.asarray(rgb, dtype=np.float64)[None]) ** 2).sum(axis=1)
    return cands[int(np.argmin(d))]


def color_rgb(name: str) -> tuple[int, int, int]:
    """RGB of an object or background colour name; raises ValueError naming unknown colours."""
    if name in OBJECT_COLORS:
        return OBJECT_COLORS[name]
    if name in BACKGROUND_COLORS:
        return BACKGROUND_COLORS[name]
    raise ValueError(f"unknown colour {name!r}; known: {sorted({**OBJECT_COLORS, **BACKGROUND_COLORS})}")
