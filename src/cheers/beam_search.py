"""Beam search for text answers (understanding), on the same KV cache as :mod:`cheers.generation`.

Dimension legend: B prompts, K beams, V vocabulary. Rows of the cache are prompt-major: row b·K + k.
"""

from __future__ import annotations

import torch

from cheers.generation import LMState, extend, prefill
from cheers.models.cheers import Cheers


def _expand_state(state: LMState, beams: int) -> None:
    state.cache.batch_repeat_interleave(beams)
    state.key_valid = state.key_valid.repeat_interleave(beams, dim=0)
    state.next_pos = state.next_pos.repeat_interleave(beams, dim=0)
    state.last_logits = state.last_logits.repeat_interleave(beams, dim=0)


def _select_rows(state: LMState, rows: torch.Tensor) -> None:
    state.cache.batch_select_indices(rows)
    state.key_valid = state.key_valid[rows]
    state.next_pos = state.next_pos[rows]


@torch.no_grad()
def beam_search(
    model: Cheers,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 64,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """The best continuation of each prompt by beam search (score = sum log p / length^length_penalty).

    Args:
        input_ids, attention_mask, pixel_values: as for :func:`cheers.generation.generate`.
        num_beams: K >= 1 (1 is greedy decoding).
        max_new_tokens: at most this many tokens per answer (EOS included).
        eos_token_id: ends a hypothesis; default: the model's EOS.
    Returns:
        Per prompt, the generated ids (ending with EOS when one was produced).
    """
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    eos = model.require_special().eos if eos_token_id is None else eos_token_id
    batch, k = input_ids.shape[0], num_beams
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    state = prefill(model, input_ids, attention_mask, pixel_values)
    _expand_state(state, k)
    device = input_ids.device
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step does not repeat it
    seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(batch)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        logp = state.last_logits.float().log_softmax(dim=-1)  # (B·K, V)
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(batch, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=-1)  # (B, 2K)
        new_rows, new_tokens, new_scores = [], [], []
        for b in range(batch):
            kept: list[tuple[int, int, float]] = []
            for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, token = divmod(idx, vocab)
                if score == float("-inf"):
                    break
                if token == eos:
                    finished[b].append((score / ((step + 1) ** length_penalty), seqs[b][beam] + [token]))
                elif len(kept) < k:
                    kept.append((beam, token, score))
                if len(kept) == k:
                    break
            while len(kept) < k:  # pad with dead beams
                kept.append((0, eos, float("-inf")))
            best_alive = max(s for _, _, s in kept)
            if len(finished[b]) >= k:
                best_done = max(s for s, _ in finished[b])
                done[b] = done[b] or best_alive / ((step + 1) ** length_penalty) < best_done
            seqs[b] = [seqs[b][beam] + [token] for beam, token, _ in kept]
            new_rows += [b * k + beam for beam, _, _ in kept]
            new_tokens += [token for _, token, _ in kept]
            new_scores.append([s for _, _, s in kept])
        scores = torch.tensor(new_scores, device=device)
        if all(done) or step == max_new_tokens - 1:
            break
        _select_rows(state, torch.tensor(new_rows, device=device))
        embeds = model.model.language_model.embed_tokens(torch.tensor(new_tokens, device=device)[:, None])
        hidden = extend(model, state, embeds, torch.ones(batch * k, dtype=torch.bool, device=device), False)
        state.last_logits = model.lm_head(hidden[:, -1])
    results = []
    for b in range(batch):
        alive = [
            (s / (len(q) ** length_penalty), q)
            for s, q in zip(scores[b].tolist(), seqs[b])
            if s > float("-inf")
        ]
        pool = finished[b] or alive
        results.append(max(pool, key=lambda item: item[0])[1])
    return results
