"""Splicing image tokens into the text sequence, the hybrid attention mask and the training labels
(reference §5, §11).

Dimension legend: B rows, L input length, L' expanded length, N tokens per image, Dt text width.

Input ids carry two negative markers: ``image_marker`` (an understanding image, the release's -200) and
``image_gen_marker`` (an image to generate, -300). Each marker becomes the N tokens of the next image.
A row without any marker still consumes the next image when the batch has one image per such row (the
release's "dummy image" of text-only prompts): its tokens go in *front* of the row and are attended causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    """Build the LLM input (reference §5).

    Args:
        input_ids: (B, L) ids with image markers.
        attention_mask: (B, L) 1 = real token; positions with 0 are dropped first.
        image_tokens: (n_img, N, Dt) image tokens in order of appearance (row by row), or None.
        embed_tokens: the LLM's token embedding.
        markers: (understanding marker, generation marker), e.g. (-200, -300).
        labels: optional (B, L) labels aligned with ``input_ids``.
        max_length: truncate every row to this many positions.
    """
    batch, device = input_ids.shape[0], input_ids.device
    # The layout is planned on the host in one transfer (per-row device ops would cost a launch and a sync
    # each); the device then does one embedding lookup, one gather of image tokens and one select.
    ids_np = input_ids.detach().cpu().numpy()
    keep_np = attention_mask.detach().cpu().numpy().astype(bool)
    labels_np = labels.detach().cpu().numpy() if labels is not None else None
    markers_np = np.asarray(markers, dtype=ids_np.dtype)
    rows = [ids_np[b][keep_np[b]] for b in range(batch)]
    row_labels = [labels_np[b][keep_np[b]] for b in range(batch)] if labels_np is not None else None
    n_markers = [int(np.isin(r, markers_np).sum()) for r in rows]
    n_img = 0 if image_tokens is None else image_tokens.shape[0]
    per_image = 0 if image_tokens is None else image_tokens.shape[1]
    markerless = sum(1 for n in n_markers if n == 0)
    if n_img == sum(n_markers) + markerless:
        prefix_rows = True
    elif n_img == sum(n_markers):
        prefix_rows = False
    else:
        raise ValueError(
            f"the batch has {sum(n_markers)} image marker(s) and {markerless} row(s) without a marker, but "
            f"{n_img} image(s) were given: expected {sum(n_markers)} (no prefix images) or "
            f"{sum(n_markers) + markerless} (one prefix image per row without a marker)"
        )
    plans = []
    next_image = 0
    for b, ids in enumerate(rows):
        row = _RowPlan(ids, row_labels[b] if row_labels is not None else None, per_image)
        if n_markers[b] == 0:
            if prefix_rows:
                row.add_image(next_image, flagged=False, marker=markers[0])
                next_image += 1
            row.add_text(0, len(ids))
        else:
            start = 0
            for pos in np.nonzero(np.isin(ids, markers_np))[0].tolist():
                row.add_text(start, pos)
                row.add_image(next_image, flagged=True, marker=int(ids[pos]))
                next_image += 1
                start = pos + 1
            row.add_text(start, len(ids))
        plans.append(row.build(max_length))

    lengths_np = np.asarray([p[0].shape[0] for p in plans], dtype=np.int64)
    width = int(lengths_np.max())
    text_ids = np.zeros((batch, width), dtype=np.int64)
    image_index = np.full((batch, width), -1, dtype=np.int64)
    flags_np = np.zeros((batch, width), dtype=bool)
    valid_np = np.zeros((batch, width), dtype=bool)
    labels_out = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
    for b, (t_ids, i_idx, f, lab) in enumerate(plans):
        n = t_ids.shape[0]
        text_ids[b, :n], image_index[b, :n], flags_np[b, :n], valid_np[b, :n], labels_out[b, :n] = (
            t_ids,
            i_idx,
            f,
            True,
            lab,
        )

    def to_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    dim = embed_tokens.embedding_dim
    dtype = embed_tokens.weight.dtype if image_tokens is None else image_tokens.dtype
    valid = to_device(valid_np)
    index = to_device(image_index)
    slots = index >= 0  # every image token (image-token index, -1 at text and padding)
    embeds = torch.where((valid & ~slots)[..., None], embed_tokens(to_device(text_ids)).to(dtype), 0)
    if image_tokens is not None and n_img:
        gathered = image_tokens.reshape(-1, dim)[index.clamp(min=0)]  # (B, L', Dt)
        embeds = torch.where(slots[..., None], gathered, embeds)
    return Assembled(
        embeds,
        to_device(flags_np),
        slots,
        valid,
        to_device(labels_out) if labels is not None else None,
        to_device(lengths_np),
    )


class _RowPlan:
    """One expanded row as host arrays, piece by piece: text ids, image-token indices (-1 at text; the image
    slots are where they are >= 0), image flags and labels."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray | None, per_image: int) -> None:
        self.ids, self.labels, self.per_image = ids, labels, per_image
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add_image(self, k: int, flagged: bool, marker: int) -> None:
        """The N tokens of image ``k``; ``flagged`` ones form a bidirectional block, prefixed ones do not."""
        n = self.per_image
        self.parts.append(
            (
                np.zeros(n, np.int64),
                np.arange(k * n, (k + 1) * n, dtype=np.int64),
                np.full(n, flagged),
                np.full(n, marker, np.int64),
            )
        )

    def add_text(self, start: int, stop: int) -> None:
        seg = self.ids[start:stop]
        if seg.size:
            lab = self.labels[start:stop] if self.labels is not None else seg
            n = seg.size
            self.parts.append(
                (seg.astype(np.int64), np.full(n, -1, np.int64), np.zeros(n, bool), lab.astype(np.int64))
            )

    def build(self, max_length: int | None) -> tuple[np.ndarray, ...]:
        if not self.parts:
            raise ValueError("a row of the batch is empty (its attention mask has no 1)")
        out = tuple(np.concatenate(cols) for cols in zip(*self.parts))
        return tuple(x[:max_length] for x in out) if max_length is not None else out


