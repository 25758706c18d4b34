"""Faster forms of the VAE decoder, installed from outside; :mod:`cheers.models.vae` stays the reference.

Dimension legend: B batch, C input channels, O output channels, H×W an activation's grid.

``fast = install_fast_vae(model)`` sets an instance ``forward`` on every :class:`~cheers.models.vae.Decoder`
and :class:`~cheers.models.vae.Upsample` under ``model`` (the classes and the state dict do not change) and
returns a :class:`FastVAE`, which owns the decoders' buffers; ``fast.remove()`` takes it all off again, and
:func:`reference_layers` sets it aside for a block of code (the release-style loop does). Two paths, each
equal to the reference forward up to float rounding:

1. **Polyphase upsampling** (any device, dtype and grad mode): nearest 2x upsampling then a 3x3 conv, computed
   on the low-resolution grid as one stride-2 transposed convolution (:func:`upsample_conv`): 2.25x fewer
   FLOPs in those convs and the 4x larger upsampled tensor is never made (1e-6 on the feature maps; 1e-12 in
   float64, gradients included).
2. **Decoding into reused buffers** (float32 inference on a CPU with oneDNN): glibc maps every allocation of
   32 MB or more afresh and unmaps it when freed, so each large activation page-faults on first touch (~20 %
   of the decoder's time at batch 4 and 256 px). The decoder writes GroupNorm+SiLU (statistics in two passes:
   equal to the fused kernel up to rounding, decoder outputs within 1e-5 relative), its convolutions (oneDNN's
   in-place convolution with a fused add, the same bits as ``conv(x) + acc``; the residual add fused into the
   second conv) and upsampler outputs of 32 MB or more into buffers kept from call to call. With autograd on,
   on another device or dtype, with oneDNN switched off or missing, or under ``torch.compile``, a decoder runs
   its reference forward (with the polyphase upsamplers of 1).

Why polyphase upsampling lives here rather than as the reference's default: it is a speed choice, not the
release's layer. The release interpolates, then convolves; the release-style loop
(:mod:`cheers.reference_loop`) and the parity tests (``tests/test_parity.py``, which load a plain model and
allow the release's ``suggested_atol``) compare against that literal form, and none of them needs the
polyphase form to be the default: the literal form *is* the release's numbers. Unlike the buffers it is not
tied to CPU inference, so the same call installs it on every device and under autograd:
:class:`~cheers.pipeline.CheersPipeline` installs it whatever the device (CUDA keeps the speed it had when
polyphase was the default), and a trainer that wants the 2.25x fewer upsampling FLOPs in forward and backward
installs it the same way.

The buffers belong to the handle and are shared by its decoders (the VAE's and the tokenizer's have the same
shapes); they are kept until :meth:`FastVAE.clear` (the pipeline clears them after each call, so that between
calls the memory is free, as it was with plain tensors). A decoder that runs while they are in use (in another
thread, or from inside another decoder) takes buffers of its own for that call: same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cheers.models.vae import Decoder, ResnetBlock, Upsample

__all__ = ["FastVAE", "Scratch", "decode_into", "install_fast_vae", "reference_layers", "upsample_conv"]

# ``conv3x3(nearest_upsample_2x(x))`` as a stride-2 transposed convolution with a 4-tap kernel per axis: in
# 1-D, output 2i reads x[i-1]·w0 + x[i]·(w1+w2) and output 2i+1 reads x[i]·(w0+w1) + x[i+1]·w2, which is
# conv_transpose(x, k, stride 2, padding 1) with k = (w2, w1+w2, w0+w1, w0). Row u of the matrix says which
# of the three taps are summed into tap u of k.
_UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))
# The phases of conv3x3(nearest_upsample_2x(x)): output row 2i + a reads rows (i - 1 + a, i + a) of x with the
# summed taps below (a = 0: (w0, w1 + w2); a = 1: (w0 + w1, w2)); the same for columns.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))
_FRESHLY_MAPPED = (
    32 << 20
)  # glibc maps every allocation of this size or more afresh (its largest mmap threshold)


@functools.lru_cache(maxsize=16)
def _taps(table: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(table, dtype=dtype, device=device)  # a tap matrix, made once per dtype and device


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` computed on the low-resolution grid:
    (B, C, H, W) -> (B, O, 2H, 2W).

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


def _polyphase(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    """The forward installed on an :class:`Upsample`."""
    return upsample_conv(x, up.conv.weight, up.conv.bias)


# -- decoding into reused buffers --------------------------------------------------------------------------


class Scratch:
    """Activation buffers keyed by role, shape, dtype, device and memory format, each made once."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The buffer for ``role`` at ``shape`` in ``like``'s dtype, device and memory format (made once)."""
        fmt = torch.channels_last if _channels_last(like) else torch.contiguous_format
        key = (role, tuple(shape), like.dtype, like.device, fmt)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(
                shape, dtype=like.dtype, device=like.device, memory_format=fmt
            )
        return buf

    def keys(self) -> list[tuple]:
        """(role, shape, dtype, device, memory format) of each buffer."""
        return list(self._buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()

    def __getstate__(self) -> dict:  # a copied or pickled model starts with no buffers: they are a cache
        return {"_buffers": {}}


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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
    """``acc += conv(x)`` in place: oneDNN's convolution with a fused add (the same bits as
    ``conv(x) + acc``)."""
    return _conv_add_raw_(
        acc, x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups
    )


def _conv_add_raw_(
    acc: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding=(0, 0),
    stride=(1, 1),
    dilation=(1, 1),
    groups: int = 1,
) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        acc, x, weight, bias, list(padding), list(stride), list(dilation), groups, "add", 1.0, None, [], None
    )


