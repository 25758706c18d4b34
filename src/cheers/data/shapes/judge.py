"""The scene parser: read an image (rendered or generated) back into objects, background and text.

Steps (all deterministic, no learned model):
1. Bring the image to the analysis size (box-downsampled so the longer side is <= 128 px).
2. Background = the median colour of a 2-px border ring, named by the nearest background colour.
3. Foreground = pixels whose lightly smoothed colour is far (> FG_THRESHOLD) from the background, or
   whose raw colour is very far (> RAW_THRESHOLD); 8-connected components of it, specks dropped.
4. Per component: its colour is the object colour that best explains its most distinct pixels as a
   mix with the background (_name_color); its mask is refined to the pixels at least half-way from
   the background to that colour (the half-level edge is where a blurred edge really was).
5. Components that are short (text is 7 font px = 0.33 cells tall) and thin (strokes one font pixel
   wide vanish under an erosion that every object survives) are glyphs: they are merged into one text
   line and read by glyphs.read_bitmap.
   The others are objects: shape = nearest template of the 16x16 soft occupancy of the bounding box
   (templates: ideal, small and blurred renders of each shape); size from the box's longer side; cell
   from the box centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .components import label_components, resample_box, smooth121
from .geometry import coverage
from .glyphs import read_bitmap
from .palette import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, nearest_color
from .perturb import gaussian_blur

ANALYSIS_MAX = 128
FG_THRESHOLD = 48.0
"""Colour distance (0..255 units) above which a smoothed pixel is foreground. Textures move the
background by <= 31, object/background contrast is >= 105."""
RAW_THRESHOLD = 90.0
"""Colour distance above which an unsmoothed pixel is foreground as well (1-px glyph strokes at 64 px)."""
TEXT_MAX_HEIGHT = 0.45
"""In grid cells: only components shorter than this can be glyphs (text is 0.33 cells tall)."""
GLYPH_MAX_DEPTH = 0.75
"""In font pixels: glyph strokes are one font pixel wide, so they do not survive one 3x3 erosion
per font pixel; every object survives at least one."""
SIZE_SPLIT = 0.58
"""In grid cells: a box whose longer side is above this is a large object (small <= 0.48, large >= 0.68)."""
TEMPLATE_N = 16
INK_LEVEL = 0.6
"""Rescaled ink level that bounds the text box (texture stays below it, thin blurred strokes above)."""


@dataclass(frozen=True)
class ParsedObject:
    """An object found in an image. center/bbox are fractions of the canvas: (x, y), (x0, y0, x1, y1)."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    center: tuple[float, float]
    bbox: tuple[float, float, float, float]
    shape_distance: float


@dataclass(frozen=True)
class ParsedScene:
    objects: tuple[ParsedObject, ...]
    background: str
    text: str | None = None
    text_color: str | None = None
    text_cell: tuple[int, int] | None = None

    def object_keys(self) -> list[tuple[str, str, tuple[int, int]]]:
        """Sorted (shape, colour, cell) triples: the exact-scene comparison key."""
        return sorted((o.shape, o.color, o.cell) for o in self.objects)


def _templates() -> tuple[tuple[str, ...], np.ndarray]:
    """Occupancy templates per shape: ideal, and as small or blurred renders leave them (thin tips and
    arms of a small blurred star vanish first), so degraded shapes still meet a template of their kind.
    Returns (names, (K, n, n) templates)."""
    names, out = [], []
    for s in SHAPES:
        for extent, sigma in ((64.0, 0.0), (10.0, 0.0), (20.0, 0.0), (20.0, 1.2), (30.0, 1.6), (30.0, 2.2)):
            _, _, cov = coverage(s, 40.3, 40.6, extent)
            if sigma > 0:
                cov = (
                    gaussian_blur((cov[..., None] * 255).astype(np.uint8).repeat(3, -1), sigma)[..., 0]
                    / 255.0
                )
            ys, xs = np.nonzero(cov >= 0.5)
            names.append(s)
            out.append(resample_box(cov[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], TEMPLATE_N))
    return tuple(names), np.stack(out)  # (K, n, n)


