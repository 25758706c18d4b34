"""Splicing image tokens into the text sequence, the hybrid attention mask and the training labels (SPEC §5, §11).

Dimension legend: B rows, L input length, L' expanded length, N tokens per image, Dt text width.

Input ids carry two negative markers: ``image_marker`` (an understanding image, the release's -200) and
``image_gen_marker`` (an image to generate, -300). Each marker becomes the N tokens of the next image.
A row without any marker still consumes the next image when the batch has one image per such row (the
release's "dummy image" of text-only prompts): its tokens go in *front* of the row and are attended causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100


@dataclass
class Assembled:
    """The expanded batch fed to the LLM."""

    embeds: torch.Tensor  # (B, L', Dt), zero vectors at padding
    image_flags: torch.Tensor  # (B, L') bool: spliced image tokens (bidirectional blocks)
    image_slots: torch.Tensor  # (B, L') bool: every image token, prepended dummy-image tokens included
    valid: torch.Tensor  # (B, L') bool: real (non-pad) positions
    labels: torch.Tensor | None  # (B, L') expanded labels: markers at image slots, IGNORE_INDEX at padding
    lengths: torch.Tensor  # (B,) real length of each row


def assemble(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor | None,
    embed_tokens: nn.Embedding,
    markers: tuple[int, int],
    labels: torch.Tensor | None = None,
    max_length: int | None = None,
) -> Assembled:
    """Build the LLM input (SPEC §5).

    Args:
        input_ids: (B, L) ids with image markers.
        attention_mask: (B, L) 1 = real token; positions with 0 are dropped first.
        image_tokens: (n_img, N, Dt) image tokens in order of appearance (row by row), or None.
        embed_tokens: the LLM's token embedding.
        markers: (understanding marker, generation marker), e.g. (-200, -300).
        labels: optional (B, L) labels aligned with ``input_ids``.
        max_length: truncate every row to this many positions.
    """
    batch = input_ids.shape[0]
    marker_t = torch.tensor(markers, device=input_ids.device)
    keep = attention_mask.bool()
    rows = [input_ids[b][keep[b]] for b in range(batch)]
    row_labels = [labels[b][keep[b]] for b in range(batch)] if labels is not None else None
    n_markers = [int(torch.isin(r, marker_t).sum()) for r in rows]
    n_img = 0 if image_tokens is None else image_tokens.shape[0]
    markerless = sum(1 for n in n_markers if n == 0)
    if n_img == sum(n_markers) + markerless:
        prefix_rows = True
    elif n_img == sum(n_markers):
        prefix_rows = False
    else:
        raise ValueError(
            f"the batch has {sum(n_markers)} image marker(s) and {markerless} row(s) without a marker, but "
            f"{n_img} image(s) were given: expected {sum(n_markers)} (no prefix images) or "
            f"{sum(n_markers) + markerless} (one prefix image per row without a marker)")
    dim = embed_tokens.embedding_dim
    dtype = embed_tokens.weight.dtype if image_tokens is None else image_tokens.dtype
    images = iter(image_tokens) if image_tokens is not None else iter(())
    pieces = []
    for b, ids in enumerate(rows):
        row = _RowBuilder(ids, row_labels[b] if row_labels is not None else None, embed_tokens, dtype)
        if n_markers[b] == 0:
            if prefix_rows:
                row.add_image(next(images), flagged=False, marker=markers[0])
            row.add_text(slice(None))
        else:
            start = 0
            for pos in torch.nonzero(torch.isin(ids, marker_t)).flatten().tolist():
                row.add_text(slice(start, pos))
                row.add_image(next(images), flagged=True, marker=int(ids[pos]))
                start = pos + 1
            row.add_text(slice(start, None))
        pieces.append(row.build(max_length))

    lengths = torch.tensor([p[0].shape[0] for p in pieces], device=input_ids.device)
    width = int(lengths.max())
    embeds = input_ids.new_zeros((batch, width, dim), dtype=dtype)
    image_flags = torch.zeros(batch, width, dtype=torch.bool, device=input_ids.device)
    image_slots = torch.zeros_like(image_flags)
    valid = torch.zeros_like(image_flags)
    out_labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
    for b, (e, f, s, lab) in enumerate(pieces):
        n = e.shape[0]
        embeds[b, :n], image_flags[b, :n], image_slots[b, :n], valid[b, :n], out_labels[b, :n] = e, f, s, True, lab
    return Assembled(embeds, image_flags, image_slots, valid, out_labels if labels is not None else None, lengths)


class _RowBuilder:
    """Collects one expanded row: embeddings, image flags, image slots and labels, piece by piece."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor | None, embed_tokens: nn.Embedding,
                 dtype: torch.dtype) -> None:
        self.ids, self.labels, self.embed_tokens, self.dtype = ids, labels, embed_tokens, dtype
        self.embs: list[torch.Tensor] = []
        self.flags: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []
        self.labs: list[torch.Tensor] = []

    def _add(self, emb: torch.Tensor, flag: bool, slot: bool, lab: torch.Tensor) -> None:
        n = emb.shape[0]
        self.embs.append(emb)
        self.flags.append(torch.full((n,), flag, dtype=torch.bool, device=self.ids.device))
        self.slots.append(torch.full((n,), slot, dtype=torch.bool, device=self.ids.device))
        self.labs.append(lab)

    def add_image(self, tokens: torch.Tensor, flagged: bool, marker: int) -> None:
        """N image tokens (N, Dt); ``flagged`` ones form a bidirectional block, prefixed ones do not."""
        lab = torch.full((tokens.shape[0],), marker, dtype=torch.long, device=self.ids.device)
        self._add(tokens, flagged, True, lab)

    def add_text(self, span: slice) -> None:
        seg = self.ids[span]
        if seg.numel():
            lab = self.labels[span] if self.labels is not None else seg
            self._add(self.embed_tokens(seg).to(self.dtype), False, False, lab)

    def build(self, max_length: int | None):
        if not self.embs:
            raise ValueError("a row of the batch is empty (its attention mask has no 1)")
        parts = (torch.cat(self.embs), torch.cat(self.flags), torch.cat(self.slots), torch.cat(self.labs))
        return tuple(x[:max_length] for x in parts) if max_length is not None else parts


