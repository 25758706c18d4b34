"""The language model's KV cache for generation: prefill a prompt, extend it, crop it back (reference §10.1).

Dimension legend: R cache rows, T cache length (static cache: its capacity), Dt LLM width, V vocabulary.

Every row is independent: each has its own valid keys (padding and invalidated entries are masked) and its
own next position id. The cache is transformers' ``DynamicCache`` (grows by concatenation, the default) or,
opt-in, a pre-allocated ``StaticCache`` (written in place, see :func:`to_static`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from cheers.models.cheers import Cheers


@dataclass
class LMState:
    """The KV cache of R rows and, per row, which cached keys are real and the next position id.

    With a dynamic cache (transformers' ``DynamicCache``, the default) the cache holds exactly T entries. With
    a static one (``StaticCache``, :func:`to_static`) it is pre-allocated to a capacity, ``used`` entries are
    written and ``key_valid`` spans the capacity (False past ``used``).
    """

    cache: object
    key_valid: torch.Tensor  # (R, T) bool
    next_pos: torch.Tensor  # (R,) long
    last_logits: torch.Tensor  # (R, V) logits after the last real token of each row
    used: int | None = None  # static cache: entries written; None for a dynamic cache

    @property
    def static(self) -> bool:
        return self.used is not None

    @property
    def length(self) -> int:
        return self.key_valid.shape[1] if self.used is None else self.used

    def crop(self, length: int, next_pos: torch.Tensor) -> None:
        """Drop every cache entry past ``length`` and restore the rows' next positions."""
        if self.length > length:
            if self.static:  # the entries stay in memory, masked, and are overwritten by the next ones
                for layer in self.cache.layers:
                    layer.cumulative_length.fill_(length)
                self.key_valid[:, length:] = False
                self.used = length
            else:
                self.cache.crop(length - self.length)  # a negative count removes that many entries
                self.key_valid = self.key_valid[:, :length]
        self.next_pos = next_pos.clone()

    def first_rows(self, rows: int) -> LMState:
        """A state over the first ``rows`` rows whose cache holds views of this one's keys and values (no
        copy).

        Extending it leaves this state's metadata untouched; with a dynamic cache its tensors too, with a
        static one the new entries are written into the shared memory, past this state's ``used`` (so masked
        here).
        """
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:rows], layer.values[:rows]  # basic slicing: views
            if self.static:
                layer.cumulative_length = layer.cumulative_length.clone()
        return LMState(
            cache, self.key_valid[:rows].clone(), self.next_pos[:rows], self.last_logits[:rows], self.used
        )


def to_static(model: Cheers, state: LMState, capacity: int) -> LMState:
    """Copy a prefilled dynamic cache into a pre-allocated ``StaticCache`` of ``capacity`` entries.

    Decoding then writes in place instead of concatenating (the step's tensors keep their shapes, what
    ``torch.compile`` and CUDA graphs need); each step attends over the whole capacity with the unused part
    masked, which gives the dynamic path's tokens (``tests/test_understanding_cache.py``).
    """
    from transformers import StaticCache

    if state.static:
        return state
    if capacity < state.length:
        raise ValueError(f"a static cache of {capacity} entries cannot hold the {state.length} of the prompt")
    cache = StaticCache(config=model.model.language_model.config, max_cache_len=capacity)
    for i, layer in enumerate(state.cache.layers):
        cache.update(layer.keys, layer.values, i)  # allocates (R, H, capacity, Dh), writes entries 0 … P-1
    key_valid = torch.nn.functional.pad(state.key_valid, (0, capacity - state.length), value=False)
    return LMState(cache, key_valid, state.next_pos, state.last_logits, used=state.length)


def prefill(
    model: Cheers,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    repeat_images: int = 1,
) -> LMState:
    """Run the prompt (images at t = 1) and keep its cache; the last real position seeds decoding.

    ``repeat_images`` > 1 tokenizes ``pixel_values`` once and feeds the tokens to that many copies of the
    batch (the guidance branches share their images).
    """
    features = None
    if pixel_values is not None:
        features = model.model.image_features(pixel_values)
        if repeat_images > 1:
            features = dataclasses.replace(features, tokens=features.tokens.repeat(repeat_images, 1, 1))
    out = model(input_ids, attention_mask, use_cache=True, image_features=features)
    asm = out.assembled
    last = (asm.lengths - 1).clamp(min=0)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    logits = out.logits[rows, last]  # (R, V)
    return LMState(out.past_key_values, asm.valid.clone(), asm.lengths.clone(), logits)


