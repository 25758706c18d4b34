"""A high-frequency fidelity figure for textures (to measure what HFI restores).

Definition. For an image, take its luminance Y = 0.299 R + 0.587 G + 0.114 B (0..1), subtract the
mean, and compute the power spectrum |FFT(Y)|^2. The high-frequency fraction is the share of spectral
energy at radial frequencies above ``cutoff`` cycles per image side (resolution-free: the same scene
gives the same figure at 128 and 256 px; Nyquist is R/2):

    hf(Y) = sum_{|f| > cutoff} |F(f)|^2 / sum_{f != 0} |F(f)|^2

The fidelity of generated images against reference renders of the same prompts is the ratio of means,

    hf_fidelity = mean(hf(generated)) / mean(hf(reference)),

so 1.0 means as much fine detail as the ground truth, below 1 over-smoothed, above 1 spurious detail.
The default cutoff of 12 cycles per image lies below every texture's fundamental (stripes, checks and
dots repeat 16-32 times across the canvas; noise is per pixel at 128 px) and above most of the energy
of the objects' silhouettes, so the figure mostly measures texture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

DEFAULT_CUTOFF = 12.0
"""Cycles per image side."""


def _luma(image: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.max() > 1.0:
        a = a / 255.0
    return a @ np.array([0.299, 0.587, 0.114])  # (H, W)


def high_frequency_fraction(image: Image.Image | np.ndarray, cutoff: float = DEFAULT_CUTOFF) -> float:
    """Share of (mean-removed) luminance spectral energy above ``cutoff`` cycles per image side; 0 for
    flat images."""
    y = _luma(image)
    if not 0.0 < cutoff < max(y.shape) / 2:
        raise ValueError(f"cutoff must be in (0, {max(y.shape) / 2}) cycles per image, got {cutoff}")
    y = y - y.mean()
    power = np.abs(np.fft.fft2(y)) ** 2  # (H, W)
    fy = np.fft.fftfreq(y.shape[0], d=1.0 / y.shape[0])[:, None]  # cycles per image side
    fx = np.fft.fftfreq(y.shape[1], d=1.0 / y.shape[1])[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    total = power.sum()
    return float(power[radius > cutoff].sum() / total) if total > 0 else 0.0


def hf_fidelity(
    generated: Sequence[Image.Image | np.ndarray],
    reference: Sequence[Image.Image | np.ndarray],
    cutoff: float = DEFAULT_CUTOFF,
) -> float:
    """mean high-frequency fraction of ``generated`` over that of ``reference`` (see module docstring)."""
    if not generated or not reference:
        raise ValueError("hf_fidelity needs at least one generated and one reference image")
    g = np.mean([high_frequency_fraction(x, cutoff) for x in generated])
    r = np.mean([high_frequency_fraction(x, cutoff) for x in reference])
    if r == 0:
        raise ValueError("reference images have no high-frequency energy (all flat?)")
    return float(g / r)
