"""A 5x7 bitmap font for the text written in scenes, and the template-matching reader for it.

The font is our own (no font file, no FreeType), so rendered text is bit-identical on every machine.
A glyph is drawn with square "font pixels" of side ``s = resolution // 64`` canvas pixels, aligned
to the canvas grid, which keeps text crisp at every supported resolution.
"""

from __future__ import annotations

import numpy as np

GLYPH_W, GLYPH_H, ADVANCE = 5, 7, 6
"""Glyph box in font pixels, and the horizontal advance (one blank column between glyphs)."""

_FONT: dict[str, tuple[str, ...]] = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "B": ("11110", "10001", "10001", "11110", "10001", "10001", "11110"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "D": ("11100", "10010", "10001", "10001", "10001", "10010", "11100"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "F": ("11111", "10000", "10000", "11110", "10000", "10000", "10000"),
    "G": ("01110", "10001", "10000", "10111", "10001", "10001", "01111"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "I": ("01110", "00100", "00100", "00100", "00100", "00100", "01110"),
    "J": ("00111", "00010", "00010", "00010", "00010", "10010", "01100"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "N": ("10001", "10001", "11001", "10101", "10011", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "Q": ("01110", "10001", "10001", "10001", "10101", "10010", "01101"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "S": ("01111", "10000", "10000", "01110", "00001", "00001", "11110"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "U": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    "V": ("10001", "10001", "10001", "10001", "10001", "01010", "00100"),
    "W": ("10001", "10001", "10001", "10101", "10101", "10101", "01010"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "Y": ("10001", "10001", "01010", "00100", "00100", "00100", "00100"),
    "Z": ("11111", "00001", "00010", "00100", "01000", "10000", "11111"),
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}

CHARSET: str = "".join(_FONT)


def _bitmap(ch: str) -> np.ndarray:
    rows = _FONT.get(ch)
    if rows is None:
        raise ValueError(f"character {ch!r} is not in the ShapesWorld font ({CHARSET})")
    return np.array([[c == "1" for c in r] for r in rows], dtype=bool)  # (7, 5)


GLYPHS: dict[str, np.ndarray] = {ch: _bitmap(ch) for ch in _FONT}
_TEMPLATES_Z = np.stack([GLYPHS[ch].reshape(-1) for ch in CHARSET]).astype(np.float32)  # (K, 35)
_TEMPLATES_Z -= _TEMPLATES_Z.mean(axis=1, keepdims=True)
_TEMPLATES_Z /= np.linalg.norm(_TEMPLATES_Z, axis=1, keepdims=True)  # zero-mean, unit-norm templates


def text_extent(text: str) -> tuple[int, int]:
    """(width, height) of ``text`` in font pixels; raises ValueError on empty text or unknown characters."""
    bad = sorted({c for c in text if c not in _FONT})
    if not text or bad:
        raise ValueError(f"text {text!r} is empty or has characters outside the font ({CHARSET}): {bad}")
    return ADVANCE * len(text) - 1, GLYPH_H


def text_bitmap(text: str) -> np.ndarray:
    """Boolean (7, 6*len(text) - 1) bitmap of ``text`` in font pixels; raises on unknown characters."""
    if not text:
        raise ValueError("text must be non-empty")
    w, h = text_extent(text)
    out = np.zeros((h, w), dtype=bool)
    for i, ch in enumerate(text):
        out[:, i * ADVANCE : i * ADVANCE + GLYPH_W] = _bitmap(ch)
    return out


def read_bitmap(ink: np.ndarray) -> str:
    """Read a string from an ink-coverage map cropped to the text's bounding box.

    The crop's height spans 7 font pixels, which fixes the font pixel size; the glyph count follows
    from the width. The width itself is less reliable (blur erodes short stubs such as the right end
    of "E", and "1" and "I" leave their outer columns blank), so a small search over horizontal scale,
    sub-pixel shift and a blank leading column picks the alignment closest to the templates. The font
    grid is sampled at each font pixel's centre (averaging its central half) and each glyph cell goes
    to the template it correlates with best (so faded thin strokes, e.g. K's diagonals under blur,
    still count by their pattern, not their brightness).

    Args:
        ink: (h, w) float coverage in [0, 1] (or bool), tight around the text.
    Returns:
        The decoded string ("" when the crop cannot hold a glyph).
    """
    ink = np.asarray(ink, dtype=np.float32)
    h, w = ink.shape
    if h < GLYPH_H or w < 1:
        return ""
    sy = h / GLYPH_H  # canvas pixels per font pixel, vertically
    n = max(int(round((w / sy + 1) / ADVANCE)), 1)
    cols = n * ADVANCE - 1
    best, best_cost = "", np.inf
    for blank_left in (0, 1):
        for scale in np.linspace(0.95, 1.05, 5):
            sx = sy * float(scale)
            for shift in (-0.25, 0.0, 0.25):
                grid = _sample(ink, cols, sx, sy, x_start=shift - blank_left * sx)  # (7, 6n - 1)
                cells = np.stack(
                    [grid[:, i * ADVANCE : i * ADVANCE + GLYPH_W] for i in range(n)]
                )  # (n, 7, 5)
                c = cells.reshape(n, -1)  # (n, 35)
                c = c - c.mean(axis=1, keepdims=True)
                c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-6)
                d = 1.0 - (c[:, None, :] * _TEMPLATES_Z[None]).sum(-1)  # (n, K): 1 - correlation
                cost = float(d.min(axis=1).sum())
                if cost < best_cost:
                    best, best_cost = "".join(CHARSET[int(k)] for k in d.argmin(axis=1)), cost
    return best


def _sample(ink: np.ndarray, cols: int, sx: float, sy: float, x_start: float) -> np.ndarray:
    """Mean ink over the central half of each font pixel of a (7, cols) grid starting at x_start.

    sx, sy: font pixel size in canvas pixels. Samples outside the crop count as blank. Returns (7, cols).
    """
    h, w = ink.shape
    rx, ry = max(sx * 0.25, 0.5), max(sy * 0.25, 0.5)
    ii = np.cumsum(np.cumsum(np.pad(ink, ((1, 0), (1, 0))), axis=0), axis=1)  # (h+1, w+1)
    ys = (np.arange(GLYPH_H) + 0.5) * sy
    xs = x_start + (np.arange(cols) + 0.5) * sx
    y0 = np.clip(np.floor(ys - ry).astype(int), 0, h)
    y1 = np.clip(np.ceil(ys + ry).astype(int), 0, h)
    x0 = np.clip(np.floor(xs - rx).astype(int), 0, w)
    x1 = np.clip(np.ceil(xs + rx).astype(int), 0, w)
    area = (np.ceil(ys + ry) - np.floor(ys - ry))[:, None] * (np.ceil(xs + rx) - np.floor(xs - rx))[None]
    tot = ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0]  # (7, cols)
    return (tot / np.maximum(area, 1)).astype(np.float32)
