"""One record + its images -> one training sample: ids, labels, images with their flow times and noise
(reference §11).

Rules (the release's):

* understanding images (``<image>``, marker -200): understanding preprocessing, t = 1;
* generation / edit-target images (``<image_gen>``, -300): generation preprocessing, t ~ U(0, 1) clamped;
* a record without any image placeholder (text only) gets the all-zero R×R image at t = 0, which the model
  prepends to the row;
* with probability ``cfg_dropout`` a sample with a generation image has its input ids (not its labels)
  replaced by the unconditional ids (``cfg_dropout_ids``).

Every random draw (dropout, t, the flow noise x0) comes from a generator seeded by the sample's position in
the data stream, so a sample is the same whichever process, worker or resumed run builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cheers.data.sources import CorruptSample
from cheers.flow import sample_t
from cheers.processor import CheersProcessor

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps); stable across processes and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x >> 1


@dataclass
class TrainSample:
    """Dimension legend: L ids, n images, R image side, C latent channels, h×w latent grid."""

    input_ids: torch.Tensor  # (L,) with markers
    labels: torch.Tensor  # (L,) unshifted
    pixel_values: torch.Tensor  # (n, 3, R, R) in [0, 1]
    t: torch.Tensor  # (n,)
    x0: torch.Tensor  # (n, C, h, w) flow noise (zeros for t = 1 images)
    task: str  # understanding | generation | editing | text
    cfg_dropped: bool = False


class SampleBuilder:
    """Turns (record, images) into a :class:`TrainSample`.

    Args:
        processor: tokenizer + image preprocessing (its ``image_size`` is the training resolution R).
        latent_shape: (C, h, w) of the flow noise for one image.
        cfg_dropout: probability of the unconditional ids for samples with a generation image.
        max_length: samples whose expanded length (ids + N tokens per image) exceeds this are skipped.
        tokens_per_image: N, the LLM tokens of one image.
        time_sampling: keyword arguments of :func:`cheers.flow.sample_t` (``kind``, ``loc``, ``scale``) for
            the generation images' flow times; default the release's U(0, 1).
    """

    def __init__(
        self,
        processor: CheersProcessor,
        latent_shape: tuple[int, int, int],
        cfg_dropout: float = 0.2,
        max_length: int | None = None,
        tokens_per_image: int = 0,
        time_sampling: dict[str, Any] | None = None,
    ) -> None:
        self.processor = processor
        self.special = processor.special
        self.latent_shape = tuple(latent_shape)
        self.cfg_dropout = cfg_dropout
        self.max_length = max_length
        self.tokens_per_image = tokens_per_image
        self.time_sampling = dict(time_sampling or {})
        sample_t(1, torch.Generator().manual_seed(0), **self.time_sampling)  # a bad kind or scale fails here

    def __call__(self, record: dict[str, Any], images: list[Any], seed: int) -> TrainSample:
        """Raises CorruptSample when the record's text, images or length cannot be used."""
        gen = torch.Generator().manual_seed(seed)
        try:
            input_ids, labels = self.processor.encode_conversation(record)
        except ValueError as err:
            raise CorruptSample("bad_record", f"{record.get('id')!r}: {err}") from None
        und, gen_marker = self.special.image_marker, self.special.image_gen_marker
        markers = [int(i) for i in input_ids if int(i) in (und, gen_marker)]
        if len(markers) != len(images):
            raise CorruptSample(
                "bad_record", f"{record.get('id')!r}: {len(markers)} placeholders, {len(images)} images"
            )
        n_img = max(len(markers), 1)
        if self.max_length is not None:
            expanded = len(input_ids) - len(markers) + n_img * self.tokens_per_image
            if expanded > self.max_length:
                raise CorruptSample(
                    "too_long", f"{record.get('id')!r}: {expanded} > {self.max_length} positions"
                )
        # 1. CFG dropout (one draw per sample, always taken so the stream of draws does not depend on the
        # task)
        dropped = bool(torch.rand((), generator=gen) < self.cfg_dropout) and gen_marker in markers
        if dropped:
            input_ids = self.processor.cfg_dropout_ids(input_ids)
        # 2. images, times and noise, in order of appearance
        size = self.processor.image_size
        pixels, times, noise = [], [], []
        for marker, image in zip(markers, images):
            try:
                if marker == und:
                    pixels.append(self.processor.preprocess_understanding(image))
                else:
                    pixels.append(self.processor.preprocess_generation(image))
            except (ValueError, OSError) as err:
                raise CorruptSample("unreadable_image", f"{record.get('id')!r}: {err}") from None
            if marker == und:
                times.append(torch.ones(1))
                noise.append(torch.zeros(self.latent_shape))
            else:
                times.append(sample_t(1, gen, **self.time_sampling))
                noise.append(torch.randn(self.latent_shape, generator=gen))
        if not markers:  # text only: the release's all-zero image at t = 0
            pixels.append(torch.zeros(3, size, size))
            times.append(torch.zeros(1))
            noise.append(torch.randn(self.latent_shape, generator=gen))
        task = _task(markers, und, gen_marker)
        return TrainSample(
            input_ids, labels, torch.stack(pixels), torch.cat(times), torch.stack(noise), task, dropped
        )


def _task(markers: list[int], und: int, gen: int) -> str:
    if not markers:
        return "text"
    if gen in markers:
        return "editing" if und in markers else "generation"
    return "understanding"
