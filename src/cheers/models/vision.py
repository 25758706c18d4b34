"""The semantic side of the unified vision tokenizer: the SigLIP ViT and the 2x2 token-merging projector.

Dimension legend: B images, h×w ViT grid (= latent grid), N = (h/2)(w/2) LLM tokens per image,
Dv vision width, Dt text width.

The ViT is ``transformers.SiglipVisionModel`` (conv patch embedding + learned position table), whose
sub-module names are the release's. Its pooling head exists only so the release loads; it is never run.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from cheers.config import VisionConfig


def build_vision_tower(cfg: VisionConfig) -> SiglipVisionModel:
    hf = SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_channels=cfg.num_channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        attention_dropout=cfg.attention_dropout,
        vision_use_head=True,
    )
    hf._attn_implementation = "sdpa"
    return SiglipVisionModel(hf)


def _needs_interpolation(vit: SiglipVisionModel, pixels: torch.Tensor) -> bool:
    p = vit.config.patch_size
    n = (pixels.shape[-2] // p) * (pixels.shape[-1] // p)
    return n != vit.embeddings.num_positions or pixels.shape[-2] != pixels.shape[-1]


def patch_embeddings(vit: SiglipVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """Patch conv + (interpolated if needed) position embeddings: (B, 3, H, W) -> (B, h·w, Dv).

    The position table is resized bicubically whenever the grid differs from the trained one (the release
    does so only for images wider than its 512 px and fails on other sizes).
    """
    return vit.embeddings(pixels, interpolate_pos_encoding=_needs_interpolation(vit, pixels))


def vit_features(vit: SiglipVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """The ViT's ``last_hidden_state`` (post-LayerNorm), skipping the unused pooling head: (B, h·w, Dv)."""
    h = patch_embeddings(vit, pixels)
    h = vit.encoder(inputs_embeds=h).last_hidden_state
    return vit.post_layernorm(h)


def merge_2x2(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, D) -> (B, N, 4D): token (I, J) concatenates fine tokens (2I+pi, 2J+pj), k = pi·2 + pj
    outer."""
    h, w = grid
    return rearrange(x, "b (i pi j pj) d -> b (i j) (pi pj d)", i=h // 2, pi=2, j=w // 2, pj=2)


def split_2x2(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Exact inverse of :func:`merge_2x2` (the flow head's pixel shuffle): (B, N, 4D) -> (B, h·w, D)."""
    h, w = grid
    return rearrange(x, "b (i j) (pi pj d) -> b (i pi j pj) d", i=h // 2, pi=2, j=w // 2, pj=2)


class UnderstandingProjector(nn.Module):
    """``und_projector``: LayerNorm, 2x2 merge (4x fewer tokens), MLP with exact GELU:
    (B, h·w, Dv) -> (B, N, Dt)."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(vision_dim, eps=1e-5)
        self.mlp = nn.Sequential(
            nn.Linear(4 * vision_dim, 4 * vision_dim), nn.GELU(), nn.Linear(4 * vision_dim, text_dim)
        )

    def forward(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.mlp(merge_2x2(self.layernorm(feats), grid))  # (B, N, Dt)