def _norm_silu_into(out: torch.Tensor, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))`` written into ``out``, statistics in two passes (no cancellation)."""
    n, c = x.shape[:2]
    g = norm.num_groups
    count = x.numel() // (n * g)
    mean = (
        x.sum(dim=(2, 3)).view(n, g, c // g).sum(dim=2).div_(count).repeat_interleave(c // g, dim=1)
    )  # (n, c)
    torch.sub(x, mean.view(n, c, 1, 1), out=out)
    var = out.square_().sum(dim=(2, 3)).view(n, g, c // g).sum(dim=2).div_(count)  # (n, g)
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(c // g, dim=1) * norm.weight  # (n, c)
    shift = norm.bias - mean * scale
    torch.addcmul(shift.view(n, c, 1, 1), x, scale.view(n, c, 1, 1), out=out)
    return F.silu(out, inplace=True)


def _resnet_into(block: ResnetBlock, x: torch.Tensor, buffers: Scratch) -> torch.Tensor:
    """``block(x)`` with its activations in ``buffers``; ``x`` is the decoder's own and is overwritten."""
    n, _, height, width = x.shape
    out_shape = (n, block.conv1.out_channels, height, width)
    a = _norm_silu_into(buffers.get("norm", tuple(x.shape), x), block.norm1, x)
    h = _conv_add_(buffers.get("conv", out_shape, x).zero_(), block.conv1, a)
    a = _norm_silu_into(buffers.get("norm", out_shape, x), block.norm2, h)
    if block.nin_shortcut is not None:  # a fresh tensor: it becomes the block's output
        x = block.nin_shortcut(x)
    return _conv_add_(x, block.conv2, a)  # the residual add fused into conv2, in place


def _upsample_into(up: Upsample, x: torch.Tensor, buffers: Scratch, mapped_afresh: int) -> torch.Tensor:
    """``up(x)`` in the polyphase form; an output of ``mapped_afresh`` bytes or more goes into ``buffers``:
    the four output phases as one 2x2 conv with 4·O output channels (into a buffer), then interleaved into the
    output buffer (the transposed conv of :func:`upsample_conv` has no in-place form)."""
    n, _, height, width = x.shape
    weight, bias = up.conv.weight, up.conv.bias
    out_channels = weight.shape[0]
    if 4 * x.numel() // x.shape[1] * out_channels * x.element_size() < mapped_afresh:
        return upsample_conv(x, weight, bias)  # a fresh output this small costs no page faults
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
            grid[:, :, :, a, :, b] = phases[:, a, b, :, a : a + height, b : b + width]
    return out


def decode_into(
    decoder: Decoder, z: torch.Tensor, buffers: Scratch, mapped_afresh: int = _FRESHLY_MAPPED
) -> torch.Tensor:
    """``decoder(z)`` (float32, CPU, no autograd, oneDNN) with its large activations in ``buffers``; the
    output is fresh. Every block's input is a tensor made here (conv_in's, a shortcut's or an upsampler's
    output, fresh or a buffer that is not read again), so the blocks may overwrite it."""
    mid = decoder.mid
    h = _resnet_into(mid.block_1, decoder.conv_in(decoder.post_quant_conv(z)), buffers)
    h = _resnet_into(mid.block_2, mid.attn_1(h), buffers)
    for i in reversed(range(len(decoder.up))):
        for block in decoder.up[i].block:
            h = _resnet_into(block, h, buffers)
        if i != 0:
            h = _upsample_into(decoder.up[i].upsample, h, buffers, mapped_afresh)
    return decoder.conv_out(_norm_silu_into(buffers.get("norm", tuple(h.shape), h), decoder.norm_out, h))


# -- installing ---------------------------------------------------------------------------------------------


