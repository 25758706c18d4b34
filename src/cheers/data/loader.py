"""The training data stream: sources mixed by ratio, cut into micro-batches, every one a pure function of its
index.

Positions. Sample ``p`` of the global stream belongs to optimizer step ``p // G`` (G = global batch). Process
``r`` of ``W``, accumulation step ``a`` of ``A``, reads positions ``s·G + (a·W + r)·M ... + M - 1`` (M = micro
batch). So the samples of a step do not depend on the number of processes, and a resumed run reads exactly
what an uninterrupted one would have.

Mixing. Ratios such as 3:6:1 form a cycle of 10 positions; each cycle is a seeded shuffle of
``[0, 0, 0, 1, 1, 1, 1, 1, 1, 2]``. Position ``p`` therefore maps to (source, k-th item of that source)
without any state, and the k-th item of a source is ``epoch_order(k // len)[k % len]``.

Corrupt samples. A position whose record or image cannot be read is counted and replaced by a seeded random
record of the same source (up to ``max_retries`` draws). The loop stops when the fraction of corrupt reads
exceeds ``max_corrupt_fraction`` (after ``corrupt_grace`` reads) with :class:`CorruptDataError`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cheers.data.samples import mix_seed
from cheers.data.shapes_source import ShapesSource
from cheers.data.shards import ShardSource
from cheers.data.sources import CorruptSample, JsonlSource, Source

logger = logging.getLogger(__name__)


class CorruptDataError(RuntimeError):
    """Too many unreadable samples: the data is broken, not noisy."""


@dataclass(frozen=True)
class Layout:
    """How the global stream is cut: micro batch M, accumulation A, processes W, this process's rank."""

    micro_batch: int
    accumulation: int
    world_size: int = 1
    rank: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def positions(self, micro_index: int) -> range:
        """Global stream positions of this rank's micro-batch number ``micro_index`` (= step·A + a)."""
        step, a = divmod(micro_index, self.accumulation)
        start = step * self.global_batch + (a * self.world_size + self.rank) * self.micro_batch
        return range(start, start + self.micro_batch)


class Mixture:
    """Position -> (source index, index within that source's infinite stream) for integer ratios."""

    def __init__(self, ratios: Sequence[int], seed: int = 0) -> None:
        if not ratios or any(int(r) != r or r <= 0 for r in ratios):
            raise ValueError(f"mixture ratios must be positive whole numbers, got {list(ratios)}")
        self.ratios = [int(r) for r in ratios]
        self.seed = seed
        self.pattern = np.repeat(np.arange(len(self.ratios)), self.ratios)  # e.g. [0,0,0,1,1,1,1,1,1,2]

    @lru_cache(maxsize=64)  # noqa: B019 - a handful of recent cycles per worker
    def _cycle(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        order = self.pattern[np.random.default_rng([self.seed, 0x5EED, block]).permutation(len(self.pattern))]
        rank_in_block = np.zeros(len(order), dtype=np.int64)
        seen = np.zeros(len(self.ratios), dtype=np.int64)
        for i, s in enumerate(order):
            rank_in_block[i] = seen[s]
            seen[s] += 1
        return order, rank_in_block

    def locate(self, position: int) -> tuple[int, int]:
        block, offset = divmod(position, len(self.pattern))
        order, rank = self._cycle(block)
        source = int(order[offset])
        return source, block * self.ratios[source] + int(rank[offset])


@dataclass
class CorruptTracker:
    """Running counts of read and corrupt samples, checked against the threshold."""

    attempted: int = 0
    corrupt: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, attempted: int, corrupt: int, reasons: dict[str, int]) -> None:
        self.attempted += attempted
        self.corrupt += corrupt
        self.reasons = dict(Counter(self.reasons) + Counter(reasons))

    @property
    def fraction(self) -> float:
        return self.corrupt / max(self.attempted, 1)

    def check(self, max_fraction: float, grace: int) -> None:
        if self.attempted >= grace and self.fraction > max_fraction:
            raise CorruptDataError(
                f"{self.corrupt} of {self.attempted} samples read so far were corrupt "
                f"({self.fraction:.2%}), more than data.max_corrupt_fraction={max_fraction:.2%}; "
                f"reasons: {self.reasons}. Fix the data or raise the threshold."
            )

    def state_dict(self) -> dict:
        return {"attempted": self.attempted, "corrupt": self.corrupt, "reasons": dict(self.reasons)}

    def load_state_dict(self, state: dict) -> None:
        self.attempted, self.corrupt = int(state["attempted"]), int(state["corrupt"])
        self.reasons = {str(k): int(v) for k, v in state["reasons"].items()}


