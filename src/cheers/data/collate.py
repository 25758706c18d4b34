"""Batching training samples: right-padded ids/labels/masks, images stacked in order of appearance.

Dimension legend: B rows, L longest row, n images of the batch (row by row, in order of appearance),
R image side, C×h×w latent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from cheers.data.samples import TrainSample
from cheers.models.sequence import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded with the pad id
    attention_mask: torch.Tensor  # (B, L) 1 = real
    labels: torch.Tensor  # (B, L) -100 on padding
    pixel_values: torch.Tensor  # (n, 3, R, R)
    t: torch.Tensor  # (n,)
    x0: torch.Tensor  # (n, C, h, w)
    tasks: list[str] = field(default_factory=list)
    # data accounting of the micro-batch (for the corrupt-sample threshold and the logs)
    attempted: int = 0
    corrupt: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = {
            k: getattr(self, k).to(device, non_blocking=non_blocking)
            for k in ("input_ids", "attention_mask", "labels", "pixel_values", "t", "x0")
        }
        return Batch(
            **move,
            tasks=self.tasks,
            attempted=self.attempted,
            corrupt=self.corrupt,
            reasons=dict(self.reasons),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``)."""
        pinned = {
            k: getattr(self, k).pin_memory()
            for k in ("input_ids", "attention_mask", "labels", "pixel_values", "t", "x0")
        }
        return Batch(
            **pinned,
            tasks=self.tasks,
            attempted=self.attempted,
            corrupt=self.corrupt,
            reasons=dict(self.reasons),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of :meth:`cheers.models.cheers.Cheers.forward`."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            "t": self.t,
            "labels": self.labels,
            "x0": self.x0,
        }


def collate(samples: list[TrainSample], pad_id: int) -> Batch:
    """Right-pad and stack ``samples`` (at least one).

    Args:
        samples: built by :class:`~cheers.data.samples.SampleBuilder`; all images of one size.
        pad_id: the tokenizer's pad id (``special.pad``).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    sizes = {tuple(s.pixel_values.shape[-2:]) for s in samples}
    if len(sizes) != 1:
        raise ValueError(
            f"all images of a batch must have one size (the model uses one grid), got {sorted(sizes)}"
        )
    length = max(s.input_ids.shape[0] for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    mask = torch.zeros((batch, length), dtype=torch.long)  # (B, L)
    for b, s in enumerate(samples):
        n = s.input_ids.shape[0]
        input_ids[b, :n], labels[b, :n], mask[b, :n] = s.input_ids, s.labels, 1
    return Batch(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        pixel_values=torch.cat([s.pixel_values for s in samples]),  # (n, 3, R, R)
        t=torch.cat([s.t for s in samples]),  # (n,)
        x0=torch.cat([s.x0 for s in samples]),  # (n, C, h, w)
        tasks=[s.task for s in samples],
    )


def merge_reasons(*counters: dict[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    return dict(total)