_TEMPLATE_NAMES, _TEMPLATES = _templates()


def to_analysis_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 at the analysis size. Accepts PIL images, uint8 arrays or floats in
    [0, 1]."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="RGB")
    w, h = img.size
    f = max(w, h) / ANALYSIS_MAX
    if f > 1:
        img = img.resize((round(w / f), round(h / f)), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32)


def parse_image(image: Image.Image | np.ndarray) -> ParsedScene:
    """Parse an image into a ParsedScene (see the module docstring for the steps)."""
    img = to_analysis_array(image)  # (H, W, 3)
    h, w, _ = img.shape
    cell_w, cell_h = w / 3.0, h / 3.0
    ring = np.concatenate(
        [
            img[:2].reshape(-1, 3),
            img[-2:].reshape(-1, 3),
            img[:, :2].reshape(-1, 3),
            img[:, -2:].reshape(-1, 3),
        ]
    )
    bg = np.median(ring, axis=0)  # (3,)
    background = nearest_color(bg, tuple(BACKGROUND_COLORS))
    smooth = smooth121(img)  # (H, W, 3)
    dist = np.linalg.norm(smooth - bg, axis=-1)  # (H, W)
    # Thin (1 px) strokes fade under smoothing, so a clearly distinct raw pixel counts too.
    raw = np.linalg.norm(img - bg, axis=-1)  # (H, W)
    labels, n = label_components((dist > FG_THRESHOLD) | (raw > RAW_THRESHOLD))
    font_px = max(h, w) / 64.0
    min_area = 3.0 * font_px * font_px
    objects: list[ParsedObject] = []
    glyphs: list[tuple[np.ndarray, np.ndarray]] = []  # (refined mask, rgb)
    for k in range(1, n + 1):
        comp = labels == k
        if comp.sum() < min_area:
            continue
        d = dist[comp]
        core = img[comp][d >= 0.8 * d.max()]
        rgb = np.median(core, axis=0)
        color = _name_color(rgb, bg)
        ref = np.asarray(OBJECT_COLORS[color], dtype=np.float32)
        alpha = _alpha(img, bg, ref)
        mask = comp & (alpha >= 0.5)
        if mask.sum() < min_area:
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if (y1 - y0) < TEXT_MAX_HEIGHT * cell_h and _erosion_depth(
            mask[y0:y1, x0:x1]
        ) < GLYPH_MAX_DEPTH * font_px:
            glyphs.append((mask, rgb))
            continue
        # Soft occupancy: edge pixels count by coverage, so a texture shade next to an edge pixel
        # cannot flip it in or out (thresholded small squares would look round).
        occ = resample_box(np.clip(alpha[y0:y1, x0:x1], 0.0, 1.0) * comp[y0:y1, x0:x1], TEMPLATE_N)  # (n, n)
        dists = ((_TEMPLATES - occ[None]) ** 2).mean(axis=(1, 2))  # (S,)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        side = max((x1 - x0) / cell_w, (y1 - y0) / cell_h)
        objects.append(
            ParsedObject(
                shape=_TEMPLATE_NAMES[int(np.argmin(dists))],
                color=color,
                size="large" if side > SIZE_SPLIT else "small",
                cell=(min(int(cx / cell_w), 2), min(int(cy / cell_h), 2)),
                center=(cx / w, cy / h),
                bbox=(x0 / w, y0 / h, x1 / w, y1 / h),
                shape_distance=float(dists.min()),
            )
        )
    text, text_color, text_cell = _read_text(img, bg, glyphs, cell_w, cell_h, font_px)
    return ParsedScene(tuple(objects), background, text, text_color, text_cell)


