"""Figures: scores over training (the paper's Fig. 4) and HFI gate intensity over denoising (Fig. 5).

* :func:`plot_curves` reads the trainer's ``metrics.jsonl`` (one JSON object a line with ``step``; score
  hooks add keys such as ``shapes_accuracy`` / ``shapes_geneval``) of one or more runs and draws one panel
  per key, one line per run.
* :func:`plot_scorecards` draws the headline ShapesBench figures of several scorecards (``cheers eval shapes
  --scorecard``) against the training samples each model had seen, with the targets as dashed lines.
* :func:`plot_hfi` takes the HFI gate maps a pipeline returns (``return_hfi_maps=True``: per image an
  (S, h, w) tensor of the raw gate at each of the S sampling steps) and draws the mean raw gate per step
  (mean and spread over images) above a heatmap strip of the gate maps averaged over images.

Figures are built with matplotlib's object API (no pyplot state) and saved as PNG.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SCORE_HINTS = ("geneval", "accuracy", "score", "vqa", "mmbench", "dpg", "pope", "fidelity")
"""Keys containing one of these are plotted when no keys are named."""


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run directory's ``metrics.jsonl`` (or of that file). Lines that do not parse (a run
    being written) are skipped."""
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} at {path}")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
    return records


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key``, sorted by step; the last record of a step wins; non-finite values
    dropped."""
    by_step: dict[float, float] = {}
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[rec["step"]] = float(value)
    steps = np.array(sorted(by_step), dtype=np.float64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def score_keys(records: Sequence[dict]) -> list[str]:
    """Numeric keys that look like scores (see SCORE_HINTS), in first-seen order."""
    keys: dict[str, None] = {}
    for rec in records:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and any(h in k.lower() for h in SCORE_HINTS):
                keys.setdefault(k)
    return list(keys)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average (TensorBoard's smoothing, debiased); weight 0 returns the values."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def plot_curves(
    runs: Sequence[str | Path],
    out: str | Path,
    keys: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    smooth: float = 0.0,
    title: str | None = None,
) -> Path:
    """Score-vs-step curves, one panel per key and one line per run, saved as PNG.

    Args:
        runs: run directories (or ``metrics.jsonl`` files).
        out: the PNG path.
        keys: metric names (default: the score-like keys found, else ``loss``).
        labels: legend names of the runs (default: the run directories' names).
        smooth: EMA weight for noisy curves (0: raw).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
    data = [read_metrics(r) for r in runs]
    names = list(labels) if labels else [_run_name(r) for r in runs]
    if not keys:
        keys = list(dict.fromkeys(k for recs in data for k in score_keys(recs))) or ["loss"]
    found = [k for k in keys if any(len(series(recs, k)[0]) for recs in data)]
    if not found:
        raise ValueError(f"none of the keys {list(keys)} has a numeric value in {[str(r) for r in runs]}")
    cols = min(3, len(found))
    rows = -(-len(found) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=110, layout="constrained")
    for n, key in enumerate(found):
        ax = fig.add_subplot(rows, cols, n + 1)
        for recs, name in zip(data, names):
            steps, values = series(recs, key)
            if len(steps):
                ax.plot(
                    steps,
                    ema(values, smooth) if smooth else values,
                    marker="o" if len(steps) < 30 else None,
                    markersize=3,
                    label=name,
                )
        ax.set_title(key)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


SCORECARD_FIGURES = (
    ("ShapesGenEval", ("geneval", "summary", "overall"), 0.90),
    ("ShapesVQA", ("vqa", "overall"), 0.95),
    ("OCR", ("vqa", "ocr_accuracy"), 0.90),
    ("ShapesEdit", ("edit", "correct"), 0.80),
)
"""(label, key path in a scorecard, target) of the figures :func:`plot_scorecards` draws."""


def scorecard_figures(card: dict) -> dict[str, float]:
    """The SCORECARD_FIGURES a scorecard holds (a task it did not run is left out)."""
    out = {}
    for label, path, _ in SCORECARD_FIGURES:
        value: object = card
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[label] = float(value)
    return out


def plot_scorecards(points: Sequence[tuple[float, dict]], out: str | Path, title: str | None = None) -> Path:
    """Scorecard figures against training samples seen: one line per figure, targets dashed, saved as PNG.

    Args:
        points: (samples seen, scorecard dict) pairs, in any order.
    """
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("no scorecards to plot")
    figures = [(samples, scorecard_figures(card)) for samples, card in sorted(points, key=lambda p: p[0])]
    fig = Figure(figsize=(6.4, 3.8), dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for n, (label, _, target) in enumerate(SCORECARD_FIGURES):
        xs = [samples for samples, values in figures if label in values]
        ys = [values[label] for _, values in figures if label in values]
        if not xs:
            continue
        color = f"C{n}"
        ax.plot(xs, ys, marker="o", color=color, label=label)
        ax.axhline(target, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        drawn += 1
    if not drawn:
        raise ValueError("none of the scorecards holds a ShapesBench figure")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("score (dashed: target)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, out)


def hfi_intensity(maps: Sequence[torch.Tensor]) -> np.ndarray:
    """Mean raw gate per step of each image: (n_images, S) from n maps of shape (S, h, w)."""
    if not maps:
        raise ValueError("no HFI maps (generate with return_hfi_maps=True)")
    shapes = {tuple(m.shape[:1]) for m in maps}
    if any(m.ndim != 3 for m in maps) or len(shapes) != 1:
        raise ValueError(f"HFI maps must be (S, h, w) with one S, got {[tuple(m.shape) for m in maps]}")
    return torch.stack([m.detach().float().cpu().flatten(1).mean(1) for m in maps]).numpy()  # (n, S)


def plot_hfi(
    maps: Sequence[torch.Tensor], out: str | Path, title: str | None = None, max_tiles: int = 12
) -> Path:
    """The HFI intensity plot: mean raw gate per denoising step (line: mean over images, band: min..max),
    above a heatmap strip of the per-step gate maps (averaged over images when their grids agree).

    Args:
        maps: per image an (S, h, w) tensor of raw gate values (``ImagePipelineOutput.hfi_maps``).
        out: the PNG path.
        max_tiles: at most this many steps in the strip.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from cheers.web_plots import gate_strip

    intensity = hfi_intensity(maps)  # (n, S)
    steps = np.arange(1, intensity.shape[1] + 1)
    fig = Figure(figsize=(7.5, 5.2), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1.6])
    top.plot(steps, intensity.mean(0), marker="o", markersize=3, label=f"mean over {len(maps)} image(s)")
    if len(maps) > 1:
        top.fill_between(steps, intensity.min(0), intensity.max(0), alpha=0.25, label="min..max")
    top.set_xlabel("denoising step (noise -> image)")
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel("mean raw HFI gate")
    top.grid(alpha=0.3)
    top.legend(fontsize="small")
    same_grid = len({tuple(m.shape) for m in maps}) == 1
    strip_maps = torch.stack([m.float().cpu() for m in maps]).mean(0) if same_grid else maps[0].float().cpu()
    bottom.imshow(np.asarray(gate_strip(strip_maps, max_tiles=max_tiles)))
    bottom.set_axis_off()
    bottom.set_title(
        "gate per latent token" + (" (mean over images)" if same_grid and len(maps) > 1 else ""),
        fontsize="small",
    )
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def _run_name(run: str | Path) -> str:
    p = Path(run)
    return p.parent.name if p.name == METRICS_FILE else p.name


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    logger.info("wrote %s", out)
    return out