class FastVAE:
    """What :func:`install_fast_vae` put on a model: its decoders' buffers, and :meth:`remove` to take it off.

    Attributes:
        reuse_buffers: decode into the buffers where :meth:`applies` says so (False: the reference forward
            with polyphase upsampling everywhere).
        mapped_afresh: upsampler outputs of this many bytes or more go into buffers (through the phase convs);
            smaller ones are fresh tensors from the transposed conv.
    """

    def __init__(
        self, decoders: list[Decoder], upsamplers: list[Upsample], *, reuse_buffers: bool = True
    ) -> None:
        self.decoders, self.upsamplers = decoders, upsamplers
        self.reuse_buffers = reuse_buffers
        self.mapped_afresh = _FRESHLY_MAPPED
        self._idle = [Scratch()]  # the shared buffers while no decoder uses them
        self._installed: list[tuple[nn.Module, functools.partial]] = []

    def applies(self, z: torch.Tensor) -> bool:
        """Whether a decoder call on ``z`` now decodes into the buffers: float32 inference on a CPU with
        oneDNN on and its fused convolution available, not traced by ``torch.compile``."""
        return (
            self.reuse_buffers
            and not torch.is_grad_enabled()
            and z.device.type == "cpu"
            and z.dtype == torch.float32
            and torch.backends.mkldnn.enabled
            and _fused_conv_available()
            and not torch.compiler.is_compiling()
        )

    def _decode(self, decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
        """The forward installed on a :class:`Decoder`."""
        if not self.applies(z):
            return type(decoder).forward(decoder, z)  # the reference (its upsamplers polyphase)
        try:
            buffers = self._idle.pop()  # atomic: one call at a time holds the shared buffers
        except IndexError:
            buffers = Scratch()  # in use (another thread, a decoder inside a decoder): its own for this call
        try:
            return decode_into(decoder, z, buffers, self.mapped_afresh)
        finally:
            if not self._idle:
                self._idle.append(buffers)

    @property
    def nbytes(self) -> int:
        """Bytes held in buffers between calls."""
        return sum(b.nbytes for b in self._idle)

    def buffer_keys(self) -> list[tuple]:
        """(role, shape, dtype, device, memory format) of each buffer held between calls."""
        return [k for b in self._idle for k in b.keys()]

    def clear(self) -> None:
        """Free the buffers (the next call makes them again)."""
        for b in list(self._idle):
            b.clear()

    def remove(self) -> None:
        """Give the decoders and upsamplers their reference forward back and free the buffers (idempotent)."""
        for module, forward in self._installed:
            if vars(module).get("forward") is forward:
                del module.forward
        self._installed.clear()
        self.clear()


def install_fast_vae(module: nn.Module, *, reuse_buffers: bool = True) -> FastVAE:
    """Install polyphase upsampling on every VAE :class:`Upsample` under ``module`` and the buffered CPU path
    on every :class:`Decoder` (both decoders of a Cheers model share one set of buffers); returns the handle.

    Raises:
        ValueError: ``module`` holds no VAE decoder or upsampler, or one of them already has a forward
            installed.
    """
    decoders = [m for m in module.modules() if isinstance(m, Decoder)]
    upsamplers = [m for m in module.modules() if isinstance(m, Upsample)]
    if not decoders and not upsamplers:
        raise ValueError(f"{type(module).__name__} holds no VAE Decoder or Upsample to install on")
    taken = [type(m).__name__ for m in decoders + upsamplers if "forward" in vars(m)]
    if taken:
        raise ValueError(
            f"{len(taken)} VAE layers under {type(module).__name__} already have a forward "
            f"installed ({', '.join(sorted(set(taken)))}): remove() that FastVAE first"
        )
    fast = FastVAE(decoders, upsamplers, reuse_buffers=reuse_buffers)
    for up in upsamplers:
        fast._installed.append((up, functools.partial(_polyphase, up)))
    for dec in decoders:
        fast._installed.append((dec, functools.partial(fast._decode, dec)))
    for m, forward in fast._installed:
        m.forward = forward
    return fast


@contextmanager
def reference_layers(module: nn.Module) -> Iterator[None]:
    """The VAE layers under ``module`` exactly as the release computes them, for the duration: every forward
    installed on a :class:`Decoder` or :class:`Upsample` (:func:`install_fast_vae`) is set aside, and put back
    after. Another thread using the same model meanwhile runs the reference layers too."""
    saved = [
        (m, vars(m).pop("forward"))
        for m in module.modules()
        if isinstance(m, (Decoder, Upsample)) and "forward" in vars(m)
    ]
    try:
        yield
    finally:
        for m, forward in saved:
            m.forward = forward