def _run_ids(flags: torch.Tensor) -> torch.Tensor:
    """Index of the maximal run of equal values each position belongs to: (B, L) -> (B, L)."""
    change = torch.ones_like(flags, dtype=torch.long)
    change[:, 1:] = (flags[:, 1:] != flags[:, :-1]).long()
    return change.cumsum(dim=1)


def hybrid_mask(image_flags: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The boolean LLM mask (True = may attend), (B, L') -> (B, 1, L', L') (reference §5).

    ``((k ≤ q) or same image run) and same valid run, or same padding run``: causal text, bidirectional
    image blocks, real tokens never see padding, padding sees only its own run.
    """
    length = image_flags.shape[1]
    idx = torch.arange(length, device=image_flags.device)
    causal = (idx[None, :] <= idx[:, None])[None]  # (1, Lq, Lk)
    img_run, valid_run = _run_ids(image_flags), _run_ids(valid)
    same_img = (
        image_flags[:, :, None] & image_flags[:, None, :] & (img_run[:, :, None] == img_run[:, None, :])
    )
    same_valid_run = valid_run[:, :, None] == valid_run[:, None, :]
    both_valid = valid[:, :, None] & valid[:, None, :] & same_valid_run
    both_pad = ~valid[:, :, None] & ~valid[:, None, :] & same_valid_run
    return (((causal | same_img) & both_valid) | both_pad)[:, None]


def shift_labels(labels: torch.Tensor, markers: tuple[int, int], im_end: int) -> torch.Tensor:
    """Next-token targets for hidden states ``[:, :-1]`` (reference §11 steps 2-3): (B, L') -> (B, L'-1).

    The release rewrites the shifted labels (IM_START gains a following -100, IM_END is dropped, markers
    become -100). For every well-formed block ``x, IM_START, img×N, IM_END, y`` that is the same as: shift by
    one, then ignore image markers and IM_END as targets. So x predicts IM_START, IM_START and the N image
    positions predict nothing, IM_END is never a target and IM_END predicts y.
    """
    target = labels[:, 1:].clone()
    target[torch.isin(target, torch.tensor([*markers, im_end], device=target.device))] = IGNORE_INDEX
    return target
