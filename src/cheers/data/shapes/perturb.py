"""Image degradations used to stress the judge: gaussian blur, gaussian noise, JPEG.

Strengths are relative to the canvas so every resolution sees the same degradation: the blur's sigma is
``BLUR_SIGMA_PER_128`` pixels per 128 px of side; noise is per channel in 0..255 units; JPEG uses PIL's
encoder at ``JPEG_QUALITY``.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

BLUR_SIGMA_PER_128 = 1.0
NOISE_STD = 12.75
"""0.05 of the full range."""
JPEG_QUALITY = 75
PERTURBATIONS: tuple[str, ...] = ("clean", "blur", "noise", "jpeg")


def gaussian_blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur (kernel radius 3 sigma, edge replication). arr: (H, W, 3) uint8 -> uint8."""
    if sigma <= 0:
        return arr.copy()
    r = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    out = arr.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, range(i, i + n), axis=axis) for i in range(2 * r + 1))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def gaussian_noise(arr: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Add seeded N(0, std^2) noise per channel (0..255 units); uint8 in and out."""
    noise = np.random.default_rng(seed).normal(0.0, std, size=arr.shape)
    return np.clip(np.round(arr.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Round-trip through PIL's JPEG encoder at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def perturbation(name: str, resolution: int, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """The named degradation as a function of an (R, R, 3) uint8 array; raises ValueError on unknown names."""
    if name == "clean":
        return lambda a: a
    if name == "blur":
        return lambda a: gaussian_blur(a, BLUR_SIGMA_PER_128 * resolution / 128)
    if name == "noise":
        return lambda a: gaussian_noise(a, NOISE_STD, seed)
    if name == "jpeg":
        return jpeg
    raise ValueError(f"unknown perturbation {name!r}; known: {PERTURBATIONS}")
