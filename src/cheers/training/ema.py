"""An exponential moving average (EMA) of the trained weights: opt-in (``train.ema_decay > 0``), not the
release's recipe.

Flow-matching samplers are sensitive to the noise the last optimizer steps leave in the weights; averaging the
weights over the last few hundred steps is the diffusion field's usual remedy (an lr decay at the end of a run
does part of the same). The average is kept in float32 beside the trained parameters, starts short and
lengthens to ``decay`` (``min(decay, (1 + n) / (10 + n))`` after n updates, so a run that starts from
pretrained weights is not pulled back towards them for long), is stored in every checkpoint and resumed with
it, and is what the run exports. Hooks that sample or score during training see the trained (raw) weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cheers import checkpoint as ckpt

FILE = "ema.safetensors"


def ema_decay(target: float, updates: int) -> float:
    """The decay of update number ``updates + 1``: ``target`` once the average is long enough."""
    return min(target, (1 + updates) / (10 + updates))


class WeightEMA:
    """The moving average of ``named_parameters`` (the trainable ones), by name."""

    def __init__(self, named_parameters: list[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.names = [name for name, _ in named_parameters]
        self.params = [p for _, p in named_parameters]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (call after each optimizer step)."""
        weight = 1.0 - ema_decay(self.decay, self.updates)
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the parameters hold the average (in their own dtype); the trained weights come back
        after."""
        kept = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow, strict=True):
                    p.copy_(s)
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept, strict=True):
                    p.copy_(k)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def save(self, directory) -> None:
        """Write the average into a checkpoint directory (``ema.safetensors``; the update count goes in the
        trainer state)."""
        save_file(self.tensors(), str(directory / FILE))

    def load(self, directory, updates: int) -> None:
        """Read the average of a checkpoint written by :meth:`save`; raises naming what does not match."""
        if not (directory / FILE).is_file():
            raise ckpt.CheckpointError(
                f"{directory} has no {FILE}: it was written by a run without train.ema_decay"
            )
        stored = load_file(str(directory / FILE))
        mine = self.tensors()
        missing, unexpected = sorted(mine.keys() - stored.keys()), sorted(stored.keys() - mine.keys())
        shapes = [k for k in sorted(mine.keys() & stored.keys()) if stored[k].shape != mine[k].shape]
        if missing or unexpected or shapes:
            raise ckpt.CheckpointError(
                f"{directory / FILE} does not match this run's trainable tensors: missing "
                f"{ckpt._cap(missing)}; unexpected {ckpt._cap(unexpected)}; shape mismatches "
                f"{ckpt._cap(shapes)}"
            )
        with torch.no_grad():
            for name, s in mine.items():
                s.copy_(stored[name])
        self.updates = int(updates)