def _erosion_depth(mask: np.ndarray, cap: int = 8) -> int:
    """How many 3x3 erosions ``mask`` survives (its chessboard inradius minus one), capped at ``cap``."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    for k in range(cap):
        p = np.pad(m, 1)
        for dy in range(3):
            for dx in range(3):
                m = m & p[dy : dy + h, dx : dx + w]
        if not m.any():
            return k
    return cap


_OBJECT_RGB = np.array(list(OBJECT_COLORS.values()), dtype=np.float32)  # (K, 3)
_OBJECT_NAMES = tuple(OBJECT_COLORS)
MIN_COVER = 0.55
"""Least coverage a core may have: blurred 1-font-px strokes peak near 0.6-0.66 (lower admits JPEG-smeared
mixtures that name the wrong colour)."""


def _name_color(rgb: np.ndarray, bg: np.ndarray) -> str:
    """The object colour c that best explains ``rgb`` as a mix a * c + (1 - a) * bg, a in [MIN_COVER, 1].

    Plain nearest-colour naming fails on thin blurred strokes, whose cores never reach full colour
    (dim white on black is nearer purple than white); solid cores (a = 1) name as nearest colour.
    """
    v = _OBJECT_RGB - bg[None]  # (K, 3)
    p = np.asarray(rgb, dtype=np.float32) - bg  # (3,)
    a = np.clip((v * p[None]).sum(-1) / np.maximum((v * v).sum(-1), 1e-6), MIN_COVER, 1.0)  # (K,)
    resid = ((p[None] - a[:, None] * v) ** 2).sum(-1)
    return _OBJECT_NAMES[int(np.argmin(resid))]


def _alpha(img: np.ndarray, bg: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-pixel position between ``bg`` (0) and ``ref`` (1): projection on the bg->ref segment."""
    axis = ref - bg
    denom = float(axis @ axis)
    if denom < 1e-6:
        return np.zeros(img.shape[:2], dtype=np.float32)
    return ((img - bg) * axis).sum(axis=-1) / denom  # not "@": tiny BLAS calls thrash threads


def _read_text(
    img: np.ndarray,
    bg: np.ndarray,
    glyphs: list[tuple[np.ndarray, np.ndarray]],
    cell_w: float,
    cell_h: float,
    font_px: float,
) -> tuple[str | None, str | None, tuple[int, int] | None]:
    """Merge glyph components on the main text line and read them."""
    if not glyphs:
        return None, None, None
    boxes = []
    for mask, _ in glyphs:
        ys, xs = np.nonzero(mask)
        boxes.append((ys.min(), ys.max() + 1, xs.min(), xs.max() + 1, mask.sum()))
    main = int(np.argmax([b[4] for b in boxes]))
    my = (boxes[main][0] + boxes[main][1]) / 2.0
    line = [i for i, b in enumerate(boxes) if b[0] <= my < b[1]]
    y0 = min(boxes[i][0] for i in line)
    y1 = max(boxes[i][1] for i in line)
    x0 = min(boxes[i][2] for i in line)
    x1 = max(boxes[i][3] for i in line)
    rgb = np.median(np.stack([glyphs[i][1] for i in line]), axis=0)
    color = _name_color(rgb, bg)
    # Blur leaves thin diagonals (K, R) below the half level, outside the glyph masks: widen the box by
    # a font pixel, rescale the ink so a full stroke reads 1, and take the tight box again.
    pad = max(1, int(round(font_px)))
    y0, x0 = max(y0 - pad, 0), max(x0 - pad, 0)
    y1, x1 = min(y1 + pad, img.shape[0]), min(x1 + pad, img.shape[1])
    ink = np.clip(_alpha(img[y0:y1, x0:x1], bg, np.asarray(OBJECT_COLORS[color], dtype=np.float32)), 0.0, 1.0)
    ink = np.clip(ink / max(float(np.percentile(ink, 97)), 0.25), 0.0, 1.0)
    ys, xs = np.nonzero(ink >= INK_LEVEL)
    if len(ys) == 0:
        return None, color, None
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    y0, y1, x0, x1 = y0 + ys.min(), y0 + ys.max() + 1, x0 + xs.min(), x0 + xs.max() + 1
    text = read_bitmap(ink) or None
    cell = (min(int((x0 + x1) / 2 / cell_w), 2), min(int((y0 + y1) / 2 / cell_h), 2))
    return text, color, cell
