"""The FLUX/BFL-style autoencoder with the release's tensor names, and its latent normalisation.

Dimension legend: B batch, H×W pixels, z = z_channels, C = 4z latent channels, h×w = H/16×W/16 latent grid.

The VAE owns its constants: the latent is the encoder *mean* (no sampling, no scale/shift factor), 2x2
patchified (channel index c·4 + pi·2 + pj) and normalised by the BatchNorm running statistics with eps 1e-4.
``VAEModel`` is ``vae_model`` (encoder, decoder, bn); ``LatentDecoder`` is ``vae_decoder_projector``
(a second decoder with its own bn), which the vision tokenizer uses to turn z_t back into pixels.

Every forward here is the release's literal computation (reference §2), whatever the device or grad mode.
Faster forms of the decoder (polyphase upsampling, reused buffers on a CPU) are installed on a model from
outside by :func:`cheers.models.vae_fast.install_fast_vae`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cheers.config import VAEDecoderConfig, VAEEncoderConfig

BN_EPS = 1e-4  # the release's BatchNorm eps for the latent statistics (not torch's 1e-5 default)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c y x -> b 1 (y x) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, c), scale c^-0.5
        h = rearrange(h, "b 1 (y x) c -> b c y x", y=height, x=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only (asymmetric)


class Upsample(nn.Module):
    """2x nearest upsampling, then a 3x3 conv (faster form: :func:`cheers.models.vae_fast.upsample_conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:  # every level but the last halves the grid
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:  # every level but the last doubles the grid
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


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
