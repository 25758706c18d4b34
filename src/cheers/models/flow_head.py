"""The cascaded flow-matching head: timestep embedder, DiT AdaLN-Zero blocks, the HFI gate.

Dimension legend: n images, N = (h/2)(w/2) LLM tokens, M = h·w fine tokens, D block width,
Dt text width, Dv vision width, C latent channels.

Stage 1 (``gen_projector``, 7 blocks on Dt) maps the LLM's image states to 4·Dv features per token; a pixel
shuffle makes M fine tokens; the HiGate adds the SigLIP patch embeddings of D(z_t) scaled by a learned,
unbounded scalar per token; stage 2 (``hi_projector``, 3 blocks on Dv) predicts the velocity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``weight · x · rsqrt(mean(x²) + eps)``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x·(1+scale) + shift`` in float32 (the release modulates in float32), cast back to x's dtype."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def rope_tables(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """cos/sin tables (M, head_dim) for rotate-half RoPE at integer ``positions``; angles in float32."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.float()[:, None] * inv_freq[None]  # (M, head_dim/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Bidirectional GQA self-attention with RoPE and no biases."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"attention width {dim} / heads {num_heads} / kv heads {num_kv_heads} do not divide"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n, m, _ = x.shape
        q = self.q_proj(x).view(n, m, self.num_heads, self.head_dim).transpose(1, 2)  # (n, H, M, hd)
        k = self.k_proj(x).view(n, m, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (n, Hkv, M, hd)
        v = self.v_proj(x).view(n, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(n, m, -1))  # (n, M, D)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DiTBlock(nn.Module):
    """AdaLN-Zero transformer block: shift/scale/gate for attention and MLP from the time embedding."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, num_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(
            6, dim=-1
        )  # (n, 1, D) each
        x = x + gate1 * self.attn(modulate(self.input_layernorm(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.post_attention_layernorm(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTHead(nn.Module):
    """A stack of DiT blocks and a final layer (``diffusion_head_a``, ``diffusion_head_b``).

    Args:
        wrap_positions: token k gets RoPE position k mod (M/2) (the release's hi_projector, reference §8)
            instead of k.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        num_kv_heads: int,
        out_dim: int,
        wrap_positions: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.diffusion_head_a = nn.ModuleList(DiTBlock(dim, num_heads, num_kv_heads) for _ in range(depth))
        self.diffusion_head_b = FinalLayer(dim, out_dim)
        self.head_dim = dim // num_heads
        self.wrap_positions = wrap_positions
        self.rope_base = rope_base

    def positions(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(num_tokens, device=device)
        return pos % max(num_tokens // 2, 1) if self.wrap_positions else pos

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (n, M, D), c (n, 1, D) -> (n, M, out_dim)."""
        rope = rope_tables(self.positions(x.shape[1], x.device), self.head_dim, self.rope_base, x.dtype)
        for block in self.diffusion_head_a:
            x = block(x, c, rope)
        return self.diffusion_head_b(x, c)

    def zero_init(self) -> None:
        """AdaLN-Zero: every block starts as the identity and the final layer as ``linear(RMSNorm(x))``.

        Only the modulations are zeroed, as in the release. The final ``linear`` keeps its random init: DiT
        also zeroes it, but here stage 2's input is ``LayerNorm(stage-1 output + g·high)`` with g zero at
        init, so a zero stage-1 output would make every gradient but the output bias vanish (a dead head).
        """
        for layer in (
            *(b.adaLN_modulation[-1] for b in self.diffusion_head_a),
            self.diffusion_head_b.adaLN_modulation[-1],
        ):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


class TimestepEmbedder(nn.Module):
    """t in [0,1] (no ×1000) -> [cos, sin] features -> two MLPs: ``temb1`` (Dt) and ``temb2`` (Dv)."""

    def __init__(self, text_dim: int, vision_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_1 = nn.Sequential(nn.Linear(freq_dim, text_dim), nn.SiLU(), nn.Linear(text_dim, text_dim))
        self.mlp_2 = nn.Sequential(
            nn.Linear(freq_dim, vision_dim), nn.SiLU(), nn.Linear(vision_dim, vision_dim)
        )

    def features(self, t: torch.Tensor) -> torch.Tensor:
        """t (n,) -> (n, 1, freq_dim), cosine half first, float32."""
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float().reshape(-1, 1, 1) * freqs  # (n, 1, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(t).to(self.mlp_1[0].weight.dtype)
        return self.mlp_1(f), self.mlp_2(f)  # (n, 1, Dt), (n, 1, Dv)


class HiGate(nn.Module):
    """High-frequency injection: ``LayerNorm(low + g·high)`` with g = MLP(low), an unbounded scalar per
    token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """low, high (n, M, Dv) -> (fused (n, M, Dv), gate (n, M, 1))."""
        g = self.gate(low)
        return self.layer_norm(low + g * high), g

    def zero_init(self) -> None:
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)