def _run_ids(flags: torch.Tensor) -> torch.Tensor:
    """Index of the maximal run of equal values each position belongs to: (B, L) -> (B, L)."""
    change = torch.ones_like(flags, dtype=torch.long)
    change[:, 1:] = (flags[:, 1:] != flags[:, :-1]).long()
    return change.cumsum(dim=1)


def hybrid_mask(image_flags: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The boolean LLM mask (True = may attend), (B, L') -> (B, 1, L', L') (SPEC §5).

    ``((k ≤ q) or same image run) and same valid run, or same padding run``: causal text, bidirectional
    image blocks, real tokens never see padding, padding sees only its own run.
    """
    length = image_flags.shape[1]
    idx = torch.arange(length, device=image_flags.device)
    causal = (idx[None, :] <= idx[:, None])[None]  # (1, Lq, Lk)
    img_run, valid_run = _run_ids(image_flags), _run_ids(valid)
    same_img = image_flags[:, :, None] & image_flags[:, None, :] & (img_run[:, :, None] == img_run[:, None, :])
    same_valid_run = valid_run[:, :, None] == valid_run[:, None, :]
    both_valid = valid[:, :, None] & valid[:, None, :] & same_valid_run
    both_pad = ~valid[:, :, None] & ~valid[:, None, :] & same_valid_run
    return (((causal | same_img) & both_valid) | both_pad)[:, None]


def shift_labels(labels: torch.Tensor, markers: tuple[int, int], im_end: int) -> torch.Tensor:
    """Next-token targets for hidden states ``[:, :-1]`` (SPEC §11 steps 2-3): (B, L') -> (B, L'-1).

    The release rewrites the shifted labels (IM_START gains a following -100, IM_END is dropped, markers become
    -100). For every well-formed block ``x, IM_START, img×N, IM_END, y`` that is the same as: shift by one, then
    ignore image markers and IM_END as targets. So x predicts IM_START, IM_START and the N image positions
    predict nothing, IM_END is never a target and IM_END predicts y.
    """
    target = labels[:, 1:].clone()
    target[torch.isin(target, torch.tensor([*markers, im_end], device=target.device))] = IGNORE_INDEX
    return target
