"""The FLUX/BFL-style autoencoder with the release's tensor names, and its latent normalisation.

Dimension legend: B batch, H×W pixels, z = z_channels, C = 4z latent channels, h×w = H/16×W/16 latent grid.

The VAE owns its constants: the latent is the encoder *mean* (no sampling, no scale/shift factor), 2x2
patchified (channel index c·4 + pi·2 + pj) and normalised by the BatchNorm running statistics with eps 1e-4.
``VAEModel`` is ``vae_model`` (encoder, decoder, bn); ``LatentDecoder`` is ``vae_decoder_projector``
(a second decoder with its own bn), which the vision tokenizer uses to turn z_t back into pixels.
"""

from __future__ import annotations

import functools
import threading
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


class Scratch:
    """Activation buffers that the VAE decoder reuses from call to call (CPU inference; see :func:`scratch`).

    On a CPU, glibc maps every allocation above 32 MB afresh (and gives it back when freed), so each large
    activation page-faults on first touch; at batch 4 and 256 px (64 channels: 67 MB per activation) that is
    ~20 % of the decoder's time. With a scratch the decoder writes its large activations into buffers kept
    here, keyed by role, shape, dtype, device and memory format.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer for ``role`` at ``shape`` in ``like``'s dtype, device and memory format (made once)."""
        fmt = torch.channels_last if _channels_last(like) else torch.contiguous_format
        key = (role, tuple(shape), like.dtype, like.device, fmt)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


_local = threading.local()


@contextmanager
def scratch() -> Iterator[Scratch]:
    """Let the VAE decoders of this thread reuse activation buffers for the duration (nested: the outer one).
    :func:`cheers.generation.generate` samples each image inside one.

    Only float32 inference on a CPU with the in-place layers on takes this path; autograd, other devices and
    dtypes, :func:`release_layers` and ``torch.compile`` run the plain layers. The convolutions give the same
    bits as the plain path (oneDNN's convolution with a fused add, into the buffer); GroupNorm is computed in
    two passes (mean, then mean squared deviation), equal to the fused kernel up to float rounding. The
    buffers (a few times the largest activation) are freed on exit.
    """
    outer = getattr(_local, "scratch", None)
    if outer is not None:
        yield outer
        return
    _local.scratch = buffers = Scratch()
    try:
        yield buffers
    finally:
        _local.scratch = None
        buffers.clear()


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _active_scratch(decoder: nn.Module, x: torch.Tensor) -> Scratch | None:
    buffers = getattr(_local, "scratch", None)
    if (buffers is None or not decoder.in_place or torch.is_grad_enabled() or x.device.type != "cpu"
            or x.dtype != torch.float32 or not torch.backends.mkldnn.enabled or not _fused_conv_available()
            or torch.compiler.is_compiling()):
        return None
    return buffers


@functools.lru_cache(maxsize=1)
def _fused_conv_available() -> bool:
    """Whether this PyTorch build has oneDNN and its in-place convolution with a fused add."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._convolution_pointwise_.binary  # noqa: B018 - resolving the op is the check
    except (AttributeError, RuntimeError):
        return False
    return True


def _conv_add_(acc: torch.Tensor, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``acc += conv(x)`` in place: oneDNN's convolution with a fused add (the same bits as ``conv(x) + acc``)."""
    return _conv_add_raw_(acc, x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)


def _conv_add_raw_(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   padding=(0, 0), stride=(1, 1), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        acc, x, weight, bias, list(padding), list(stride), list(dilation), groups, "add", 1.0, None, [], None)


# The phases of conv3x3(nearest_upsample_2x(x)): output row 2i + a reads rows (i - 1 + a, i + a) of x with the
# summed taps below (a = 0: (w0, w1 + w2); a = 1: (w0 + w1, w2)); the same for columns.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)),
               ((1, 1, 0), (0, 0, 1)))
_FRESHLY_MAPPED = 32 << 20  # glibc maps every allocation of this size or more afresh (its largest mmap threshold)


