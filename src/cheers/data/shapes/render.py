"""Render a scene graph to pixels, deterministically.

Backgrounds are drawn directly at the output resolution (textures are the high-frequency content, so
they must not be smoothed). Objects are antialiased by a 4x4 supersampled box filter (geometry.coverage)
and composited over the background; text is drawn with whole font pixels aligned to the canvas grid.
Everything is numpy integer/IEEE arithmetic: same scene -> same bytes on every machine.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .geometry import coverage
from .glyphs import text_bitmap
from .palette import BACKGROUND_COLORS, OBJECT_COLORS
from .world import FONT_GRID, Background, Scene

RESOLUTIONS: tuple[int, ...] = (64, 128, 256, 512)
TEXTURE_DELTA = 18
"""Texture contrast (0..255 per channel): well below half the smallest object/background contrast."""


def check_resolution(resolution: int) -> int:
    """Return ``resolution`` if it is a positive multiple of 64, else raise ValueError."""
    if resolution < 64 or resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (64, 128, 256, 512), got {resolution}")
    return resolution


def render_background(bg: Background, resolution: int) -> np.ndarray:
    """(R, R, 3) uint8 background. Textures alternate the base colour with a shade TEXTURE_DELTA away."""
    r = check_resolution(resolution)
    base = np.array(BACKGROUND_COLORS[bg.color], dtype=np.int16)
    sign = -1 if base.mean() > 127 else 1
    yy, xx = np.mgrid[0:r, 0:r]
    period = max(2, bg.period * r // 128)  # pixels
    if bg.texture == "flat":
        pattern = np.zeros((r, r), dtype=np.int16)
    elif bg.texture == "stripes":
        coord = {"vertical": xx, "horizontal": yy, "diagonal": xx + yy}[bg.orientation]
        pattern = ((coord % period) < period // 2).astype(np.int16)
    elif bg.texture == "checkerboard":
        pattern = (((xx // period) + (yy // period)) % 2).astype(np.int16)
    elif bg.texture == "dots":
        half = period // 2
        pattern = (((xx % period) == half) & ((yy % period) == half)).astype(np.int16)
        if period >= 6:  # 2x2 dots once there is room, so they survive small blurs
            pattern |= (((xx - 1) % period) == half) & (((yy - 1) % period) == half)
            pattern |= (((xx - 1) % period) == half) & ((yy % period) == half)
            pattern |= ((xx % period) == half) & (((yy - 1) % period) == half)
    elif bg.texture == "noise":
        block = max(1, r // 128)
        g = np.random.default_rng(bg.seed).integers(0, 2, size=(r // block, r // block), dtype=np.int16)
        pattern = np.kron(g, np.ones((block, block), dtype=np.int16))
    else:  # Background validates its texture; this guards future additions.
        raise ValueError(f"unknown texture {bg.texture!r}")
    out = base[None, None, :] + sign * TEXTURE_DELTA * pattern[..., None]  # (R, R, 3)
    return out.clip(0, 255).astype(np.uint8)


def render_array(scene: Scene, resolution: int = 128) -> np.ndarray:
    """Render ``scene`` to an (R, R, 3) uint8 array."""
    r = check_resolution(resolution)
    img = render_background(scene.background, r).astype(np.float32)  # (R, R, 3)
    for obj in scene.objects:
        y0, x0, cov = coverage(obj.shape, obj.center[0] * r, obj.center[1] * r, obj.extent * r)
        _blend(img, y0, x0, cov, OBJECT_COLORS[obj.color])
    if scene.text is not None:
        s = r // FONT_GRID
        ink = np.kron(text_bitmap(scene.text.text), np.ones((s, s), dtype=bool)).astype(np.float32)
        _blend(img, scene.text.origin[1] * s, scene.text.origin[0] * s, ink, OBJECT_COLORS[scene.text.color])
    return np.floor(img + 0.5).clip(0, 255).astype(np.uint8)


def render_scene(scene: Scene, resolution: int = 128) -> Image.Image:
    """Render ``scene`` to an RGB PIL image of side ``resolution`` (a multiple of 64)."""
    return Image.fromarray(render_array(scene, resolution), mode="RGB")


def _blend(img: np.ndarray, y0: int, x0: int, alpha: np.ndarray, rgb: tuple[int, int, int]) -> None:
    """In place: img = alpha * rgb + (1 - alpha) * img over a window (clipped to the canvas)."""
    h, w = alpha.shape
    r = img.shape[0]
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, r), min(x0 + w, r)
    if ys >= ye or xs >= xe:
        return
    a = alpha[ys - y0 : ye - y0, xs - x0 : xe - x0, None]  # (h', w', 1)
    color = np.array(rgb, dtype=np.float32)
    img[ys:ye, xs:xe] = a * color + (1.0 - a) * img[ys:ye, xs:xe]


def contact_sheet(images: list[Image.Image], cols: int = 8, pad: int = 4) -> Image.Image:
    """Tile same-size images into one sheet (row-major), with ``pad`` white pixels between tiles."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    ncol = min(cols, len(images))
    sheet = Image.new("RGB", (ncol * w + (ncol + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet
