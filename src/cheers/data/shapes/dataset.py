"""torch datasets over ShapesWorld: map-style (index -> deterministic sample) and an infinite stream.

Samples are the dicts of samples.make_sample: the release's conversation form, images in memory.
Images are PIL RGB images by default (the processor converts them like real data); with
``image_format="tensor"`` they are float32 tensors (3, R, R) in [0, 1].

Seeds: a split is a range of seeds; ``SPLITS`` keeps train, val and test disjoint (samples.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .samples import KINDS, Mix, make_sample
from .world import WorldConfig

IMAGE_FORMATS = ("pil", "tensor")


def _to_format(sample: dict[str, Any], image_format: str) -> dict[str, Any]:
    if image_format == "tensor":
        sample["images"] = [
            torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
            .permute(2, 0, 1)
            .contiguous()  # (3, R, R)
            for im in sample["images"]
        ]
    return sample


def _check(resolution: int, image_format: str, kinds: Sequence[str] | None) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    bad = [k for k in (kinds or ()) if k not in KINDS]
    if bad:
        raise ValueError(f"unknown sample kinds {bad}; known: {KINDS}")


class ShapesDataset(Dataset):
    """Map-style ShapesWorld: item i is the sample of seed ``seeds[i]`` (kind drawn by ``mix``).

    Args:
        seeds: the split's seeds, e.g. split_seeds("train", 100_000).
        resolution: image side (64, 128, 256, 512).
        mix: understanding : generation : editing : text weights.
        world: vocabulary and scene sizes.
        kind: force every item to one kind (ignores ``mix``).
        image_format: "pil" or "tensor".
    """

    def __init__(
        self,
        seeds: Sequence[int] = range(10_000),
        resolution: int = 128,
        mix: Mix | None = None,
        world: WorldConfig | None = None,
        kind: str | None = None,
        image_format: str = "pil",
    ) -> None:
        _check(resolution, image_format, [kind] if kind else None)
        self.seeds = seeds
        self.resolution = resolution
        self.mix = mix or Mix()
        self.world = world or WorldConfig()
        self.kind = kind
        self.image_format = image_format

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        seed = int(self.seeds[i])
        kind = self.kind or self.mix.kind_for(seed)
        return _to_format(make_sample(seed, kind, self.resolution, self.world), self.image_format)


class ShapesStream(IterableDataset):
    """Infinite ShapesWorld stream. Worker w of W (DataLoader) on rank r of R (distributed) yields the
    seeds start + (r * W + w) + k * R * W, k = 0, 1, ...: disjoint across workers and ranks, and the
    same every run.

    Args:
        start: first seed.
        resolution, mix, world, image_format: as for ShapesDataset.
        rank, world_size: this process's place in a distributed job.
    """

    def __init__(
        self,
        start: int = 0,
        resolution: int = 128,
        mix: Mix | None = None,
        world: WorldConfig | None = None,
        image_format: str = "pil",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check(resolution, image_format, None)
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.start = start
        self.resolution = resolution
        self.mix = mix or Mix()
        self.world = world or WorldConfig()
        self.image_format = image_format
        self.rank = rank
        self.world_size = world_size

    def seeds(self) -> Iterator[int]:
        """This worker's seeds, forever."""
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stride = self.world_size * nw
        seed = self.start + self.rank * nw + w
        while True:
            yield seed
            seed += stride

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for seed in self.seeds():
            yield _to_format(
                make_sample(seed, self.mix.kind_for(seed), self.resolution, self.world), self.image_format
            )
