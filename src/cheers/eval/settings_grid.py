"""Pictures of what the sampling settings do: one prompt, one seed, a grid over steps, guidance and shift.

``cheers plot settings --prompt "two red circles" --out docs/images/settings.png`` draws three rows: the
number of Euler steps, the guidance scale and the time shift (the release's alpha), each varied around the
model's defaults with everything else fixed, so the pictures differ only by the setting named above them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_STEPS = (4, 8, 16, 32)
DEFAULT_GUIDANCE = (1.0, 2.0, 4.0, 8.0)
DEFAULT_SHIFT = (0.25, 0.5, 1.0, 2.0)


def settings_grid(
    pipe,
    prompt: str,
    out: str | Path,
    *,
    seed: int = 0,
    steps: Sequence[int] = DEFAULT_STEPS,
    guidance: Sequence[float] = DEFAULT_GUIDANCE,
    shift: Sequence[float] = DEFAULT_SHIFT,
) -> Path:
    """Generate the three rows and save them as one labelled PNG; returns its path."""
    from matplotlib.figure import Figure

    d = pipe.defaults
    rows = [
        ("steps", [dict(num_inference_steps=s) for s in steps]),
        ("guidance", [dict(guidance_scale=g) for g in guidance]),
        ("shift (alpha)", [dict(shift=a) for a in shift]),
    ]
    base = dict(num_inference_steps=d.num_inference_steps, guidance_scale=d.guidance_scale, shift=d.shift)
    cols = max(len(r[1]) for r in rows)
    fig = Figure(figsize=(2.2 * cols, 2.4 * len(rows)))
    for i, (name, variants) in enumerate(rows):
        for j, change in enumerate(variants):
            kwargs = {**base, **change}
            image = pipe.generate(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
            ax = fig.add_subplot(len(rows), cols, i * cols + j + 1)
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            value = next(iter(change.values()))
            ax.set_title(f"{name} = {value}", fontsize=9)
    fig.suptitle(
        f'"{prompt}" (seed {seed}; defaults: {d.num_inference_steps} steps, guidance '
        f"{d.guidance_scale}, shift {d.shift})",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
