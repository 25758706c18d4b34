"""Small numpy image operations the judge needs: connected components, smoothing, resampling.

Kept dependency-free (no scipy): components use run-length union-find, which is fast at the judge's
analysis resolution (<= 128 px).
"""

from __future__ import annotations

import numpy as np


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask.

    Args:
        mask: (H, W) bool.
    Returns:
        (labels, n): (H, W) int32 with 0 for background and 1..n for components (numbered in
        raster order of their first pixel).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)  # (H, W+1): +1 at run starts, -1 at run ends
    runs: list[tuple[int, int, int]] = []  # (row, start, end) with end exclusive
    row_first: list[int] = []
    for y in range(h):
        row_first.append(len(runs))
        starts = np.flatnonzero(d[y] == 1)
        ends = np.flatnonzero(d[y] == -1)
        runs.extend((y, int(s), int(e)) for s, e in zip(starts, ends))
    row_first.append(len(runs))
    parent = list(range(len(runs)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for y in range(1, h):
        prev = range(row_first[y - 1], row_first[y])
        for i in range(row_first[y], row_first[y + 1]):
            _, s, e = runs[i]
            for j in prev:
                _, ps, pe = runs[j]
                if ps <= e and s <= pe:  # overlap or diagonal touch (8-connectivity)
                    ra, rb = find(i), find(j)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for i, (y, s, e) in enumerate(runs):
        root = find(i)
        if root not in ids:
            ids[root] = len(ids) + 1
        labels[y, s:e] = ids[root]
    return labels, len(ids)


def smooth121(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing with edge replication. img: (H, W) or (H, W, C) float."""
    out = np.asarray(img, dtype=np.float32)
    for axis in (0, 1):
        p = np.concatenate([np.take(out, [0], axis=axis), out, np.take(out, [-1], axis=axis)], axis=axis)
        n = out.shape[axis]
        a = np.take(p, range(0, n), axis=axis)
        b = np.take(p, range(1, n + 1), axis=axis)
        c = np.take(p, range(2, n + 2), axis=axis)
        out = (a + 2 * b + c) * 0.25
    return out


def resample_box(mask: np.ndarray, n: int) -> np.ndarray:
    """Area-average an (h, w) map onto an (n, n) grid (each output cell averages its input footprint)."""
    m = np.asarray(mask, dtype=np.float64)
    h, w = m.shape
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = m.cumsum(0).cumsum(1)

    def lerp_ii(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        # Bilinear interpolation of the integral image gives exact fractional-pixel box sums.
        y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
        x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
        fy = (ys - y0)[:, None]
        fx = (xs - x0)[None, :]
        a = ii[y0][:, x0]
        b = ii[y0][:, x0 + 1]
        c = ii[y0 + 1][:, x0]
        d = ii[y0 + 1][:, x0 + 1]
        return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx

    ys = np.linspace(0, h, n + 1)
    xs = np.linspace(0, w, n + 1)
    s = lerp_ii(ys, xs)  # (n+1, n+1)
    tot = s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]
    return (tot / ((h / n) * (w / n))).astype(np.float32)
