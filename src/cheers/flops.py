"""FLOP counting for the benchmarks: ``torch.utils.flop_counter`` with grouped-query attention made countable.

Some PyTorch releases' SDPA formula rejects ``enable_gqa=True`` calls whose key/value have fewer heads than
the query ("query/key/value shapes are incompatible"). While counting, such calls run with key/value repeated
to the query's heads: the same attention FLOPs the grouped call does, and the same result. The CPU kernel of
SDPA and its backward, which FlopCounterMode has no formula for, are counted with the formulas of the GPU
kernels, and oneDNN's in-place convolution with a fused add (``mkldnn._convolution_pointwise_``) as the
convolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


@contextlib.contextmanager
def countable_gqa() -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args: Any, enable_gqa: bool = False, **kwargs: Any):
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args: Any, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_add_flop(acc_shape, x_shape, w_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    mapping = {}
    fused = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)
    if fused is not None:  # oneDNN's in-place convolution + add (the VAE decoder's scratch path)
        mapping[fused] = _conv_add_flop
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flop),
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = formula
    return mapping


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """A FlopCounterMode (forward and backward) with grouped-query attention and the CPU SDPA kernels
    counted."""
    with countable_gqa(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        yield counter


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """(FLOPs, result) of one call ``fn(*args, **kwargs)``: matrix products, convolutions and attention, as
    FlopCounterMode counts them."""
    with counting_flops() as counter:
        result = fn(*args, **kwargs)
    return int(counter.get_total_flops()), result