class MicroBatches(Dataset):
    """Map-style dataset whose item ``m`` is this rank's collated micro-batch number ``m``.

    Args:
        sources: the mixture's sources.
        ratios: one whole-number ratio per source.
        builder: ``builder(record, images, seed) -> sample``; raises CorruptSample for unusable records
            (normally a :class:`~cheers.data.samples.SampleBuilder`).
        collate_fn: samples -> batch with ``attempted``, ``corrupt`` and ``reasons`` attributes (normally
            ``functools.partial(collate, pad_id=...)``).
        layout: how the stream is cut (see :class:`Layout`).
        seed: data seed (mixture cycles, epoch orders, per-sample randomness).
        max_retries: replacement draws for one corrupt position.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        ratios: Sequence[int],
        builder: Callable[..., Any],
        collate_fn: Callable[[list[Any]], Any],
        layout: Layout,
        seed: int = 0,
        max_retries: int = 16,
    ) -> None:
        if len(sources) != len(ratios):
            raise ValueError(f"{len(sources)} sources but {len(ratios)} ratios")
        if not sources:
            raise ValueError("the data mixture has no sources")
        self.sources = list(sources)
        self.mixture = Mixture(ratios, seed)
        self.builder = builder
        self.collate_fn = collate_fn
        self.layout = layout
        self.seed = seed
        self.max_retries = max_retries
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:  # effectively infinite; the sampler decides what is read
        return 1 << 62

    def _order(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) >= 2 * len(self.sources):
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = self.sources[source].epoch_order(epoch, self.seed)
        return self._orders[key]

    def record_index(self, position: int) -> tuple[int, int]:
        """(source, record index) read at a stream position (before any corrupt replacement)."""
        source, k = self.mixture.locate(position)
        epoch, i = divmod(k, len(self.sources[source]))
        return source, int(self._order(source, epoch)[i])

    def sample(self, position: int, stats: Counter) -> Any:
        source, index = self.record_index(position)
        src = self.sources[source]
        for attempt in range(self.max_retries + 1):
            if attempt:
                index = mix_seed(self.seed, position, attempt, 0xC0) % len(src)
            stats["attempted"] += 1
            try:
                record, images = src.load(index)
                return self.builder(record, images, mix_seed(self.seed, position, attempt))
            except CorruptSample as err:
                stats["corrupt"] += 1
                stats[f"reason:{err.reason}"] += 1
                logger.warning(
                    "skipping corrupt sample %s[%d] at position %d: %s", src.name, index, position, err
                )
        raise CorruptDataError(
            f"position {position}: {self.max_retries + 1} draws from source {src.name!r} were all corrupt"
        )

    def __getitem__(self, micro_index: int) -> Any:
        stats: Counter = Counter()
        samples = [self.sample(p, stats) for p in self.layout.positions(micro_index)]
        batch = self.collate_fn(samples)
        batch.attempted, batch.corrupt = stats["attempted"], stats["corrupt"]
        batch.reasons = {k[7:]: v for k, v in stats.items() if k.startswith("reason:")}
        return batch


def _identity(batch: Any) -> Any:
    return batch


def make_loader(
    dataset: MicroBatches,
    start: int,
    stop: int,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """Micro-batches ``start .. stop - 1`` in order (workers share the work; results keep the order)."""
    kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        **kwargs,
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators (model initialisation, any stray draws)."""
    import random

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def build_sources(specs: Sequence, resolution: int = 128) -> tuple[list[Source], list[int]]:
    """Sources and their ratios from the recipe's ``data.sources``
    (:class:`~cheers.training.config.SourceSpec`)."""
    sources: list[Source] = []
    for i, spec in enumerate(specs):
        name = spec.name or f"source{i}"
        if spec.kind == "jsonl":
            sources.append(JsonlSource(spec.path, spec.image_root, name=name, task=spec.task))
        elif spec.kind == "shards":
            sources.append(ShardSource(spec.path, name=name, task=spec.task))
        elif spec.kind == "shapes":
            sources.append(ShapesSource(spec.task, spec.size, spec.seed, resolution, name, spec.options))
        else:
            raise ValueError(f"data.sources.{i}.kind: unknown kind {spec.kind!r}")
    return sources, [int(spec.ratio) for spec in specs]