def extend(
    model: Cheers, state: LMState, embeds: torch.Tensor, active: torch.Tensor, bidirectional: bool
) -> torch.Tensor:
    """Append T new positions per row to the cache; returns their final hidden states (R, T, Dt).

    New tokens see every real cached key of their row and each other (all of them when ``bidirectional``,
    else causally). Rows with ``active`` False compute but their entries are marked invalid and their
    positions do not advance.
    """
    rows, new = embeds.shape[:2]
    device = embeds.device
    positions = state.next_pos[:, None] + torch.arange(new, device=device)  # (R, T)
    if bidirectional:
        block = torch.ones(new, new, dtype=torch.bool, device=device)
    else:
        block = torch.ones(new, new, dtype=torch.bool, device=device).tril()
    past = state.key_valid[:, None, :].expand(rows, new, -1)  # (R, T, P), static: (R, T, capacity)
    if state.static:
        start = state.used
        if start + new > state.key_valid.shape[1]:
            raise RuntimeError(
                f"the static KV cache is full: {start} + {new} > {state.key_valid.shape[1]} entries"
            )
        mask = past.clone()
        mask[:, :, start : start + new] = block
        mask = mask[:, None]  # (R, 1, T, capacity)
    else:
        mask = torch.cat([past, block.expand(rows, -1, -1)], dim=-1)[:, None]  # (R, 1, T, P+T)
    out = model.run_language_model(embeds, mask, positions, state.cache, use_cache=True)
    if state.static:
        state.key_valid[:, start : start + new] = active[:, None]
        state.used = start + new
    else:
        state.key_valid = torch.cat([state.key_valid, active[:, None].expand(rows, new)], dim=1)
    state.next_pos = state.next_pos + active.long() * new
    return out.last_hidden_state


class StaticDecoder:
    """One text decode step (one new token per row) on a static cache, through fixed input and output buffers.

    Each :meth:`step` writes the new tokens' embeddings, positions and attention row into the same tensors, so
    the language model always sees the same shapes and addresses; with ``cuda_graph`` the step (all layers
    and the LM head) is captured once in a CUDA graph and replayed, which removes the per-kernel launch cost
    that bounds single-stream decoding of a large model. The write position lives on the device
    (the cache's ``cumulative_length``, advanced inside the step), so crops and images between steps, which
    reset it in place, are seen by the replay. Equal to :func:`extend` with one token (tested).

    The state is read at every step (its mask, positions and ``used`` may change between steps); only its
    cache object must stay the same, as it does within one :func:`cheers.generation.generate` call.
    """

    def __init__(self, model: Cheers, state: LMState, cuda_graph: bool = False) -> None:
        if not state.static:
            raise ValueError("StaticDecoder needs a static cache (to_static)")
        device = state.key_valid.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device.type!r}")
        rows, capacity = state.key_valid.shape
        embed = model.model.language_model.embed_tokens.weight
        self.model, self.state, self.cuda_graph = model, state, cuda_graph
        self.embeds = torch.zeros(rows, 1, embed.shape[1], dtype=embed.dtype, device=device)
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.graph = None
        self.graph_logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        out = self.model.run_language_model(
            self.embeds, self.mask, self.positions, self.state.cache, use_cache=True
        )
        return self.model.lm_head(out.last_hidden_state[:, -1])  # (R, V)

    def _capture(self) -> None:
        counters = [layer.cumulative_length for layer in self.state.cache.layers]
        saved = [c.clone() for c in counters]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy initialisations, workspace sizes)
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        for c, s in zip(counters, saved):  # the warm-up wrote masked entries past `used`; write there again
            c.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self._forward()

    def step(self, embeds: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Append one position per row (embeds (R, 1, Dt)); returns and stores the next logits (R, V).

        Rows with ``active`` False compute but their entry is invalid and their position does not advance."""
        state = self.state
        used, capacity = state.used, state.key_valid.shape[1]
        # the warm-up before a capture writes two entries past `used`
        if used + (3 if self.cuda_graph and self.graph is None else 1) > capacity:
            raise RuntimeError(f"the static KV cache is full: {used} + 1 > {capacity} entries")
        self.embeds.copy_(embeds)
        self.positions.copy_(state.next_pos[:, None])
        self.mask[:, 0, 0].copy_(state.key_valid)
        self.mask[:, 0, 0, used] = True
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.graph_logits.clone()
        else:
            logits = self._forward()
        state.key_valid[:, used] = active
        state.used = used + 1
        state.next_pos = state.next_pos + active.long()
        state.last_logits = logits
        return logits