def _upsample_scratch(up: Upsample, x: torch.Tensor, buffers: Scratch) -> torch.Tensor:
    """``up(x)``; an output of 32 MB or more goes into ``buffers``: the four output phases as one 2x2 conv
    with 4·O output channels (into a buffer), then interleaved into the output buffer (the transposed conv
    that :func:`upsample_conv` uses has no in-place form)."""
    n, _, height, width = x.shape
    weight, bias = up.conv.weight, up.conv.bias
    out_channels = weight.shape[0]
    if not up.polyphase or 4 * x.numel() // x.shape[1] * out_channels * x.element_size() < _FRESHLY_MAPPED:
        return up(x)  # below glibc's mmap threshold a fresh output costs no page faults; the transposed conv wins
    taps = _taps(_PHASE_TAPS, weight.dtype, weight.device)  # (phase, tap, k)
    kernel = torch.einsum("aik,ockl,bjl->abocij", taps, weight, taps).reshape(4 * out_channels, -1, 2, 2)
    phases = buffers.get("upsample_phases", (n, 4 * out_channels, height + 1, width + 1), x).zero_()
    _conv_add_raw_(phases, x, kernel, None if bias is None else bias.repeat(4), padding=(1, 1))
    phases = phases.view(n, 2, 2, out_channels, height + 1, width + 1)
    out = buffers.get("upsample", (n, out_channels, 2 * height, 2 * width), x)
    if _channels_last(out):  # (B, 2H, 2W, O) in memory
        grid = out.permute(0, 2, 3, 1).view(n, height, 2, width, 2, out_channels).permute(0, 5, 1, 2, 3, 4)
    else:
        grid = out.view(n, out_channels, height, 2, width, 2)
    for a in (0, 1):
        for b in (0, 1):
            grid[:, :, :, a, :, b] = phases[:, a, b, :, a:a + height, b:b + width]
    return out


def _norm_silu_into(out: torch.Tensor, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))`` written into ``out``, statistics in two passes (no cancellation)."""
    n, c = x.shape[:2]
    g = norm.num_groups
    count = x.numel() // (n * g)
    mean = x.sum(dim=(2, 3)).view(n, g, c // g).sum(dim=2).div_(count).repeat_interleave(c // g, dim=1)  # (n, c)
    torch.sub(x, mean.view(n, c, 1, 1), out=out)
    var = out.square_().sum(dim=(2, 3)).view(n, g, c // g).sum(dim=2).div_(count)  # (n, g)
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(c // g, dim=1) * norm.weight  # (n, c)
    shift = norm.bias - mean * scale
    torch.addcmul(shift.view(n, c, 1, 1), x, scale.view(n, c, 1, 1), out=out)
    return F.silu(out, inplace=True)


def _resnet_scratch(block: ResnetBlock, x: torch.Tensor, buffers: Scratch) -> torch.Tensor:
    """``block(x)`` with its activations in ``buffers``; ``x`` is the decoder's own and is overwritten."""
    n, _, height, width = x.shape
    out_shape = (n, block.conv1.out_channels, height, width)
    a = _norm_silu_into(buffers.get("norm", tuple(x.shape), x), block.norm1, x)
    h = _conv_add_(buffers.get("conv", out_shape, x).zero_(), block.conv1, a)
    a = _norm_silu_into(buffers.get("norm", out_shape, x), block.norm2, h)
    if block.nin_shortcut is not None:  # a fresh tensor: it becomes the block's output
        x = block.nin_shortcut(x)
    return _conv_add_(x, block.conv2, a)  # the residual add fused into conv2, in place


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
def _taps(table: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(table, dtype=dtype, device=device)  # a tap matrix, made once per dtype and device


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
    taps = _taps(_UPSAMPLE_TAPS, work, weight.device)  # (4, 3)
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
        buffers = _active_scratch(self, z)
        if buffers is not None:
            return self._forward_scratch(z, buffers)
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_norm_silu(self.norm_out, h, self.in_place))

    def _forward_scratch(self, z: torch.Tensor, buffers: Scratch) -> torch.Tensor:
        """``forward`` with the large activations in reused buffers (:func:`scratch`); the output is fresh.
        Every block's input is a tensor this method made (conv_in's, a shortcut's or an upsampler's output,
        fresh or a buffer that is not read again), so the blocks may overwrite it."""
        h = _resnet_scratch(self.mid.block_1, self.conv_in(self.post_quant_conv(z)), buffers)
        h = _resnet_scratch(self.mid.block_2, self.mid.attn_1(h), buffers)
        for level in reversed(self.up):
            for block in level.block:
                h = _resnet_scratch(block, h, buffers)
            if hasattr(level, "upsample"):
                h = _upsample_scratch(level.upsample, h, buffers)
        return self.conv_out(_norm_silu_into(buffers.get("norm", tuple(h.shape), h), self.norm_out, h))


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
