"""ShapesWorld as a training source, and the ShapesWorld processor: thin adapters over
:mod:`cheers.data.shapes`.

``ShapesDataset`` items are release records with their images in memory (``"images"``); item ``i`` is a pure
function of its seed, which is what the data pipeline needs for exact resumption.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import numpy as np

from cheers.data.shapes import (
    SPECIAL_TOKENS,
    Mix,
    ShapesDataset,
    WorldConfig,
    build_shapes_tokenizer,
    split_seeds,
)
from cheers.data.shapes.concept import Concept, concept_sample
from cheers.data.shapes.ladder import SHORT_RUNGS, check_rung, rung_sample, zoom_factor
from cheers.data.shapes.tokenizer import DEFAULT_VOCAB_SIZE
from cheers.data.sources import _stable_hash, permutation
from cheers.processor import CheersProcessor

logger = logging.getLogger(__name__)

KINDS = ("understanding", "generation", "editing", "text")


class ShapesSource:
    """ShapesWorld records for training.

    Args:
        task: ``understanding``, ``generation``, ``editing``, ``text`` (every item of that kind) or ``mixed``
            (the kind drawn per seed by the ShapesWorld ``Mix``; weights in ``options["mix"]``).
        size: items per epoch: seeds ``first_seed .. first_seed + size - 1`` of the split.
        first_seed: offset into the split (``seed`` in the recipe); sources with different tasks may share it.
        resolution: rendered image side (a multiple of 64); the processor resizes to the model's size.
        name: the source's name in the mixture.
        options: ``split`` (train | val | test), ``mix`` (dict of Mix weights), ``world`` (WorldConfig
            fields), ``rung`` (generation only: the text-to-image samples of a learnability-ladder rung,
            L0..L3, instead of the world's; :mod:`cheers.data.shapes.ladder`), ``zoom`` (with ``rung: L1``
            or ``L2``: a magnification factor or a ``[lo, hi]`` range drawn per sample, which enlarges the
            objects),
            ``short`` (with ``rung: L1`` or ``L2``: prompts without the background sentence, in
            ShapesGenEval's own form),
            ``concept`` (generation or understanding: samples that teach a new word for one fixed scene;
            :class:`Concept` fields, e.g. ``{word: wug, shape: star, color: purple, background: black}``; see
            :mod:`cheers.data.shapes.concept`).
    """

    def __init__(
        self,
        task: str = "mixed",
        size: int = 100_000,
        first_seed: int = 0,
        resolution: int = 128,
        name: str = "shapes",
        options: dict[str, Any] | None = None,
    ) -> None:
        if task not in (*KINDS, "mixed"):
            raise ValueError(f"unknown ShapesWorld task {task!r}; choose one of {(*KINDS, 'mixed')}")
        options = dict(options or {})
        split = split_seeds(options.pop("split", "train"))
        mix = Mix(**options.pop("mix", {}))
        world = WorldConfig(**options.pop("world", {}))
        self.rung = options.pop("rung", None)
        self.zoom = options.pop("zoom", 1.0)
        self.short = bool(options.pop("short", False))
        concept = options.pop("concept", None)
        if options:
            raise ValueError(
                f"source {name!r}: unknown ShapesWorld options {sorted(options)}; "
                "known: split, mix, world, rung, zoom, short, concept"
            )
        self.concept = None
        if concept is not None:
            if not isinstance(concept, dict):
                raise ValueError(f"source {name!r}: concept must be a mapping of Concept fields: {concept!r}")
            if task not in ("generation", "understanding") or self.rung is not None:
                raise ValueError(
                    f"source {name!r}: a concept source is task generation or understanding, without a rung"
                )
            try:
                self.concept = Concept(**concept)
            except TypeError as err:
                raise ValueError(f"source {name!r}: concept: {err}") from None
        if self.zoom != 1.0 and self.rung is None:
            raise ValueError(f"source {name!r}: zoom needs a ladder rung (rung: L1 or L2)")
        if self.short and self.rung not in SHORT_RUNGS:
            raise ValueError(f"source {name!r}: short needs a ladder rung L1 or L2, got rung {self.rung!r}")
        if self.rung is not None:
            check_rung(self.rung)
            try:
                zoom_factor(self.rung, self.zoom, 0)
            except ValueError as err:
                raise ValueError(f"source {name!r}: {err}") from None
            if task != "generation":
                raise ValueError(
                    f"source {name!r}: a ladder rung is a text-to-image source; set task: generation"
                )
        if first_seed + size > len(split):
            raise ValueError(f"source {name!r}: seeds {first_seed}..{first_seed + size} exceed the split")
        self.name, self.task, self.size = name, task, int(size)
        self.dataset = ShapesDataset(
            split[first_seed : first_seed + size],
            resolution,
            mix,
            world,
            kind=None if task == "mixed" else task,
        )
        self.resolution = resolution

    def __len__(self) -> int:
        return self.size

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        return permutation(self.size, seed, epoch, _stable_hash(self.name))

    def load(self, index: int) -> tuple[dict[str, Any], list[Any]]:
        if self.concept is not None:
            sample = concept_sample(self.concept, self.task, int(self.dataset.seeds[index]), self.resolution)
            images = sample.pop("images")
            return sample, images
        if self.rung is not None:
            seed = int(self.dataset.seeds[index])
            sample = rung_sample(self.rung, seed, self.resolution, self.zoom, self.short)
            record = {"id": f"ladder-{self.rung}-{seed}", "kind": "generation", **sample.record, "seed": seed}
            return record, [sample.image]
        sample = dict(self.dataset[index])
        images = sample.pop("images")
        return sample, images


def build_shapes_processor(image_size: int, patch_size: int, model_vocab: int):
    """The ShapesWorld tokenizer (trained in a temporary folder; deterministic) wrapped in a CheersProcessor.

    The BPE vocabulary is capped so that it and the eight special tokens fit the model's embedding table.
    """
    vocab = min(DEFAULT_VOCAB_SIZE, model_vocab - len(SPECIAL_TOKENS))
    with tempfile.TemporaryDirectory(prefix="cheers-shapes-tokenizer-") as folder:
        build_shapes_tokenizer(folder, vocab_size=vocab)
        processor = CheersProcessor.from_pretrained(folder, image_size=image_size, patch_size=patch_size)
    logger.info("built the ShapesWorld tokenizer: %d entries", len(processor.tokenizer))
    return processor
