"""Pictures of the HFI gate for the web demo: a heatmap strip over the sampling steps and a mean-per-step
plot.

The gate ``g`` of :class:`cheers.models.flow_head.HiGate` is an unbounded scalar per latent token
(``LayerNorm(low + g·high)``), so every tile of the strip shares one colour scale (the min and max over all
steps): tiles are comparable, and the legend under the strip names the range.

Legend: S sampling steps, h x w latent grid.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

TILE = 96  # pixels per tile side in the strip
_GAP = 4  # white pixels between tiles
_LABEL_H = 18  # pixels of text under each tile
_LEGEND_H = 28  # the colour bar and its range under the strip


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def gate_range(maps: torch.Tensor) -> tuple[float, float]:
    """(min, max) of the gate over all steps; a constant map gets a unit-wide range around its value."""
    low, high = float(maps.min()), float(maps.max())
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    return low, high


def gate_strip(
    maps: torch.Tensor, tile: int = TILE, cmap: str = "viridis", max_tiles: int = 16
) -> Image.Image:
    """A row of heatmaps, one per (evenly chosen) step, on one shared colour scale.

    Args:
        maps: (S, h, w) raw gate values of one image, one map per sampling step.
        tile: side of each tile in pixels (nearest-neighbour upsampling keeps the token grid visible).
        cmap: a matplotlib colormap name.
        max_tiles: at most this many steps are drawn (first and last included) so long runs stay legible.

    Returns:
        An RGB image, ``n_tiles`` tiles wide, with the step number under each tile and a colour bar.
    """
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"gate maps must be (S, h, w) with S >= 1, got shape {tuple(maps.shape)}")
    maps = maps.detach().float().cpu()
    steps = maps.shape[0]
    chosen = np.unique(np.linspace(0, steps - 1, min(steps, max_tiles)).round().astype(int))
    low, high = gate_range(maps)
    colour = _colormap(cmap)
    h, w = maps.shape[1:]
    tile_w = max(1, round(tile * w / max(h, w)))
    tile_h = max(1, round(tile * h / max(h, w)))
    pitch = tile_w + _GAP
    width = len(chosen) * pitch - _GAP
    canvas = Image.new("RGB", (width, tile_h + _LABEL_H + _LEGEND_H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, step in enumerate(chosen):
        norm = ((maps[step] - low) / (high - low)).clamp(0, 1).numpy()  # (h, w) in [0, 1]
        rgb = (colour(norm)[..., :3] * 255).astype(np.uint8)  # (h, w, 3)
        heat = Image.fromarray(rgb).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        canvas.paste(heat, (i * pitch, 0))
        draw.text((i * pitch + 2, tile_h + 3), f"step {step + 1}", fill="black")
    bar = (colour(np.linspace(0, 1, width))[:, :3] * 255).astype(np.uint8)  # (width, 3)
    bar_img = Image.fromarray(np.repeat(bar[None], 8, axis=0))  # (8, width, 3)
    canvas.paste(bar_img, (0, tile_h + _LABEL_H))
    draw.text((2, tile_h + _LABEL_H + 10), f"{low:.4g}", fill="black")
    right = f"{high:.4g}"
    draw.text((max(0, width - 6 * len(right) - 2), tile_h + _LABEL_H + 10), right, fill="black")
    return canvas


def gate_means(maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean gate and mean |gate| over the latent grid at each step: two (S,) arrays."""
    flat = maps.detach().float().cpu().flatten(1)  # (S, h*w)
    return flat.mean(1).numpy(), flat.abs().mean(1).numpy()


def gate_means_figure(maps: torch.Tensor):
    """A matplotlib Figure of the mean gate (and mean |gate|) per sampling step.

    Built with the object API (no pyplot state), so it is safe in the web server's worker threads.
    """
    from matplotlib.figure import Figure

    mean, mean_abs = gate_means(maps)
    steps = np.arange(1, len(mean) + 1)
    fig = Figure(figsize=(6, 2.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, mean, marker="o", label="mean gate")
    ax.plot(steps, mean_abs, marker=".", linestyle="--", label="mean |gate|")
    ax.set_xlabel("sampling step")
    ax.set_ylabel("HFI gate")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig
