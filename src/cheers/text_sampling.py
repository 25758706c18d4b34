"""Choosing the next text token from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_TEMPERATURE = 1e-6  # the release decodes greedily at or below this temperature


@dataclass(frozen=True)
class TextSampling:
    """Text decoding settings (the release uses only temperature and top-p).

    Args:
        temperature: <= 1e-6 means greedy (argmax).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1 = off).
        repetition_penalty: > 1 discourages every token already in the row (prompt and output), the CTRL rule:
            positive logits are divided by it, negative ones multiplied.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (
            isinstance(self.repetition_penalty, (int, float))
            and math.isfinite(self.repetition_penalty)
            and self.repetition_penalty > 0
        ):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def penalize_repetition(
    logits: torch.Tensor, histories: Sequence[Sequence[int]], penalty: float
) -> torch.Tensor:
    """Apply the repetition penalty row by row (R, V) -> (R, V)."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for r, seen in enumerate(histories[: logits.shape[0]]):
        ids = torch.tensor(
            sorted({i for i in seen if 0 <= i < logits.shape[1]}), dtype=torch.long, device=logits.device
        )
        if ids.numel():
            vals = logits[r, ids]
            logits[r, ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus. (R, V) -> (R, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def pick_tokens(
    logits: torch.Tensor,
    histories: Sequence[Sequence[int]],
    sampling: TextSampling,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token per row: (R, V) logits -> (R,) ids. A list of generators samples row r from generator r."""
    logits = penalize_repetition(logits.float(), histories, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
