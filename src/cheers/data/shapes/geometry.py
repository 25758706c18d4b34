"""Unit shapes as inside-tests, and their antialiased coverage on a pixel grid.

A shape lives in a unit box centred at the origin, u to the right and v downwards, both in
[-0.5, 0.5]; an object of extent ``d`` pixels is that box scaled by ``d``. Coverage is the fraction of
``ss x ss`` sample points per pixel that fall inside (a box filter over a supersampled grid). Only
IEEE arithmetic and comparisons are used (no libm calls at render time), so coverage is bit-identical
on every machine.
"""

from __future__ import annotations

import numpy as np

# 5-pointed star, outer radius 0.5, inner radius 0.225, point up; vertices precomputed (and shifted
# down by 0.04775 so the star's bounding box is centred) to keep trig out of the render path.
_STAR = np.array(
    [
        (0.0, -0.45225),
        (0.13225, -0.13428),
        (0.47553, -0.10676),
        (0.21399, 0.11728),
        (0.29389, 0.45226),
        (0.0, 0.27275),
        (-0.29389, 0.45226),
        (-0.21399, 0.11728),
        (-0.47553, -0.10676),
        (-0.13225, -0.13428),
    ],
    dtype=np.float64,
)
_SQUARE_HALF = 0.46
_CROSS_HALF_WIDTH = 0.18


def _in_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points. poly: (V, 2) vertices (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        ui, vi = poly[i]
        uj, vj = poly[i - 1]
        crosses = (vi > v) != (vj > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            u_at = (uj - ui) * (v - vi) / (vj - vi) + ui
        inside ^= crosses & (u < u_at)
    return inside


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask: which unit-box points (u, v) lie inside ``shape``. u, v: same-shape arrays."""
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape == "square":
        return (np.abs(u) <= _SQUARE_HALF) & (np.abs(v) <= _SQUARE_HALF)
    if shape == "triangle":  # apex at the top, base along the bottom edge
        return (v <= 0.5) & (np.abs(u) * 2.0 <= v + 0.5)
    if shape == "star":
        return _in_polygon(u, v, _STAR)
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        w = _CROSS_HALF_WIDTH
        return ((a <= w) & (b <= 0.5)) | ((b <= w) & (a <= 0.5))
    if shape == "heart":  # (x^2 + y^2 - 1)^3 <= x^2 y^3, x in [-1.14, 1.14], y in [-1, 1.24], y up
        x = u * 2.3
        y = 1.268 - (v + 0.5) * 2.3
        q = x * x + y * y - 1.0
        return q * q * q <= x * x * y * y * y
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, extent: float, ss: int = 4) -> tuple[int, int, np.ndarray]:
    """Antialiased coverage of one shape on the pixel grid.

    Args:
        shape: a name from palette.SHAPES.
        cx, cy: centre in pixels (x right, y down; pixel (i, j) covers [j, j+1) x [i, i+1)).
        extent: side of the shape's box in pixels.
        ss: samples per pixel along each axis.
    Returns:
        (y0, x0, cov): top-left pixel of the returned window and its (h, w) float32 coverage in [0, 1].
    """
    if extent <= 0:
        raise ValueError(f"extent must be positive, got {extent}")
    half = extent / 2.0
    x0, y0 = int(np.floor(cx - half)) - 1, int(np.floor(cy - half)) - 1
    x1, y1 = int(np.ceil(cx + half)) + 1, int(np.ceil(cy + half)) + 1
    offs = (np.arange(ss, dtype=np.float64) + 0.5) / ss  # (ss,)
    xs = (np.arange(x0, x1, dtype=np.float64)[:, None] + offs[None]).reshape(-1)  # (w*ss,)
    ys = (np.arange(y0, y1, dtype=np.float64)[:, None] + offs[None]).reshape(-1)  # (h*ss,)
    u = (xs[None, :] - cx) / extent  # (1, w*ss)
    v = (ys[:, None] - cy) / extent  # (h*ss, 1)
    uu, vv = np.broadcast_arrays(u, v)  # (h*ss, w*ss)
    hit = inside(shape, uu, vv).astype(np.float32)
    h, w = y1 - y0, x1 - x0
    cov = hit.reshape(h, ss, w, ss).mean(axis=(1, 3))  # (h, w)
    return y0, x0, cov


def unit_mask(shape: str, n: int = 64) -> np.ndarray:
    """(n, n) boolean mask of ``shape`` filling an n x n box (pixel centres sampled)."""
    c = (np.arange(n, dtype=np.float64) + 0.5) / n - 0.5
    uu, vv = np.meshgrid(c, c)
    return inside(shape, uu, vv)
