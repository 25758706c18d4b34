"""The FLUX/BFL-style autoencoder with the release's tensor names, and its latent normalisation.

Dimension legend: B batch, H×W pixels, z = z_channels, C = 4z latent channels, h×w = H/16×W/16 latent grid.

The VAE owns its constants: the latent is the encoder *mean* (no sampling, no scale/shift factor), 2x2
patchified (channel index c·4 + pi·2 + pj) and normalised by the BatchNorm running statistics with eps 1e-4.
``VAEModel`` is ``vae_model`` (encoder, decoder, bn); ``LatentDecoder`` is ``vae_decoder_projector``
(a second decoder with its own bn), which the vision tokenizer uses to turn z_t back into pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cheers.config import VAEDecoderConfig, VAEEncoderConfig

BN_EPS = 1e-4  # the release's BatchNorm eps for the latent statistics (not torch's 1e-5 default)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``silu(norm(x))``; with ``in_place``, in place on the fresh normalised tensor when no gradient is
    recorded (same numbers, one large allocation fewer: on a CPU a fresh multi-megabyte tensor costs page
    faults on first touch)."""
    h = norm(x)
    return F.silu(h, inplace=in_place and not h.requires_grad)


def _residual(x: torch.Tensor, h: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``x + h`` with ``h`` a fresh branch output; with ``in_place``, accumulated into ``h`` when no gradient
    is recorded and both have the same layout (the same additions into the same memory format, so the same
    numbers downstream)."""
    if (not in_place or h.requires_grad or x.requires_grad or h.shape != x.shape or h.dtype != x.dtype
            or h.stride() != x.stride()):
        return x + h
    return h.add_(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.in_place = True  # SiLU and residual add in place without autograd; see release_layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_norm_silu(self.norm1, x, self.in_place))
        h = self.conv2(_norm_silu(self.norm2, h, self.in_place))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return _residual(x, h, self.in_place)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.in_place = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c y x -> b 1 (y x) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, c), scale c^-0.5
        h = rearrange(h, "b 1 (y x) c -> b c y x", y=height, x=width)
        return _residual(x, self.proj_out(h), self.in_place)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only (asymmetric)


# ``conv3x3(nearest_upsample_2x(x))`` as a stride-2 transposed convolution with a 4-tap kernel per axis: in
# 1-D, output 2i reads x[i-1]·w0 + x[i]·(w1+w2) and output 2i+1 reads x[i]·(w0+w1) + x[i+1]·w2, which is
# conv_transpose(x, k, stride 2, padding 1) with k = (w2, w1+w2, w0+w1, w0). Row u of the matrix says which
# of the three taps are summed into tap u of k.
_UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


@functools.lru_cache(maxsize=16)
def _upsample_taps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(_UPSAMPLE_TAPS, dtype=dtype, device=device)  # (4, 3), made once per device


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` computed on the low-resolution grid: (B, C, H, W) -> (B, O, 2H, 2W).

    Each output pixel of the pair reads a 2x2 neighbourhood of ``x`` (the 3x3 taps that fall on the same
    source pixel are summed), which is a stride-2 transposed convolution with a 4x4 kernel: 16 multiply-adds
    per output pixel and channel pair instead of 36, and the 4x larger upsampled tensor is never made. The
    library's transposed convolution writes the interleaved output directly. Equal to the plain form up to
    float rounding (the summed taps); the output keeps ``x``'s memory format. The kernel is formed in at
    least float32.
    """
    work = torch.promote_types(weight.dtype, torch.float32)
    taps = _upsample_taps(work, weight.device)
    kernel = torch.einsum("ui,ocij,vj->couv", taps, weight.to(work), taps).to(weight.dtype)  # (C, O, 4, 4)
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


class Upsample(nn.Module):
    """2x nearest upsampling, then a 3x3 conv. ``polyphase`` (default) computes the pair on the low-resolution
    grid as one transposed convolution (:func:`upsample_conv`, 2.25x fewer FLOPs, same numbers up to
    rounding); ``False`` runs the literal interpolate-then-conv, as the release does."""

    def __init__(self, channels: int, polyphase: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.polyphase = polyphase

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.polyphase:
            return upsample_conv(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def set_polyphase_upsampling(module: nn.Module, enabled: bool) -> int:
    """Switch every :class:`Upsample` under ``module`` between the polyphase and the literal form; returns how
    many were switched."""
    found = [m for m in module.modules() if isinstance(m, Upsample)]
    for m in found:
        m.polyphase = enabled
    return len(found)


@contextmanager
def polyphase_upsampling(module: nn.Module, enabled: bool) -> Iterator[None]:
    """:func:`set_polyphase_upsampling` for the duration; each upsampler's own setting is restored after."""
    ups = [m for m in module.modules() if isinstance(m, Upsample)]
    saved = [m.polyphase for m in ups]
    try:
        set_polyphase_upsampling(module, enabled)
        yield
    finally:
        for m, flag in zip(ups, saved):
            m.polyphase = flag


@contextmanager
def release_layers(module: nn.Module) -> Iterator[None]:
    """The VAE layers exactly as the release computes them, for the duration: literal upsampling
    (interpolate, then conv) and every SiLU and residual add out of place. Each setting is restored after."""
    blocks = [m for m in module.modules() if hasattr(m, "in_place")]
    saved = [m.in_place for m in blocks]
    try:
        for m in blocks:
            m.in_place = False
        with polyphase_upsampling(module, False):
            yield
    finally:
        for m, flag in zip(blocks, saved):
            m.in_place = flag


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels (B, 3, H, W) -> moments (B, 2z, H/f, W/f); f = 2^(levels-1)."""

    def __init__(self, cfg: VAEEncoderConfig) -> None:
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.in_place = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(_norm_silu(self.norm_out, self.mid(h), self.in_place))
        return self.quant_conv(h)  # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z, H/f, W/f) -> pixels (B, out_ch, H, W), unclamped."""

    def __init__(self, cfg: VAEDecoderConfig) -> None:
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        block_in = ch * mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # up.0 is the highest resolution and runs last
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)
        self.in_place = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_norm_silu(self.norm_out, h, self.in_place))


def patchify(m: torch.Tensor) -> torch.Tensor:
    """(B, z, 2h, 2w) -> (B, 4z, h, w) with channel index c·4 + pi·2 + pj."""
    return rearrange(m, "b c (h pi) (w pj) -> b (c pi pj) h w", pi=2, pj=2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`patchify`."""
    return rearrange(x, "b (c pi pj) h w -> b c (h pi) (w pj)", pi=2, pj=2)


class LatentStats(nn.BatchNorm2d):
    """Holds the per-channel latent statistics as BatchNorm buffers (the release's ``bn``).

    Only the running statistics are used, always (the release forces ``.eval()`` on this BN), so
    ``normalize`` and ``denormalize`` never update them; ``fit`` sets them from data (stage-0 VAE training).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=BN_EPS, affine=False, track_running_stats=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - guard against misuse
        raise RuntimeError("LatentStats is not a layer: use normalize() / denormalize()")

    def _std(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.running_var.to(x.dtype) + self.eps).view(1, -1, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean.to(x.dtype).view(1, -1, 1, 1)) / self._std(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._std(x) + self.running_mean.to(x.dtype).view(1, -1, 1, 1)

    @torch.no_grad()
    def fit(self, patchified: torch.Tensor) -> None:
        """Set the statistics to the per-channel mean and (biased) variance of ``patchified`` (N, C, h, w)."""
        self.running_mean.copy_(patchified.mean(dim=(0, 2, 3)))
        self.running_var.copy_(patchified.var(dim=(0, 2, 3), unbiased=False))
        self.num_batches_tracked.fill_(1)


class VAEModel(nn.Module):
    """``vae_model``: pixels in [0,1] <-> normalised, patchified latents (B, C, H/16, W/16)."""

    def __init__(self, enc: VAEEncoderConfig, dec: VAEDecoderConfig) -> None:
        super().__init__()
        self.encoder = Encoder(enc)
        self.decoder = Decoder(dec)
        self.bn = LatentStats(4 * enc.z_channels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/16, W/16): the moments' mean, patchified and normalised."""
        moments = self.encoder(pixels)  # (B, 2z, H/8, W/8)
        mean = moments[:, : moments.shape[1] // 2]  # (B, z, H/8, W/8)
        return self.bn.normalize(patchify(mean))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, 16h, 16w) pixels, unclamped."""
        return self.decoder(unpatchify(self.bn.denormalize(latent)))


class LatentDecoder(nn.Module):
    """``vae_decoder_projector``: the tokenizer-side decoder with its own latent statistics."""

    def __init__(self, dec: VAEDecoderConfig) -> None:
        super().__init__()
        self.decoder = Decoder(dec)
        self.bn = LatentStats(4 * dec.z_channels)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, 16h, 16w) pixels, unclamped."""
        return self.decoder(unpatchify(self.bn.denormalize(latent)))
